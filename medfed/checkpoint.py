"""Saving and loading model checkpoints (atomic writes, safe ``weights_only`` loading, one-line errors)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from medfed import __version__
from medfed.config import RunConfig, from_dict, to_dict
from medfed.errors import CheckpointError, ConfigError

FORMAT = "medfed-checkpoint/1"


@dataclass
class Checkpoint:
    """Everything needed to resume training or to sample.

    Attributes:
        model: the network's ``state_dict`` (plain module keys, never Opacus ``_module.`` ones).
        config: the run's configuration.
        image_shape: (C, H, W) of the training images.
        step: optimizer steps done (centralized) or rounds done (federated).
        ema: EMA weights, when kept.
        optimizer: optimizer state, when resumable.
        extra: run-specific state (e.g. RNG state, privacy summary), JSON-like values and tensors only.
    """

    model: dict[str, torch.Tensor]
    config: RunConfig
    image_shape: tuple[int, int, int]
    step: int
    ema: dict[str, torch.Tensor] | None = None
    optimizer: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def sampling_weights(self) -> dict[str, torch.Tensor]:
        """The weights to sample with: EMA when kept, else the raw model."""
        return self.ema if self.ema is not None else self.model


def save_checkpoint(ckpt: Checkpoint, path: str | Path) -> Path:
    """Write ``ckpt`` atomically (temporary file, then rename), so a crash never leaves half a checkpoint."""
    payload = {
        "format": FORMAT,
        "medfed_version": __version__,
        "model": ckpt.model,
        "config": to_dict(ckpt.config),
        "image_shape": list(ckpt.image_shape),
        "step": ckpt.step,
        "ema": ckpt.ema,
        "optimizer": ckpt.optimizer,
        "extra": ckpt.extra,
    }
    return save_atomic(payload, path)


def save_atomic(payload: dict[str, Any], path: str | Path) -> Path:
    """``torch.save`` to a temporary file, then rename: a crash never leaves half a file at ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def load_payload(path: str | Path, fmt: str, what: str) -> dict[str, Any]:
    """Safely load (``weights_only``) a medfed file whose ``format`` marker is ``fmt``.

    Raises:
        CheckpointError: missing, truncated or foreign files, naming the path and the problem.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"{path}: {what} file does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for corrupt files
        reason = (str(err).strip().splitlines() or [""])[0][:200]  # torch's messages run to many lines
        raise CheckpointError(f"{path}: not a readable {what} ({type(err).__name__}: {reason})") from err
    if not isinstance(payload, dict) or payload.get("format") != fmt:
        raise CheckpointError(f"{path}: not a medfed {what} (missing format marker '{fmt}')")
    return payload


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Raises:
        CheckpointError: missing, truncated or foreign files, naming the path and the problem.
    """
    payload = load_payload(path, FORMAT, "checkpoint")
    try:
        config = from_dict(payload["config"])
        return Checkpoint(
            model=payload["model"],
            config=config,
            image_shape=tuple(payload["image_shape"]),
            step=int(payload["step"]),
            ema=payload.get("ema"),
            optimizer=payload.get("optimizer"),
            extra=payload.get("extra") or {},
        )
    except (KeyError, TypeError, ValueError, ConfigError) as err:
        raise CheckpointError(f"{path}: checkpoint content is incomplete or incompatible ({err})") from err


def require_same_model(ckpt: Checkpoint, cfg: RunConfig, image_shape: tuple[int, int, int] | None, *, key: str,
                       path: str | Path) -> None:
    """Refuse to continue from ``ckpt`` (named by config ``key``: ``federation.init-checkpoint`` or
    ``output.resume``) unless it is ``cfg``'s model: same preset, image shape (C, H, W; None: not compared),
    classes, noise schedule and what the network predicts. Weights of another schedule or parameterisation load
    without error and are wrong at every step, so each difference is a :class:`ConfigError` naming the key."""
    from medfed.diffusion.ddpm import schedule_args

    ours, theirs = cfg, ckpt.config
    shape_differs = image_shape is not None and tuple(ckpt.image_shape) != tuple(image_shape)
    if theirs.model.preset != ours.model.preset or shape_differs:
        raise ConfigError(f"config key '{key}': {path} is a {theirs.model.preset} model for "
                          f"{tuple(ckpt.image_shape)} images; this run trains {ours.model.preset}"
                          + (f" on {image_shape}" if image_shape else ""))
    if theirs.model.num_classes != ours.model.num_classes:
        raise ConfigError(f"config key '{key}': {path} has model.num-classes = {theirs.model.num_classes}; this run "
                          f"has {ours.model.num_classes}")
    if schedule_args(theirs.diffusion) != schedule_args(ours.diffusion):
        raise ConfigError(f"config key '{key}': {path} was trained with the noise schedule "
                          f"{schedule_args(theirs.diffusion)}; this run has {schedule_args(ours.diffusion)} (set "
                          "diffusion.schedule, diffusion.timesteps and the beta range to the checkpoint's)")
    if theirs.diffusion.prediction != ours.diffusion.prediction:
        raise ConfigError(f"config key '{key}': {path} predicts {theirs.diffusion.prediction}; this run trains "
                          f"diffusion.prediction = {ours.diffusion.prediction} (set it to the checkpoint's)")
