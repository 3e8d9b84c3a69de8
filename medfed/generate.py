"""Sampling images from a saved checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch

from medfed.checkpoint import Checkpoint, load_checkpoint
from medfed.devices import resolve_device
from medfed.diffusion import sample_images
from medfed.images import save_grid, save_png
from medfed.models import build_unet


def load_model(path: str | Path, device: torch.device) -> tuple[torch.nn.Module, Checkpoint]:
    """Build the checkpoint's UNet with its sampling weights (EMA when kept), on ``device``, in eval mode."""
    ckpt = load_checkpoint(path)
    model = build_unet(ckpt.config.model.preset, ckpt.image_shape[0])
    model.load_state_dict(ckpt.sampling_weights())
    return model.to(device).eval(), ckpt


def generate_from_checkpoint(
    checkpoint: str | Path,
    num: int,
    out: str | Path | None = None,
    sampler: str | None = None,
    steps: int | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    device: str = "auto",
    precision: str = "auto",
    compile: bool = False,
) -> Path:
    """Write ``num`` generated images as ``00000.png``... and ``grid.png`` (up to 256 images) to ``out``.

    ``batch_size`` None picks ``default_batch_size`` for the device (64 on the CPU, up to 1024 on a GPU);
    ``precision`` and ``compile`` are the speed switches of ``medfed.diffusion.sampling.noise_predictor``.

    Returns:
        The output folder (default: ``<run>/samples/<checkpoint stem>/`` beside the checkpoint's run).
    """
    checkpoint = Path(checkpoint)
    dev = resolve_device(device)
    model, ckpt = load_model(checkpoint, dev)
    images = sample_images(model, ckpt.config.diffusion, num, ckpt.image_shape, device=dev, seed=seed,
                           batch_size=batch_size, sampler=sampler, steps=steps, show_progress=True,
                           precision=precision, compile=compile)
    folder = Path(out) if out else checkpoint.parent.parent / "samples" / checkpoint.stem
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        save_png(image, folder / f"{i:05d}.png")
    save_grid(images[:256], folder / "grid.png")
    return folder
