"""What runs at a hospital site: find its own images, train the global model locally, return the delta.

Plain functions, independent of Flower, so they are testable and reused by the ClientApp and the studies.
"""

from __future__ import annotations

import dataclasses
import functools
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from medfed.config import DataConfig, RunConfig
from medfed.datasets import ImageDataset, load_dataset
from medfed.devices import resolve_device
from medfed.diffusion import make_scheduler, per_sample_loss
from medfed.errors import ConfigError
from medfed.federation.partition import partition
from medfed.federation.weights import check_arrays, get_weights, set_weights
from medfed.models import build_unet

Scalar = bool | int | float | str


@dataclass(frozen=True)
class Site:
    """A site's view of itself. Nothing here leaves the site except through :class:`LocalUpdate`.

    Attributes:
        name: display name used in metrics (``site-<partition>`` in simulation, ``site-name`` in deployment).
        data: the site's training images.
        state_dir: persistent site-local folder (privacy ledger, accountant), or None.
    """

    name: str
    data: ImageDataset
    state_dir: Path | None


@dataclass(frozen=True)
class LocalUpdate:
    """What a site sends back after a round (before secure-aggregation masking)."""

    delta: list[np.ndarray]
    num_examples: int
    metrics: dict[str, Scalar]


@functools.lru_cache(maxsize=2)
def _load_shared_dataset(cfg: DataConfig, seed: int) -> ImageDataset:
    # Simulation only: every virtual site slices the same dataset; keep one copy per actor process.
    return load_dataset(cfg, seed=seed)


def federated_data_config(cfg: RunConfig) -> DataConfig:
    """The data config sites must share: a fixed image size and channel count, so all updates fit one model."""
    if cfg.data.image_size <= 0 or cfg.data.channels <= 0:
        raise ConfigError("federated runs need data.image-size and data.channels set (the server builds the model "
                          "before any site reports its data)")
    return cfg.data


def site_data_entry(data_cfg: DataConfig, index: int) -> tuple[str, str]:
    """``(format, path)`` of simulated site ``index`` from ``data.site-paths``."""
    entries = [e.strip() for e in data_cfg.site_paths.split(";") if e.strip()]
    if index >= len(entries):
        raise ConfigError(f"config key 'data.site-paths' lists {len(entries)} sites; site {index} has no entry")
    fmt, sep, path = entries[index].partition(":")
    if not sep:
        raise ConfigError(f"config key 'data.site-paths': entry '{entries[index]}' is not format:path")
    return fmt, path


def load_site(cfg: RunConfig, node_config: Mapping[str, Scalar]) -> Site:
    """Resolve a site's data from its node config.

    Deployment: ``data-path`` (and optionally ``data-format``, ``site-name``, ``state-dir``) point at the
    hospital's own folder. Simulation: ``partition-id`` of ``num-partitions`` selects a shard of ``cfg.data``
    split by ``federation.partition``.
    """
    data_cfg = federated_data_config(cfg)
    state_dir = Path(str(node_config["state-dir"])) if node_config.get("state-dir") else None
    if "data-path" in node_config:
        fmt = str(node_config.get("data-format", data_cfg.dataset))
        data = load_dataset(dataclasses.replace(data_cfg, dataset=fmt, path=str(node_config["data-path"])),
                            seed=cfg.train.seed)
        name = str(node_config.get("site-name", Path(str(node_config["data-path"])).name))
        return Site(name=name, data=data, state_dir=state_dir)
    if "partition-id" not in node_config:
        raise ConfigError("node config needs either data-path (deployment) or partition-id (simulation)")
    pid, count = int(node_config["partition-id"]), int(node_config["num-partitions"])
    if data_cfg.site_paths:
        fmt, path = site_data_entry(data_cfg, pid)
        data = load_dataset(dataclasses.replace(data_cfg, dataset=fmt, path=path), seed=cfg.train.seed)
        return Site(name=f"site-{pid}", data=data, state_dir=state_dir)
    full = _load_shared_dataset(data_cfg, cfg.train.seed)
    shards = partition(full.labels.numpy(), count, cfg.federation.partition, cfg.federation.dirichlet_beta,
                       seed=cfg.train.seed)
    name = f"site-{pid}"
    return Site(name=name, data=full.subset(shards[pid], name=name), state_dir=state_dir)


def site_seed(cfg: RunConfig, site: Site, server_round: int) -> int:
    """A seed unique to (run seed, site, round), stable across processes."""
    return (cfg.train.seed * 1_000_003 + server_round * 10_007 + zlib.crc32(site.name.encode())) % 2**63


def train_epochs(model: nn.Module, data: ImageDataset, cfg: RunConfig, seed: int,
                 device: torch.device) -> list[float]:
    """Non-private local training: ``federation.local-epochs`` shuffled passes; returns each step's loss."""
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(data, batch_size=min(cfg.train.batch_size, len(data)), shuffle=True, generator=generator)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
    scheduler = make_scheduler(cfg.diffusion)
    noise_gen = torch.Generator(device=device).manual_seed(seed)
    losses = []
    model.train()
    for _ in range(cfg.federation.local_epochs):
        for x0, _labels in loader:
            loss = per_sample_loss(model, scheduler, x0.to(device), noise_gen).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.train.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            optimizer.step()
            losses.append(loss.item())
    return losses


def fit_site(global_weights: list[np.ndarray], cfg: RunConfig, site: Site, server_round: int) -> LocalUpdate:
    """One round at a site: load the global model, train locally, return ``new - global`` and metrics.

    Raises:
        ValueError: the global weights do not fit the model, or local training produced NaN/Inf (the site
            refuses to send such an update rather than poisoning the federation).
    """
    start = time.perf_counter()
    device = resolve_device(cfg.train.device)
    model = build_unet(cfg.model.preset, site.data.image_shape[0])
    set_weights(model, global_weights)
    model.to(device)
    losses = train_epochs(model, site.data, cfg, site_seed(cfg, site, server_round), device)
    delta = [new - old for new, old in zip(get_weights(model), global_weights)]
    check_arrays(model, delta, f"{site.name} update")
    metrics: dict[str, Scalar] = {
        "site": site.name,
        "train-loss": float(np.mean(losses)),
        "steps": len(losses),
        "seconds": time.perf_counter() - start,
    }
    return LocalUpdate(delta=delta, num_examples=len(site.data), metrics=metrics)
