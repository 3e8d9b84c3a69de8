"""Sampling images from a saved checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch

from medfed.checkpoint import Checkpoint, load_checkpoint
from medfed.devices import resolve_device
from medfed.diffusion import sample_images
from medfed.diffusion.sampling import class_rows
from medfed.errors import ConfigError
from medfed.images import save_grid, save_png
from medfed.models import build_unet


def load_model(path: str | Path, device: torch.device) -> tuple[torch.nn.Module, Checkpoint]:
    """Build the checkpoint's UNet with its sampling weights (EMA when kept), on ``device``, in eval mode."""
    ckpt = load_checkpoint(path)
    model = build_unet(ckpt.config.model.preset, ckpt.image_shape[0], ckpt.config.model.num_classes)
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
    class_name: str | None = None,
    guidance: float | None = None,
) -> Path:
    """Write ``num`` generated images as ``00000.png``... and ``grid.png`` (up to 256 images) to ``out``.

    ``batch_size`` None picks ``default_batch_size`` for the device (64 on the CPU, up to 1024 on a GPU);
    ``precision`` and ``compile`` are the speed switches of ``medfed.diffusion.sampling.noise_predictor``.
    Class-conditional checkpoints: ``class_name`` (a name of the run's ``data.classes`` or an integer ID) draws
    that class only; without it every class is drawn, ``num`` rounded up to a multiple of the class count, one
    class per row of ``grid.png``. ``guidance`` is the classifier-free guidance scale (default: the run's
    ``diffusion.guidance``).

    Returns:
        The output folder (default: ``<run>/samples/<checkpoint stem>/`` beside the checkpoint's run).

    Raises:
        CheckpointError: ``checkpoint`` is missing or not a medfed checkpoint.
        ConfigError: ``num`` < 1, or ``steps`` outside [1, the checkpoint's diffusion.timesteps].
    """
    checkpoint = Path(checkpoint)
    if num < 1:
        raise ConfigError(f"--num {num}: must be >= 1")
    dev = resolve_device(device)
    model, ckpt = load_model(checkpoint, dev)
    timesteps = ckpt.config.diffusion.timesteps
    if steps is not None and not 1 <= steps <= timesteps:
        raise ConfigError(f"--steps {steps}: checkpoint {checkpoint} was trained with {timesteps} diffusion steps "
                          f"(diffusion.timesteps); use 1 to {timesteps}")
    classes = ckpt.config.model.num_classes
    labels, nrow = None, None
    if class_name is not None:
        labels = torch.full((num,), resolve_class(class_name, ckpt, checkpoint), dtype=torch.long)
    elif classes > 0:
        labels = class_rows(num, classes)
        num, nrow = len(labels), len(labels) // classes
    images = sample_images(model, ckpt.config.diffusion, num, ckpt.image_shape, device=dev, seed=seed,
                           batch_size=batch_size, sampler=sampler, steps=steps, show_progress=True,
                           precision=precision, compile=compile, class_labels=labels, guidance=guidance)
    folder = Path(out) if out else checkpoint.parent.parent / "samples" / checkpoint.stem
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        save_png(image, folder / f"{i:05d}.png")
    if labels is not None:  # per-image classes, for `medfed evaluate utility --generated` (file,label as data.labels-csv)
        (folder / "labels.csv").write_text("file,label\n" + "".join(f"{i:05d}.png,{int(y)}\n"
                                                                      for i, y in enumerate(labels)))
    if nrow is not None and nrow * classes > 256:  # keep every class in the grid: its first images only
        images = images.view(classes, nrow, *images.shape[1:])[:, :max(1, 256 // classes)].flatten(0, 1)
        nrow = max(1, 256 // classes)
    save_grid(images[:256], folder / "grid.png", nrow=nrow)
    return folder


def resolve_class(class_name: str, ckpt: Checkpoint, path: str | Path) -> int:
    """The class index of ``--class NAME|ID`` for a checkpoint: a name of the run's ``data.classes``, else an
    integer ID in [0, model.num-classes).

    Raises:
        ConfigError: the checkpoint is unconditional, or the class is neither a known name nor a valid ID.
    """
    classes = ckpt.config.model.num_classes
    if classes == 0:
        raise ConfigError(f"--class: checkpoint {path} is unconditional (model.num-classes = 0)")
    names = list(ckpt.config.data.class_names)
    if class_name.strip() in names:
        return names.index(class_name.strip())
    try:
        index = int(class_name)
    except ValueError:
        index = -1
    if not 0 <= index < classes:
        known = f"names {', '.join(names)} or " if names else ""
        raise ConfigError(f"--class '{class_name}': checkpoint {path} knows {known}IDs 0 to {classes - 1}")
    return index
