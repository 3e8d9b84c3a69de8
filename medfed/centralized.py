"""Centralized DDPM training: the paper's non-federated baseline, and the loop the demo runs on one machine.

Randomness is a pure function of ``(train.seed, step)``: the images of step s and its label dropout, timesteps and
noise come from generators seeded by the step, so a run resumed from a checkpoint continues exactly as it would
have. Each step is :func:`medfed.diffusion.train_step`, the one a site's non-private round takes.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from medfed.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from medfed.config import RunConfig
from medfed.datasets import ImageDataset, load_dataset
from medfed.devices import resolve_device
from medfed.diffusion import StepOptions, check_labels, make_scheduler, sample_images, train_step
from medfed.diffusion.sampling import class_rows
from medfed.images import save_grid
from medfed.models import build_unet, count_parameters, ema_update, warmup_decay
from medfed.progress import progress_bar
from medfed.runs import RunDir, open_run


@dataclass(frozen=True)
class TrainResult:
    run: RunDir
    steps: int
    first_loss: float
    last_loss: float
    grid: Path


def batch_indices(num_images: int, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """Indices of the images used at ``step``: epochs of seeded permutations, last partial batch dropped."""
    per_epoch = max(1, num_images // batch_size)
    epoch, offset = divmod(step, per_epoch)
    perm = torch.randperm(num_images, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return perm[offset * batch_size:(offset + 1) * batch_size]


def step_generator(device: torch.device, seed: int, step: int) -> torch.Generator:
    """The generator of timesteps and noise for one step."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + step + 1)


def train_centralized(cfg: RunConfig, show_progress: bool = True) -> TrainResult:
    """Train a DDPM on one machine, writing checkpoints, ``metrics.jsonl`` and sample grids to the run folder."""
    run = open_run(cfg)
    device = resolve_device(cfg.train.device)
    data: ImageDataset = load_dataset(cfg.data, seed=cfg.train.seed)
    torch.manual_seed(cfg.train.seed)
    check_labels(data.labels, cfg.model.num_classes, f"dataset {data.name}")
    model = build_unet(cfg.model.preset, data.image_shape[0], cfg.model.num_classes).to(device)
    ema = copy.deepcopy(model).requires_grad_(False) if cfg.train.ema_decay > 0 else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
    scheduler = make_scheduler(cfg.diffusion)
    options = StepOptions.from_config(cfg, device)
    batch_size = min(cfg.train.batch_size, len(data))

    start = 0
    if cfg.output.resume:
        ckpt = load_checkpoint(run.latest_checkpoint)
        model.load_state_dict(ckpt.model)
        if ema is not None and ckpt.ema is not None:
            ema.load_state_dict(ckpt.ema)
        if ckpt.optimizer is not None:
            optimizer.load_state_dict(ckpt.optimizer)
        start = ckpt.step

    def checkpoint(step: int) -> None:
        ckpt = Checkpoint(model=model.state_dict(), config=cfg, image_shape=data.image_shape, step=step,
                          ema=ema.state_dict() if ema is not None else None, optimizer=optimizer.state_dict(),
                          extra={"kind": "centralized", "dataset": data.name})
        save_checkpoint(ckpt, run.checkpoints / f"step_{step:07d}.pt")
        save_checkpoint(ckpt, run.latest_checkpoint)

    def write_samples(step: int) -> Path:
        classes = cfg.model.num_classes  # conditional: one row per class (num-samples rounded up to fill rows)
        labels = class_rows(cfg.train.num_samples, classes) if classes else None
        num = cfg.train.num_samples if labels is None else len(labels)
        images = sample_images(ema or model, cfg.diffusion, num, data.image_shape, device=device,
                               seed=cfg.train.seed, class_labels=labels)
        return save_grid(images, run.samples / f"step_{step:07d}.png", nrow=num // classes if classes else None)

    if start == 0:
        run.append_metrics({"event": "start", "parameters": count_parameters(model), "images": len(data),
                            "dataset": data.name, "device": str(device)})
    losses: list[float] = []
    first_loss = last_loss = float("nan")
    window_start = time.perf_counter()
    grid = None
    model.train()
    with progress_bar("training", total=cfg.train.steps, enabled=show_progress) as advance:
        advance(start)
        for step in range(start, cfg.train.steps):
            index = batch_indices(len(data), batch_size, cfg.train.seed, step)
            loss = train_step(model, optimizer, scheduler, data.images[index].to(device),
                              data.labels[index].to(device), step_generator(device, cfg.train.seed, step), options)
            if ema is not None:
                ema_update(ema, model, warmup_decay(step, cfg.train.ema_decay))
            losses.append(loss)
            done = step + 1
            if done % cfg.train.log_every == 0 or done == cfg.train.steps:
                elapsed = time.perf_counter() - window_start
                last_loss = sum(losses) / len(losses)
                if first_loss != first_loss:  # NaN: first window
                    first_loss = last_loss
                run.append_metrics({"step": done, "loss": last_loss,
                                    "images_per_s": len(losses) * batch_size / max(elapsed, 1e-9)})
                losses, window_start = [], time.perf_counter()
            if done % cfg.train.checkpoint_every == 0 or done == cfg.train.steps:
                checkpoint(done)
            if done % cfg.train.sample_every == 0 or done == cfg.train.steps:
                grid = write_samples(done)
            advance(loss=last_loss)
    if grid is None:  # resumed a finished run: nothing trained, still leave a grid
        grid = write_samples(start)
    summary = {"steps": cfg.train.steps, "first_loss": first_loss, "last_loss": last_loss,
               "checkpoint": str(run.latest_checkpoint), "samples": str(grid), "dataset": data.name,
               "parameters": count_parameters(model)}
    run.write_json(run.summary_path, summary)
    return TrainResult(run=run, steps=cfg.train.steps, first_loss=first_loss, last_loss=last_loss, grid=grid)
