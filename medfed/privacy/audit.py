"""Empirical privacy audit: a membership-inference attack on a trained diffusion model, run at the site.

The attacker holds the model and two sets of images from one distribution: the site's training images
(members) and images the model never saw (held-out). Each image gets a score; lower means "looks trained on":

``loss``
    The loss-threshold attack (Yeom et al. 2018; Matsumoto et al. 2023 for diffusion models): the DDPM
    denoising error ``|| eps_theta(x_t, t) - eps ||^2`` at each chosen timestep t, averaged over ``draws`` fixed
    noise draws per image and over the timesteps (for a ``v_prediction`` model, the error of the velocity: the
    model's own training loss).
``pia``
    Proximal initialization (PIA, Kong et al. 2023), the deterministic cousin of SecMI: the noise is the model's
    own prediction at t = 0, ``eps_0 = eps_theta(x_0, 0)``; ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps_0`` and
    the score is ``|| eps_theta(x_t, t) - eps_0 ||^2``, averaged over the timesteps. Two network calls per t. A
    ``v_prediction`` model's noise estimate is read from its velocity (``medfed.diffusion.ddpm.predicted_noise``)
    and its score is the error of the velocity of (x_0, eps_0).

From the scores: the attack's ROC AUC, its TPR at 1% and 10% FPR, and the empirical epsilon lower bound it
implies. An (epsilon, delta)-DP mechanism bounds every membership test (Kairouz et al. 2015):
``TPR <= e^eps FPR + delta`` and ``1 - FPR <= e^eps (1 - TPR) + delta``. With one-sided Clopper-Pearson bounds
(TPR from below, FPR from above) at every threshold, in both directions (low or high scores called members), of
every attack, each at ``(1 - confidence) / (2 x tests)`` (a union bound, so the maximum over all of them holds at
``confidence``), the bound is ``max(log((TPR_lo - delta) / FPR_hi), log((1 - FPR_hi - delta) / (1 - TPR_lo)), 0)``.

It treats each image as one trial, as audits with one training run do (Steinke, Nasr & Jagielski 2023); that
reading is exact when members were drawn at random from a pool that also gave the held-out images. At a few
images per side the bound is 0 even for a perfect attack: small N proves little, honestly.

The outputs are numbers only (counts, AUC, rates, epsilons): no image, no per-image score leaves this module.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.networks.schedulers import DDPMScheduler
from scipy.stats import beta, rankdata
from torch import nn

from medfed.datasets import ImageDataset
from medfed.diffusion.ddpm import (
    condition_labels,
    denoising_error,
    predict_noise,
    predicted_noise,
    regression_target,
)
from medfed.errors import ConfigError, MedfedError

ATTACKS = ("loss", "pia")
FPR_LEVELS = (0.01, 0.1)


@dataclass(frozen=True)
class AuditOptions:
    """How the attack scores each image.

    Attributes:
        timesteps: diffusion steps t in [0, T) at which images are scored; scores average over them.
        draws: fixed noise draws per image and timestep of the loss attack.
        seed: seeds the noise draws (image i of a set always gets the same noise, whatever the batch size).
        batch_size: images per network call.
        delta: the delta of the empirical bound (use the accountant's).
        confidence: confidence of the Clopper-Pearson lower bound, over all thresholds, directions and attacks.
    """

    timesteps: tuple[int, ...] = (50, 100, 200)
    draws: int = 4
    seed: int = 0
    batch_size: int = 64
    delta: float = 1e-5
    confidence: float = 0.95


@dataclass(frozen=True)
class AttackResult:
    """One attack's numbers.

    Attributes:
        attack: ``loss`` or ``pia``.
        auc: ROC AUC of "lower score = member" (0.5 = chance, 1 = every member scores below every held-out image).
        tpr_at_fpr: ``{"0.01": TPR, "0.1": TPR}``: the best TPR among thresholds whose FPR is at most that level.
        epsilon_lower_bound: the empirical lower bound on epsilon at ``delta`` and ``confidence`` (>= 0).
        tpr_lower, fpr_upper: the Clopper-Pearson bounds at the threshold (and direction) that gave the bound.
    """

    attack: str
    auc: float
    tpr_at_fpr: dict[str, float]
    epsilon_lower_bound: float
    tpr_lower: float
    fpr_upper: float


@dataclass(frozen=True)
class ProvenEpsilon:
    """The accountant's epsilon for the audited model, where a record gives it; ``epsilon`` None = not available."""

    epsilon: float | None
    delta: float | None
    source: str


@dataclass(frozen=True)
class AuditResult:
    """An audit's numbers: image counts per side, each attack, the overall bound, the accountant's epsilon."""

    members: int
    held_out: int
    attacks: tuple[AttackResult, ...]
    epsilon_lower_bound: float
    """The largest bound over the attacks (already corrected for trying them all)."""
    proven: ProvenEpsilon
    options: AuditOptions


def _noise(seed: int, part: int, index: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The fixed noise of image ``index`` of set ``part`` (0 members, 1 held-out): independent of batching."""
    state = int(np.random.SeedSequence([seed, part, index]).generate_state(1, dtype=np.uint64)[0])
    generator = torch.Generator().manual_seed(state >> 1)
    return torch.randn(shape, generator=generator)


@torch.no_grad()
def attack_scores(model: nn.Module, scheduler: DDPMScheduler, data: ImageDataset, options: AuditOptions,
                  part: int, device: torch.device) -> dict[str, np.ndarray]:
    """Per-image scores of every attack, ``{attack: (N,) float64}``; lower = more likely a member.

    Args:
        model: the UNet in eval mode on ``device``.
        data: images (N, C, H, W) in [-1, 1] and their labels (used by class-conditional models only).
        part: 0 for members, 1 for held-out images (selects their fixed noise).
    """
    num_classes = max(0, int(getattr(model, "num_class_embeds", None) or 0) - 1)
    scores: dict[str, list[torch.Tensor]] = {a: [] for a in ATTACKS}
    for start in range(0, len(data), options.batch_size):
        x0 = data.images[start:start + options.batch_size].to(device)
        b = len(x0)
        labels = condition_labels(data.labels[start:start + b].to(device), num_classes, 0.0, None)
        noise = torch.stack([_noise(options.seed, part, start + i, (options.draws, *x0.shape[1:]))
                             for i in range(b)], 1).to(device)  # (K, B, C, H, W)
        zero = torch.zeros(b, dtype=torch.long, device=device)
        eps0 = predicted_noise(scheduler, predict_noise(model, x0, zero, labels).float(), x0, zero)
        loss = torch.zeros(b, device=device)
        pia = torch.zeros(b, device=device)
        for t in options.timesteps:
            tt = torch.full((b,), t, dtype=torch.long, device=device)
            for k in range(options.draws):
                x_t = scheduler.add_noise(original_samples=x0, noise=noise[k], timesteps=tt)
                loss += denoising_error(predict_noise(model, x_t, tt, labels),
                                        regression_target(scheduler, x0, noise[k], tt))
            x_t = scheduler.add_noise(original_samples=x0, noise=eps0, timesteps=tt)
            pia += denoising_error(predict_noise(model, x_t, tt, labels), regression_target(scheduler, x0, eps0, tt))
        scores["loss"].append(loss.cpu() / (len(options.timesteps) * options.draws))
        scores["pia"].append(pia.cpu() / len(options.timesteps))
    return {a: torch.cat(s).double().numpy() for a, s in scores.items()}


def roc_counts(members: np.ndarray, held_out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """True and false positives of "member when score <= threshold", at every threshold that changes them.

    Returns:
        ``(tp, fp)``, each (M,) int, from the empty prediction (0, 0) to everything predicted member.
    """
    thresholds = np.unique(np.concatenate([members, held_out]))
    tp = np.searchsorted(np.sort(members), thresholds, side="right")
    fp = np.searchsorted(np.sort(held_out), thresholds, side="right")
    return np.concatenate([[0], tp]), np.concatenate([[0], fp])


def roc_auc(members: np.ndarray, held_out: np.ndarray) -> float:
    """P(member score < held-out score) + P(equal) / 2: the Mann-Whitney form of the ROC AUC."""
    ranks = rankdata(np.concatenate([members, held_out]))  # ties share their mean rank
    n_m, n_h = len(members), len(held_out)
    return float((ranks[n_m:].sum() - n_h * (n_h + 1) / 2) / (n_m * n_h))


def tpr_at_fpr(tp: np.ndarray, fp: np.ndarray, members: int, held_out: int, level: float) -> float:
    """The best TPR among thresholds whose FPR is at most ``level`` (FPR 0 when ``level`` < 1 / held_out)."""
    ok = fp / held_out <= level + 1e-12
    return float((tp[ok] / members).max())


def clopper_pearson(k: np.ndarray | int, n: int, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """One-sided exact binomial bounds for ``k`` successes in ``n`` trials: each holds with probability
    ``1 - alpha``. Returns ``(lower, upper)`` (lower 0 at k = 0, upper 1 at k = n)."""
    k = np.asarray(k, dtype=np.float64)
    lower = np.where(k > 0, beta.ppf(alpha, np.maximum(k, 1), n - k + 1), 0.0)
    upper = np.where(k < n, beta.ppf(1 - alpha, k + 1, np.maximum(n - k, 1)), 1.0)
    return lower, upper


def epsilon_lower_bound(tp: np.ndarray, fp: np.ndarray, members: int, held_out: int, delta: float,
                        alpha: float) -> tuple[float, float, float]:
    """The largest epsilon that the (TPR, FPR) pairs prove, with each Clopper-Pearson bound at level ``alpha``.

    Returns:
        ``(epsilon, tpr_lower, fpr_upper)`` at the best threshold; epsilon 0 when nothing is proven.
    """
    tpr_lo, _ = clopper_pearson(tp, members, alpha)
    _, fpr_hi = clopper_pearson(fp, held_out, alpha)
    with np.errstate(divide="ignore", invalid="ignore"):
        direct = np.where(tpr_lo > delta, np.log((tpr_lo - delta) / fpr_hi), 0.0)
        symmetric = np.where(1 - fpr_hi > delta, np.log((1 - fpr_hi - delta) / (1 - tpr_lo)), 0.0)
    eps = np.maximum(np.maximum(direct, symmetric), 0.0)
    best = int(np.argmax(eps))
    return float(eps[best]), float(tpr_lo[best]), float(fpr_hi[best])


def analyse(scores: dict[str, tuple[np.ndarray, np.ndarray]], delta: float,
            confidence: float) -> tuple[AttackResult, ...]:
    """AUC, TPR at :data:`FPR_LEVELS` and the epsilon lower bound of each attack from ``{attack: (member scores,
    held-out scores)}``.

    AUC and TPRs read "lower score = member", as the attacks are published. The bound tries both directions (a
    higher score may mark members instead: PIA does on small overfit models), with the union bound spread over
    every threshold of both directions of every attack.
    """
    counts = {(a, sign): roc_counts(sign * m, sign * h) for a, (m, h) in scores.items() for sign in (1, -1)}
    alpha = (1 - confidence) / (2 * sum(len(tp) for tp, _ in counts.values()))
    results = []
    for attack, (m, h) in scores.items():
        bounds = [epsilon_lower_bound(*counts[attack, sign], len(m), len(h), delta, alpha) for sign in (1, -1)]
        eps, tpr_lo, fpr_hi = max(bounds)
        tp, fp = counts[attack, 1]
        results.append(AttackResult(attack=attack, auc=roc_auc(m, h),
                                    tpr_at_fpr={f"{lv:g}": tpr_at_fpr(tp, fp, len(m), len(h), lv)
                                                for lv in FPR_LEVELS},
                                    epsilon_lower_bound=eps, tpr_lower=tpr_lo, fpr_upper=fpr_hi))
    return tuple(results)


def check_options(options: AuditOptions, scheduler: DDPMScheduler) -> None:
    """Raise :class:`ConfigError` naming the option for timesteps outside the schedule or empty settings."""
    steps = scheduler.num_train_timesteps
    if not options.timesteps or any(not 0 < t < steps for t in options.timesteps):
        raise ConfigError(f"--timesteps {','.join(map(str, options.timesteps))}: each must be in 1..{steps - 1} "
                          f"(the model's diffusion.timesteps is {steps})")
    if options.draws < 1 or options.batch_size < 1:
        raise ConfigError("--draws and --batch-size must be >= 1")
    if not 0 < options.confidence < 1 or not 0 <= options.delta < 1:
        raise ConfigError("--confidence must be in (0, 1) and --delta in [0, 1)")


def image_digests(data: ImageDataset) -> set[str]:
    """SHA-256 of each image's pixels, to find images present on both sides."""
    return {hashlib.sha256(image.contiguous().numpy().tobytes()).hexdigest() for image in data.images.cpu()}


def audit_model(model: nn.Module, scheduler: DDPMScheduler, members: ImageDataset, held_out: ImageDataset,
                options: AuditOptions, device: torch.device,
                proven: ProvenEpsilon | None = None) -> AuditResult:
    """Attack ``model`` with its training images ``members`` against unseen ``held_out`` images.

    Args:
        model: the UNet in eval mode on ``device``.
        members, held_out: (N, C, H, W) images in [-1, 1] of the model's image shape; at least 1 each.
        proven: the accountant's epsilon for this model, reported next to the empirical bound.
    """
    check_options(options, scheduler)
    for name, data in (("members", members), ("held-out", held_out)):
        if len(data) == 0:
            raise MedfedError(f"{name} images ({data.name}): none to audit")
    shared = image_digests(members) & image_digests(held_out)
    if shared:
        raise MedfedError(f"held-out images ({held_out.name}): {len(shared)} of them are also among the members "
                          f"({members.name}); give images the model never saw")
    member_scores = attack_scores(model, scheduler, members, options, 0, device)
    held_scores = attack_scores(model, scheduler, held_out, options, 1, device)
    attacks = analyse({a: (member_scores[a], held_scores[a]) for a in ATTACKS}, options.delta, options.confidence)
    return AuditResult(members=len(members), held_out=len(held_out), attacks=attacks,
                       epsilon_lower_bound=max(a.epsilon_lower_bound for a in attacks),
                       proven=proven or ProvenEpsilon(None, None, "no accountant record given"), options=options)


def proven_epsilon(checkpoint: Path, ledger: Path | None, site: str | None) -> ProvenEpsilon:
    """The accountant's epsilon for a checkpoint: from the site's ledger (recomputed from its verified history),
    else from the run's ``summary.json`` beside ``checkpoints/`` (each site's own accountant); else not available."""
    from medfed.privacy.report import from_ledger

    if ledger is not None:
        report = from_ledger(ledger)
        if not report.rows:
            return ProvenEpsilon(None, None, f"ledger {ledger}: no round recorded")
        return ProvenEpsilon(report.spent, report.rows[-1]["delta"], f"ledger {ledger} (recomputed)")
    summary_path = checkpoint.resolve().parent.parent / "summary.json"
    if not summary_path.is_file():
        return ProvenEpsilon(None, None, "no ledger given and no run summary.json beside the checkpoint")
    privacy = json.loads(summary_path.read_text()).get("privacy") or {}
    sites = privacy.get("sites") or {}
    if privacy.get("label") == "NOT PRIVATE" or not sites:
        return ProvenEpsilon(None, None, f"{summary_path}: the run records no privacy accounting")
    if site is None and len(sites) != 1:
        raise ConfigError(f"{summary_path} holds several sites ({', '.join(sorted(sites))}): pass --site")
    name = site or next(iter(sites))
    if name not in sites:
        raise ConfigError(f"--site {name}: not in {summary_path} ({', '.join(sorted(sites))})")
    return ProvenEpsilon(float(sites[name]["epsilon"]), sites[name].get("delta"),
                         f"{summary_path}, site {name} (its own accountant)")


def to_json(result: AuditResult, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The audit's JSON record: counts, options, every attack's numbers, the bound and the proven epsilon."""
    return {"members": result.members, "held_out": result.held_out, "options": asdict(result.options),
            "attacks": [asdict(a) for a in result.attacks], "epsilon_lower_bound": result.epsilon_lower_bound,
            "proven_epsilon": asdict(result.proven), **(extra or {})}


def table(result: AuditResult) -> str:
    """A short plain-text table: one row per attack, then the bound next to the accountant's epsilon."""
    o = result.options
    head = f"{'attack':<6} {'AUC':>6} {'TPR@1%FPR':>10} {'TPR@10%FPR':>11} {'eps lower bound':>16}"
    rows = [f"{a.attack:<6} {a.auc:6.3f} {a.tpr_at_fpr['0.01']:10.3f} {a.tpr_at_fpr['0.1']:11.3f} "
            f"{a.epsilon_lower_bound:16.3f}" for a in result.attacks]
    p = result.proven
    proven = (f"{p.epsilon:.4f} at delta {p.delta:g} ({p.source})" if p.epsilon is not None
              else f"not available ({p.source})")
    return "\n".join([
        f"{result.members} members vs {result.held_out} held-out images; timesteps "
        f"{','.join(map(str, o.timesteps))}, {o.draws} draws, seed {o.seed}; "
        "AUC and TPR read lower score = member",
        head, *rows,
        f"empirical epsilon lower bound: {result.epsilon_lower_bound:.3f} (delta {o.delta:g}, "
        f"{o.confidence:.0%} Clopper-Pearson over all thresholds, directions and attacks)",
        f"accountant's epsilon: {proven}",
    ])


def parse_timesteps(text: str) -> tuple[int, ...]:
    """``"50,100,200"`` -> (50, 100, 200)."""
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError as err:
        raise ConfigError(f"--timesteps '{text}': not a comma-separated list of integers") from err



@dataclass(frozen=True)
class ImageSource:
    """Where one side's images come from; empty fields take the checkpoint's training data (``data.*``).

    Attributes:
        dataset, path, split: as ``data.dataset``, ``data.path``, ``data.split``.
        limit: at most this many images (seeded shuffle with ``train.seed``, as training); -1 = the checkpoint's
            ``data.limit``, 0 = all.
    """

    dataset: str = ""
    path: str = ""
    split: str = ""
    limit: int = -1


def load_images(source: ImageSource, ckpt: Any) -> ImageDataset:
    """The images of ``source`` shaped like the checkpoint's training images (channels, side length)."""
    import dataclasses

    from medfed.datasets import load_dataset

    base = ckpt.config.data
    cfg = dataclasses.replace(base, dataset=source.dataset or base.dataset, path=source.path or base.path,
                              split=source.split or base.split, limit=base.limit if source.limit < 0 else source.limit,
                              channels=ckpt.image_shape[0], image_size=ckpt.image_shape[1], site_paths="")
    return load_dataset(cfg, seed=ckpt.config.train.seed)


def run_audit(checkpoint: Path, members: ImageSource, held_out: ImageSource, options: AuditOptions, *,
              ledger: Path | None, site: str | None, device: str, out: Path | None) -> tuple[AuditResult, Path]:
    """``medfed privacy audit``: load the checkpoint and both image sets, attack, write the JSON record.

    ``options.delta`` < 0 takes the accountant's delta (1e-5 when none is recorded). Returns the result and the
    JSON path (default: ``<checkpoint>.audit.json`` beside the checkpoint).
    """
    import dataclasses

    from medfed.devices import describe_machine, resolve_device
    from medfed.diffusion import make_scheduler
    from medfed.generate import load_model

    dev = resolve_device(device)
    model, ckpt = load_model(checkpoint, dev)
    proven = proven_epsilon(checkpoint, ledger, site)
    if options.delta < 0:
        options = dataclasses.replace(options, delta=proven.delta if proven.delta is not None else 1e-5)
    result = audit_model(model, make_scheduler(ckpt.config.diffusion), load_images(members, ckpt),
                         load_images(held_out, ckpt), options, dev, proven)
    path = out or checkpoint.with_name(checkpoint.stem + ".audit.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    record = to_json(result, {"checkpoint": str(checkpoint), "members_source": asdict(members),
                              "held_out_source": asdict(held_out), "machine": describe_machine()})
    path.write_text(json.dumps(record, indent=2) + "\n")
    return result, path
