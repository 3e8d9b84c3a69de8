"""All run settings in one typed place.

A :class:`RunConfig` is a tree of frozen dataclasses. It flattens to ``section.key-name`` scalars, which is the
form Flower's run config uses (``[tool.flwr.app.config]`` and ``flwr run --run-config``) and the form the CLI's
``--set section.key=value`` overrides use, so every entry point parses the same keys the same way.
"""

from __future__ import annotations

import dataclasses
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
    """Dataset name: ``embedded-mnist``, ``mnist``, ``fashion-mnist``, ``cifar10``, ``svhn``, ``npz`` or ``folder``."""
    path: str = ""
    """Root folder (torchvision datasets, image folders) or file (``.npz``); unused by ``embedded-mnist``."""
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


@dataclass(frozen=True)
class ModelConfig:
    """The denoising UNet."""

    preset: str = "tiny"
    """UNet preset from :data:`medfed.models.unet.PRESETS` (``micro``, ``tiny``, ``small``, ``paper``)."""


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
    ]
    for ok, key, message in checks:
        if not ok:
            raise ConfigError(f"config key '{key}' {message}")
