"""DP-SGD at the site: accounting, the budget gate, the ledger, per-sample gradients and clipping."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from medfed.config import DataConfig, DiffusionConfig
from medfed.datasets import ImageDataset, load_dataset
from medfed.diffusion import make_scheduler
from medfed.models import build_unet
from medfed.privacy.accounting import epsilon, plan_noise
from medfed.privacy.budget import BudgetExceededError, PrivacyCap, commit_round, spent_epsilon
from medfed.errors import ConfigError
from medfed.privacy.dp_sgd import draw_noisy_inputs, per_sample_grads, train_private
from medfed.privacy.layer_grads import check_supported, per_layer_grads
from medfed.privacy.ledger import Ledger, LedgerTamperedError, site_ledger


def commit(ledger, cap, plan, r, num_examples=None):
    return commit_round(ledger, cap, plan, site_name="site-x", run_id=7, run_name="test", server_round=r,
                        max_grad_norm=1.0, noise_multiplicity=1,
                        num_examples=plan.declared_size if num_examples is None else num_examples)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_epsilon_restored_each_round_equals_one_shot(tmp_path, accountant):
    plan = plan_noise(2000, 64, 2, 5, target_epsilon=8.0, delta=1e-5, accountant=accountant)
    ledger = site_ledger(tmp_path)
    per_round = [commit(ledger, PrivacyCap(100.0, 1e-5), plan, r).data["epsilon"] for r in range(1, 6)]
    one_shot = epsilon([(plan.noise_multiplier, plan.sample_rate, 5 * plan.steps_per_round)], 1e-5, accountant)
    assert per_round == sorted(per_round) and per_round[0] > 0
    assert abs(per_round[-1] - one_shot) < 1e-6
    # the reopened ledger gives the same number (a restarted site continues the same budget)
    assert abs(spent_epsilon(site_ledger(tmp_path), 1e-5, accountant) - one_shot) < 1e-6
    # the plan reaches the target: within the planner's tolerance, never above it
    assert 7.9 <= one_shot <= 8.0 + 1e-9


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_epsilon_of_a_long_history_equals_opacus_composing_every_entry(accountant):
    from opacus.accountants import create_accountant

    # a run that changed its noise once: two mechanisms, several rounds each, interleaved
    history = [(1.1, 0.25, 4)] * 6 + [(1.4, 0.25, 4)] * 3 + [(1.1, 0.25, 4)] * 2
    opacus = create_accountant(accountant)
    opacus.history = list(history)
    assert epsilon(history, 1e-5, accountant) == pytest.approx(opacus.get_epsilon(delta=1e-5), rel=1e-6)


def test_site_refuses_a_round_that_would_exceed_its_cap(tmp_path):
    plan = plan_noise(500, 50, 1, 10, target_epsilon=8.0, delta=1e-5, accountant="rdp")
    cap = PrivacyCap(epsilon=epsilon([(plan.noise_multiplier, plan.sample_rate, 3 * plan.steps_per_round)],
                                     1e-5, "rdp") + 1e-3, delta=1e-5)  # room for exactly three rounds
    ledger = site_ledger(tmp_path)
    for r in (1, 2, 3):
        commit(ledger, cap, plan, r)
    with pytest.raises(BudgetExceededError, match="privacy cap reached"):
        commit(ledger, cap, plan, 4)
    kinds = [e.kind for e in ledger.entries()]
    assert kinds == ["round", "round", "round", "refusal"]
    assert spent_epsilon(ledger, 1e-5, "rdp") <= cap.epsilon
    assert ledger.entries()[-1].data["epsilon_projected"] > cap.epsilon


def test_a_round_that_could_not_run_commits_nothing(tmp_path):
    plan = plan_noise(93 * 32, 32, 1, 4, target_epsilon=4.0, delta=1e-5, accountant="rdp")
    ledger = site_ledger(tmp_path)
    # a plan whose steps are not those of its declared size: Opacus' int(1/q), one short at 93 batches
    short = dataclasses.replace(plan, sampling=dataclasses.replace(plan.sampling, steps_per_round=92))
    assert int(1 / plan.sample_rate) == 92 != plan.steps_per_round
    with pytest.raises(ValueError, match="not the one planned from its declared size"):
        commit(ledger, PrivacyCap(100, 1e-5), short, 1)
    assert ledger.entries() == []
    commit(ledger, PrivacyCap(100, 1e-5), plan, 1)  # the same site commits the runnable round
    assert [e.data["steps"] for e in ledger.entries()] == [93]


def test_ledger_entries_record_what_the_issue_asks(tmp_path):
    plan = plan_noise(300, 32, 1, 4, target_epsilon=4.0, delta=1e-5, accountant="rdp")
    entry = commit(site_ledger(tmp_path), PrivacyCap(10, 1e-5), plan, 1).data
    for key in ("run_id", "round", "noise_multiplier", "sample_rate", "steps", "max_grad_norm", "epsilon",
                "code_version"):
        assert key in entry, key
    assert len(entry["code_version"]["medfed_sources_sha256"]) == 64


@pytest.mark.parametrize("tamper", ["edit", "delete", "swap"])
def test_tampering_with_the_ledger_is_detected(tmp_path, tamper):
    plan = plan_noise(300, 32, 1, 4, target_epsilon=4.0, delta=1e-5, accountant="rdp")
    ledger = site_ledger(tmp_path)
    for r in (1, 2, 3):
        commit(ledger, PrivacyCap(100, 1e-5), plan, r)
    lines = ledger.path.read_text().splitlines()
    if tamper == "edit":  # lower the recorded noise multiplier of round 2 (an undercount of the spend)
        entry = json.loads(lines[1])
        entry["data"]["noise_multiplier"] *= 2
        lines[1] = json.dumps(entry, sort_keys=True)
    elif tamper == "delete":
        del lines[1]
    else:
        lines[1], lines[2] = lines[2], lines[1]
    ledger.path.write_text("\n".join(lines) + "\n")
    with pytest.raises(LedgerTamperedError, match=str(ledger.path)):
        ledger.verify()
    with pytest.raises(LedgerTamperedError):  # and no round can be committed on top of it
        commit(ledger, PrivacyCap(100, 1e-5), plan, 4)


def perturbed_unet(seed=0):
    torch.manual_seed(seed)
    model = build_unet("micro", 1)
    with torch.no_grad():  # MONAI zero-initialises some convolutions; give every parameter a gradient
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def brute_force_grads(model, x_t, t, eps):
    """One image at a time: gradient of the mean over its K draws."""
    out = []
    for i in range(len(x_t)):
        model.zero_grad()
        (model(x_t[i], t[i]) - eps[i]).pow(2).mean().backward()
        out.append({n: p.grad.detach().clone() for n, p in model.named_parameters()})
    return out


@pytest.mark.parametrize("engine", ["layers", "vmap", "hooks"])
def test_per_sample_gradients_with_noise_multiplicity_match_a_loop(engine):
    from opacus import GradSampleModule

    model = perturbed_unet()
    data = load_dataset(DataConfig(dataset="embedded-mnist", limit=5))
    x_t, t, eps = draw_noisy_inputs(make_scheduler(DiffusionConfig()), data.images, 3,
                                    torch.Generator().manual_seed(1))
    expected = brute_force_grads(model, x_t, t, eps)
    if engine == "layers":  # micro at 28x28: grouped convolutions at 28x28 and 14x14, im2col at 7x7 and 1x1
        grads, _ = per_layer_grads(model, x_t, t, eps)
    elif engine == "vmap":
        grads, _ = per_sample_grads(model, x_t, t, eps, chunk_size=2)  # chunks of 2, 2 and 1 images
    else:
        gsm = GradSampleModule(model)
        loss = torch.stack([(gsm(x_t[:, k], t[:, k]) - eps[:, k]).pow(2).flatten(1).mean(1) for k in range(3)],
                           1).mean()
        loss.backward()
        grads = {n: p.grad_sample for n, p in model.named_parameters()}
        gsm.cleanup()
    assert set(grads) == {n for n, _ in model.named_parameters()}
    for name, g in grads.items():
        assert g.shape[0] == 5  # one row per image, not per draw
        want = torch.stack([e[name] for e in expected])
        torch.testing.assert_close(g, want, rtol=1e-4, atol=1e-6)


def test_layers_engine_refuses_layers_it_cannot_handle():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.BatchNorm2d(4))
    with pytest.raises(ConfigError, match=r"'1' \(BatchNorm2d\).*use 'vmap'"):
        check_supported(model)
    with pytest.raises(ConfigError, match="'0' has groups=2"):
        check_supported(torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3, groups=2)))
    check_supported(perturbed_unet())

    class Twice(torch.nn.Module):  # one layer used twice: its per-sample gradient would be split in two
        def __init__(self):
            super().__init__()
            self.shared = torch.nn.Linear(4, 4)

        def forward(self, x, t):
            return self.shared(self.shared(x))

    with pytest.raises(ValueError, match="once per forward pass"):
        per_layer_grads(Twice(), torch.zeros(2, 1, 4), torch.zeros(2, 1), torch.zeros(2, 1, 4))

    class InPlace(torch.nn.Module):  # a layer output changed in place afterwards (an inplace activation)
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(4, 4)

        def forward(self, x, t):
            return torch.nn.functional.relu(self.linear(x), inplace=True)

    with pytest.raises(ValueError, match="of layer 'linear' is modified in place"):
        per_layer_grads(InPlace(), torch.ones(2, 1, 4), torch.zeros(2, 1), torch.zeros(2, 1, 4))


def test_clipped_per_sample_gradients_never_exceed_the_norm():
    """Real model, real per-sample gradients, Opacus' own clipping."""
    from opacus.optimizers import DPOptimizer

    model = perturbed_unet(3)
    data = load_dataset(DataConfig(dataset="embedded-mnist", limit=12))
    x_t, t, eps = draw_noisy_inputs(make_scheduler(DiffusionConfig()), data.images, 2,
                                    torch.Generator().manual_seed(2))
    grads, _ = per_layer_grads(model, x_t, t, eps)  # the default engine
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in grads.values()], 1).norm(dim=1)
    clip = float(norms.median())  # half the images are above the norm, so clipping really acts
    optimizer = DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=0.0, max_grad_norm=clip,
                            expected_batch_size=1)
    clipped_norms = []
    for i in range(len(x_t)):
        optimizer.zero_grad()
        for name, p in model.named_parameters():
            p.grad_sample = grads[name][i:i + 1]
        optimizer.clip_and_accumulate()
        clipped_norms.append(float(torch.cat([p.summed_grad.flatten() for p in model.parameters()]).norm()))
    clipped = torch.tensor(clipped_norms)
    assert (clipped <= clip * (1 + 1e-5)).all()
    above = norms > clip
    assert above.any() and torch.allclose(clipped[above], torch.full_like(clipped[above], clip), rtol=1e-4)
    assert torch.allclose(clipped[~above], norms[~above], rtol=1e-4)


def tiny_set(n):
    data = load_dataset(DataConfig(dataset="embedded-mnist", limit=max(n, 1)))
    return ImageDataset(data.images[:n], data.labels[:n], f"{n} images")


@pytest.mark.parametrize("n,batch", [(1, 64), (3, 64), (2, 1)])
def test_tiny_datasets_and_empty_poisson_batches(n, batch):
    data = tiny_set(n)
    plan = plan_noise(n, batch, 6, 2, target_epsilon=10.0, delta=1e-3, accountant="rdp")
    assert plan.sample_rate == pytest.approx(1.0 if n <= batch else batch / n)
    empties = 0
    for _ in range(6):  # with n=2, batch=1 (q=0.5) an empty batch has probability 1/4 per step
        model = build_unet("micro", 1)
        done = train_private(model, data, plan, batch_size=batch, lr=1e-3, local_epochs=6, max_grad_norm=1.0,
                             noise_multiplicity=1, engine="layers", scheduler=make_scheduler(DiffusionConfig()),
                             device=torch.device("cpu"))
        assert done.steps == plan.steps_per_round == 6 * (1 if n <= batch else n // batch)
        assert all(np.isfinite(v).all() for v in (p.detach().numpy() for p in model.parameters()))
        empties += done.empty_batches
        if n > batch and empties:
            break
    if n > batch:
        assert empties > 0, "no empty Poisson batch was drawn in 36 steps at q=0.5 (probability 3e-5)"


KILLED_SITE = """
import sys, torch
from medfed.config import from_flat
from medfed.federation.site import fit_site, load_site
from medfed.federation.weights import get_weights
from medfed.models import build_unet
from medfed.federation.policy import simulated_node
cfg = from_flat({"model.preset": "micro", "data.limit": 600, "data.image-size": 28, "data.channels": 1,
                 "train.batch-size": 64, "federation.rounds": 4, "federation.local-epochs": 2,
                 "output.dir": sys.argv[1], "output.name": "killed", "train.device": "cpu",
                 "privacy.site-state-root": sys.argv[2], "privacy.site-cap-epsilon": "100"})
site = load_site(cfg, simulated_node(cfg, 0, 1))
torch.manual_seed(0)
fit_site(get_weights(build_unet("micro", 1)), cfg, site, int(sys.argv[3]), run_id=1)
print("finished", flush=True)
"""


@pytest.mark.slow  # two site processes, each importing torch and training
def test_killed_and_restarted_site_keeps_its_spent_budget(tmp_path):
    state_root = tmp_path / "state"
    script = tmp_path / "site.py"
    script.write_text(KILLED_SITE)
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path), str(state_root), "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 120
    ledger_files = []
    while not ledger_files:  # the spend is committed before training starts
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline
        ledger_files = list(state_root.glob("*/privacy-ledger.jsonl"))
        time.sleep(0.2)
    time.sleep(1.0)
    os.killpg(proc.pid, signal.SIGKILL)  # the site dies mid-training
    proc.wait()
    ledger = Ledger(ledger_files[0])
    entries = ledger.entries()
    assert [e.kind for e in entries] == ["round"]
    spent_after_kill = entries[-1].data["epsilon"]
    # the restarted site continues from the ledger: its next round composes on top of the first
    done = subprocess.run([sys.executable, str(script), str(tmp_path), str(state_root), "2"], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    entries = ledger.entries()
    assert [e.data["round"] for e in entries] == [1, 2]
    assert entries[1].data["epsilon"] > spent_after_kill
    plan_step = (entries[0].data["noise_multiplier"], entries[0].data["sample_rate"], entries[0].data["steps"])
    assert entries[1].data["epsilon"] == pytest.approx(epsilon([plan_step] * 2, 1e-5, "rdp"), abs=1e-9)
