"""`medfed privacy audit`: the membership-inference attack on real trained models, and its epsilon lower bound."""

import json
import math

import numpy as np
import pytest
import torch
from scipy.stats import binomtest
from typer.testing import CliRunner

from medfed.privacy.audit import analyse, clopper_pearson, epsilon_lower_bound, roc_auc, roc_counts, tpr_at_fpr

# --- the bound computation -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("k,n", [(0, 5), (3, 8), (8, 8), (17, 200), (990, 1000)])
def test_clopper_pearson_matches_scipys_exact_interval(k, n):
    alpha = 0.025  # one-sided at alpha = each side of the two-sided exact interval at 1 - 2 alpha
    lower, upper = clopper_pearson(k, n, alpha)
    ci = binomtest(k, n).proportion_ci(confidence_level=1 - 2 * alpha, method="exact")
    assert float(lower) == pytest.approx(ci.low, abs=1e-9) and float(upper) == pytest.approx(ci.high, abs=1e-9)


def test_roc_auc_and_tpr_at_fpr_on_known_scores():
    members = np.array([0.1, 0.2, 0.3, 0.9])
    held_out = np.array([0.25, 0.4, 0.5, 0.6, 0.7, 0.8, 0.95, 1.0, 1.1, 1.2])
    # pairs with member < held-out: 10 + 10 + 9 + 4 = 33 of 40
    assert roc_auc(members, held_out) == pytest.approx(33 / 40)
    assert roc_auc(np.zeros(3), np.zeros(4)) == 0.5  # ties count half
    tp, fp = roc_counts(members, held_out)
    assert (tp[0], fp[0]) == (0, 0) and (tp[-1], fp[-1]) == (4, 10)
    assert tpr_at_fpr(tp, fp, 4, 10, 0.0) == 0.5  # 0.1 and 0.2 fall below every held-out score
    assert tpr_at_fpr(tp, fp, 4, 10, 0.1) == 0.75  # one false positive (0.25) buys 0.3
    assert tpr_at_fpr(tp, fp, 4, 10, 0.6) == 1.0


def test_a_perfect_attack_on_a_few_images_proves_almost_nothing():
    for n, most in ((3, 0.0), (5, 0.0), (8, 0.0), (10, 0.05)):
        tp, fp = roc_counts(np.arange(n) - 100.0, np.arange(n) + 100.0)
        eps, tpr_lo, fpr_hi = epsilon_lower_bound(tp, fp, n, n, 1e-5, 0.05 / (2 * len(tp)))
        assert eps <= most, (n, eps, tpr_lo, fpr_hi)


def test_a_perfect_attack_on_many_images_gives_the_closed_form_bound():
    n, alpha = 1000, 0.05 / 2
    tp, fp = np.array([0, n, n]), np.array([0, 0, n])  # thresholds: none, all members, everything
    eps, tpr_lo, fpr_hi = epsilon_lower_bound(tp, fp, n, n, 0.0, alpha)
    assert tpr_lo == pytest.approx(alpha ** (1 / n)) and fpr_hi == pytest.approx(1 - alpha ** (1 / n))
    assert eps == pytest.approx(math.log(alpha ** (1 / n) / (1 - alpha ** (1 / n))))
    assert 5.0 < eps < 6.0


def test_the_bound_holds_at_its_confidence_on_a_mechanism_of_known_epsilon():
    """Randomized response at epsilon 1 is exactly 1-DP: its best test has TPR = e/(1+e), FPR = 1/(1+e). Over many
    audits of 200 + 200 trials, the 95% bound must exceed 1 in at most 5% of them (it is a union bound: fewer)."""
    rng = np.random.default_rng(0)
    eps_true, n = 1.0, 200
    p = math.exp(eps_true) / (1 + math.exp(eps_true))
    bounds, near = [], 0
    for _ in range(200):
        members = (rng.random(n) > p).astype(float)  # score 0 = "member" with probability p
        held_out = (rng.random(n) < p).astype(float)
        (result,) = analyse({"rr": (members, held_out)}, delta=0.0, confidence=0.95)
        bounds.append(result.epsilon_lower_bound)
        near += result.epsilon_lower_bound > 0.3
    assert np.mean(np.array(bounds) > eps_true) <= 0.05
    assert near > 100  # and it is not vacuous: most audits prove a good part of the true epsilon


def test_the_bound_never_exceeds_the_point_estimate():
    rng = np.random.default_rng(1)
    members, held_out = rng.normal(-1, 1, 300), rng.normal(0, 1, 300)
    tp, fp = roc_counts(members, held_out)
    eps, tpr_lo, fpr_hi = epsilon_lower_bound(tp, fp, 300, 300, 1e-5, 0.05 / (2 * len(tp)))
    with np.errstate(divide="ignore"):
        point = np.maximum(np.log(tp / 300 / (fp / 300)), np.log((1 - fp / 300) / (1 - tp / 300)))
    assert 0 < eps < np.nanmax(point[np.isfinite(point)])


# --- the attack on real models -------------------------------------------------------------------------------------

SIZE, N = 16, 8
OVERFIT = {"model.preset": "pico", "data.dataset": "npz", "data.image-size": SIZE, "data.channels": 1,
           "train.batch-size": N, "train.steps": 600, "train.lr": 5e-3, "train.ema-decay": 0.0,
           "train.num-samples": 2, "diffusion.sample-steps": 2, "train.checkpoint-every": 10_000,
           "train.sample-every": 10_000, "train.log-every": 100, "train.device": "cpu"}


@pytest.fixture(scope="module")
def shards(tmp_path_factory, shared_data):
    """Real MNIST digits in two archives: ``a`` holds A (train split, the members) and B (test split, held-out);
    ``c`` holds C (train) and the same B: images the model trained on A never saw."""
    mnist = np.load(shared_data / "mnist" / "mnist.npz")
    digits, labels = mnist["train_images"][:3 * N], mnist["train_labels"][:3 * N]
    folder = tmp_path_factory.mktemp("shards")
    paths = {}
    for name, train in (("a", slice(0, N)), ("c", slice(2 * N, 3 * N))):
        paths[name] = folder / f"{name}.npz"
        np.savez(paths[name], train_images=digits[train], train_labels=labels[train],
                 test_images=digits[N:2 * N], test_labels=labels[N:2 * N])
    return paths


def audit_cli(checkpoint, *args):
    from medfed.cli import app

    out = checkpoint.parent / f"audit-{len(list(checkpoint.parent.glob('audit-*')))}.json"
    result = CliRunner().invoke(app, ["privacy", "audit", str(checkpoint), "--device", "cpu", "--out", str(out),
                                      *map(str, args)])
    assert result.exit_code == 0, result.output
    return json.loads(out.read_text()), result.output


@pytest.mark.slow  # 600 training steps: about 100 s on a loaded 2-core machine
def test_an_overfit_model_is_vulnerable_and_images_it_never_saw_are_at_chance(tmp_path, shards):
    from medfed.centralized import train_centralized
    from medfed.config import from_flat

    torch.set_num_threads(1)
    cfg = from_flat({**OVERFIT, "data.path": str(shards["a"]), "output.dir": str(tmp_path), "output.name": "on-a"})
    checkpoint = train_centralized(cfg, show_progress=False).run.latest_checkpoint
    # defaults: members are the checkpoint's training images (A), held-out its dataset's test split (B)
    record, output = audit_cli(checkpoint)
    attacks = {a["attack"]: a for a in record["attacks"]}
    assert record["members"] == record["held_out"] == N
    assert attacks["loss"]["auc"] >= 0.85, attacks
    assert "not available" in output and record["proven_epsilon"]["epsilon"] is None  # no accountant, no number
    assert record["epsilon_lower_bound"] == 0.0  # 8 images per side prove nothing, even for a perfect attack
    # the same model, "members" C it never saw against B: nothing to find
    unseen, _ = audit_cli(checkpoint, "--members-path", shards["c"], "--held-out-path", shards["c"])
    assert all(0.2 <= a["auc"] <= 0.8 for a in unseen["attacks"]), unseen["attacks"]
    assert {p.suffix for p in checkpoint.parent.iterdir()} == {".pt", ".json"}  # numbers only, no image


def test_a_dp_model_at_epsilon_8_stays_within_its_accountants_epsilon(tmp_path, shards):
    """A model trained with the real DP-SGD path at epsilon 8 on the same shard, its spend committed to a site
    ledger as a site does; the audit reports the ledger's epsilon beside a bound that stays below it."""
    from medfed.checkpoint import Checkpoint, save_checkpoint
    from medfed.cli import app
    from medfed.config import from_flat
    from medfed.datasets import load_dataset
    from medfed.diffusion import make_scheduler
    from medfed.errors import MedfedError
    from medfed.models import build_unet
    from medfed.privacy.accounting import epsilon, plan_noise
    from medfed.privacy.budget import PrivacyCap, commit_round
    from medfed.privacy.dp_sgd import train_private
    from medfed.privacy.ledger import site_ledger

    torch.set_num_threads(1)
    cfg = from_flat({**OVERFIT, "data.path": str(shards["a"])})
    data = load_dataset(cfg.data)
    plan = plan_noise(len(data), N, 20, 1, target_epsilon=8.0, delta=1e-5, accountant="rdp")
    ledger = site_ledger(tmp_path / "state")
    commit_round(ledger, PrivacyCap(10.0, 1e-5), plan, site_name="site-a", run_id=1, run_name="audit", server_round=1,
                 max_grad_norm=1.0, noise_multiplicity=1, num_examples=len(data))
    torch.manual_seed(0)
    model = build_unet(OVERFIT["model.preset"], 1)
    done = train_private(model, data, plan, batch_size=N, lr=2e-3, local_epochs=20, max_grad_norm=1.0,
                         noise_multiplicity=1, engine="layers", scheduler=make_scheduler(cfg.diffusion),
                         device=torch.device("cpu"))
    proven = epsilon([(done.noise_multiplier, done.sample_rate, done.steps)], 1e-5, "rdp")
    assert proven == pytest.approx(8.0, abs=0.05)
    checkpoint = save_checkpoint(Checkpoint(model=model.state_dict(), config=cfg, image_shape=(1, SIZE, SIZE),
                                            step=1), tmp_path / "run" / "checkpoints" / "latest.pt")
    record, output = audit_cli(checkpoint, "--ledger", tmp_path / "state")
    assert record["proven_epsilon"]["epsilon"] == pytest.approx(proven) and record["proven_epsilon"]["delta"] == 1e-5
    assert f"{proven:.4f} at delta 1e-05" in output
    assert record["options"]["delta"] == 1e-5  # the bound uses the accountant's delta
    assert 0.0 <= record["epsilon_lower_bound"] <= proven
    same = CliRunner().invoke(app, ["privacy", "audit", str(checkpoint), "--held-out-split", "train"])
    assert isinstance(same.exception, MedfedError) and "8 of them are also among the members" in str(same.exception)


def test_the_proven_epsilon_comes_from_the_runs_summary_and_never_from_nowhere(tmp_path):
    from medfed.errors import ConfigError
    from medfed.privacy.audit import proven_epsilon

    checkpoint = tmp_path / "run" / "checkpoints" / "latest.pt"
    assert proven_epsilon(checkpoint, None, None).epsilon is None  # no ledger, no summary: not available
    summary = tmp_path / "run" / "summary.json"
    summary.parent.mkdir(parents=True)
    sites = {"site-0": {"epsilon": 3.25, "delta": 1e-5}, "site-1": {"epsilon": 4.5, "delta": 1e-6}}
    summary.write_text(json.dumps({"privacy": {"label": "DP", "sites": sites}}))
    with pytest.raises(ConfigError, match="pass --site"):
        proven_epsilon(checkpoint, None, None)
    proven = proven_epsilon(checkpoint, None, "site-1")
    assert (proven.epsilon, proven.delta) == (4.5, 1e-6) and "site-1" in proven.source
    summary.write_text(json.dumps({"privacy": {"label": "NOT PRIVATE", "note": "..."}}))
    assert proven_epsilon(checkpoint, None, None).epsilon is None


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_attack_scores_use_the_models_own_training_target(prediction):
    """The loss attack scores a model by its own training loss: against the noise for an epsilon model, against
    the velocity for a v model. A model that outputs 0 scores E[target^2], which tells the two apart."""
    from medfed.config import DiffusionConfig
    from medfed.datasets import ImageDataset
    from medfed.diffusion import make_scheduler
    from medfed.privacy.audit import AuditOptions, _noise, attack_scores

    class Zero(torch.nn.Module):
        def forward(self, x, t):
            return torch.zeros_like(x)

    scheduler = make_scheduler(DiffusionConfig(prediction=prediction))
    images = torch.full((3, 1, 4, 4), 0.5)  # E[v^2] = a eps^2 + (1 - a) / 4: far from E[eps^2] = 1 at t = 900
    options = AuditOptions(timesteps=(900,), draws=2)
    scores = attack_scores(Zero(), scheduler, ImageDataset(images, torch.full((3,), -1), "grey"), options, 0,
                           torch.device("cpu"))
    ab = scheduler.alphas_cumprod[900]
    for i in range(3):
        noise = _noise(options.seed, 0, i, (options.draws, 1, 4, 4))
        target = noise if prediction == "epsilon" else ab.sqrt() * noise - (1 - ab).sqrt() * images[i]
        assert scores["loss"][i] == pytest.approx(target.pow(2).mean().item(), rel=1e-5)
