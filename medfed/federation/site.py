"""What runs at a hospital site: find its own images, train the global model locally, return the delta.

Plain functions, independent of Flower, so they are testable and reused by the ClientApp and the studies.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
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
from medfed.privacy.accounting import NoisePlan, plan_noise
from medfed.privacy.budget import PrivacyCap, commit_round
from medfed.privacy.ledger import LedgerEntry
from medfed.privacy.dp_sgd import train_private
from medfed.privacy.ledger import site_ledger

Scalar = bool | int | float | str


@dataclass(frozen=True)
class Site:
    """A site's view of itself. Nothing here leaves the site except through :class:`LocalUpdate`.

    Attributes:
        name: display name used in metrics (``site-<partition>`` in simulation, ``site-name`` in deployment).
        data: the site's training images.
        state_dir: persistent site-local folder (privacy ledger), or None.
        cap: the (epsilon, delta) cap the hospital set; required when the run is private.
    """

    name: str
    data: ImageDataset
    state_dir: Path | None
    cap: PrivacyCap | None = None


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
    """Resolve a site's data, state folder and privacy cap from its node config.

    Deployment: ``data-path`` (and optionally ``data-format``, ``site-name``) point at the hospital's own data;
    ``state-dir`` and ``privacy-cap-epsilon`` (optionally ``privacy-cap-delta``) are the hospital's settings.
    Simulation: ``partition-id`` of ``num-partitions`` selects a shard of ``cfg.data`` (split by
    ``federation.partition``) or an entry of ``data.site-paths``; caps come from ``privacy.site-cap-epsilon`` and
    state folders live under ``privacy.site-state-root``.
    """
    data_cfg = federated_data_config(cfg)
    if "data-path" in node_config:
        fmt = str(node_config.get("data-format", data_cfg.dataset))
        data = load_dataset(dataclasses.replace(data_cfg, dataset=fmt, path=str(node_config["data-path"])),
                            seed=cfg.train.seed)
        name = str(node_config.get("site-name", Path(str(node_config["data-path"])).name))
        state_dir = Path(str(node_config["state-dir"])) if node_config.get("state-dir") else None
        return Site(name=name, data=data, state_dir=state_dir, cap=deployed_cap(cfg, node_config, name, state_dir))
    if "partition-id" not in node_config:
        raise ConfigError("node config needs either data-path (deployment) or partition-id (simulation)")
    pid, count = int(node_config["partition-id"]), int(node_config["num-partitions"])
    name = f"site-{pid}"
    if data_cfg.site_paths:
        fmt, path = site_data_entry(data_cfg, pid)
        data = load_dataset(dataclasses.replace(data_cfg, dataset=fmt, path=path), seed=cfg.train.seed)
    else:
        full = _load_shared_dataset(data_cfg, cfg.train.seed)
        shards = partition(full.labels.numpy(), count, cfg.federation.partition, cfg.federation.dirichlet_beta,
                           seed=cfg.train.seed)
        data = full.subset(shards[pid], name=name)
    return Site(name=name, data=data, state_dir=simulated_state_dir(cfg, pid, count),
                cap=simulated_cap(cfg, pid) if cfg.privacy.enabled else None)


def deployed_cap(cfg: RunConfig, node_config: Mapping[str, Scalar], name: str,
                 state_dir: Path | None) -> PrivacyCap | None:
    """The cap a deployed site's hospital set in its node config (required for private runs)."""
    if not cfg.privacy.enabled:
        return None
    if state_dir is None:
        raise ConfigError(f"site {name}: node config has no state-dir; a private run needs it for the site's "
                          "privacy ledger")
    if "privacy-cap-epsilon" not in node_config:
        raise ConfigError(f"site {name}: node config has no privacy-cap-epsilon; the hospital must set its cap")
    return PrivacyCap(epsilon=float(node_config["privacy-cap-epsilon"]),
                      delta=float(node_config.get("privacy-cap-delta", cfg.privacy.delta)))


def simulated_cap(cfg: RunConfig, pid: int) -> PrivacyCap:
    """Simulated site ``pid``'s cap from ``privacy.site-cap-epsilon`` (one value, or one per site)."""
    values = [v.strip() for v in cfg.privacy.site_cap_epsilon.split(",") if v.strip()]
    try:
        caps = [float(v) for v in values]
    except ValueError as err:
        raise ConfigError(f"config key 'privacy.site-cap-epsilon': '{cfg.privacy.site_cap_epsilon}' is not a "
                          "number or comma-separated numbers") from err
    if not caps:
        raise ConfigError("config key 'privacy.site-cap-epsilon' is empty")
    if len(caps) > 1 and pid >= len(caps):
        raise ConfigError(f"config key 'privacy.site-cap-epsilon' lists {len(caps)} caps; site {pid} has none")
    return PrivacyCap(epsilon=caps[pid] if len(caps) > 1 else caps[0], delta=cfg.privacy.delta)


def simulated_state_dir(cfg: RunConfig, pid: int, count: int) -> Path:
    """A simulated site's state folder, keyed by exactly which data it holds, so a later run over the same
    shard continues the same budget and a different shard never shares it."""
    root = Path(cfg.privacy.site_state_root or Path(cfg.output.dir) / "site-state").expanduser()
    d = cfg.data
    shard = {"dataset": d.dataset, "path": str(Path(d.path).expanduser().resolve()) if d.path else "",
             "split": d.split, "limit": d.limit, "site_paths": d.site_paths, "partition": cfg.federation.partition,
             "beta": cfg.federation.dirichlet_beta, "sites": count, "seed": cfg.train.seed, "site": pid}
    key = hashlib.sha256(json.dumps(shard, sort_keys=True).encode()).hexdigest()[:12]
    return root / f"site-{pid}-{key}"


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


def fit_site(global_weights: list[np.ndarray], cfg: RunConfig, site: Site, server_round: int,
             run_id: int = 0) -> LocalUpdate:
    """One round at a site: load the global model, train locally, return ``new - global`` and metrics.

    With privacy on (the default) the site plans its noise for the whole run, commits the round's spend to its
    ledger if its cap allows (else raises :class:`BudgetExceededError`), and trains with DP-SGD.

    Raises:
        BudgetExceededError: the round would exceed the site's privacy cap (recorded in its ledger).
        ValueError: the global weights do not fit the model, or local training produced NaN/Inf (the site
            refuses to send such an update rather than poisoning the federation).
    """
    start = time.perf_counter()
    device = resolve_device(cfg.train.device)
    model = build_unet(cfg.model.preset, site.data.image_shape[0])
    set_weights(model, global_weights)
    model.to(device)
    metrics: dict[str, Scalar] = {"site": site.name}
    if cfg.privacy.enabled:
        metrics.update(train_site_privately(model, cfg, site, server_round, run_id, device))
    else:
        losses = train_epochs(model, site.data, cfg, site_seed(cfg, site, server_round), device)
        metrics.update({"train-loss": float(np.mean(losses)), "steps": len(losses), "private": False})
    delta = [new - old for new, old in zip(get_weights(model), global_weights)]
    check_arrays(model, delta, f"{site.name} update")
    metrics["seconds"] = time.perf_counter() - start
    return LocalUpdate(delta=delta, num_examples=len(site.data), metrics=metrics)


def site_noise_plan(cfg: RunConfig, site: Site) -> NoisePlan:
    """The noise this site uses in every round of the run (planned from the run's target epsilon)."""
    p = cfg.privacy
    return plan_noise(len(site.data), cfg.train.batch_size, cfg.federation.local_epochs, cfg.federation.rounds,
                      p.target_epsilon, p.delta, p.accountant)


def gate_round(cfg: RunConfig, site: Site, server_round: int, run_id: int,
               record_spend: bool = True) -> LedgerEntry | None:
    """The site's privacy gate for a round: commit its spend to the ledger, or record a refusal and raise
    :class:`BudgetExceededError` (``record_spend=False``: check only)."""
    if site.state_dir is None or site.cap is None:
        raise ConfigError(f"site {site.name}: a private run needs a state folder and a privacy cap")
    p = cfg.privacy
    return commit_round(site_ledger(site.state_dir), site.cap, site_noise_plan(cfg, site), site_name=site.name,
                        run_id=run_id, run_name=cfg.output.name, server_round=server_round,
                        max_grad_norm=p.max_grad_norm, noise_multiplicity=p.noise_multiplicity,
                        num_examples=len(site.data), record_spend=record_spend)


def train_site_privately(model: nn.Module, cfg: RunConfig, site: Site, server_round: int, run_id: int,
                         device: torch.device) -> dict[str, Scalar]:
    """Plan, commit and run one DP-SGD round at the site; returns the round's privacy metrics."""
    p = cfg.privacy
    batch_size = cfg.train.batch_size
    plan = site_noise_plan(cfg, site)
    entry = gate_round(cfg, site, server_round, run_id)
    assert entry is not None
    done = train_private(model, site.data, plan, batch_size=batch_size, lr=cfg.train.lr,
                         local_epochs=cfg.federation.local_epochs, max_grad_norm=p.max_grad_norm,
                         noise_multiplicity=p.noise_multiplicity, engine=p.per_sample_grads,
                         scheduler=make_scheduler(cfg.diffusion), device=device, chunk_size=p.per_sample_chunk)
    if (done.noise_multiplier, done.sample_rate, done.steps) != (plan.noise_multiplier, plan.sample_rate,
                                                                 plan.steps_per_round):
        raise RuntimeError(f"site {site.name}: Opacus recorded {done} but the ledger committed {plan}")
    return {"train-loss": float(np.mean(done.losses)) if done.losses else float("nan"), "steps": done.steps,
            "private": True, "epsilon": entry.data["epsilon"], "delta": site.cap.delta,
            "cap-epsilon": site.cap.epsilon, "noise-multiplier": plan.noise_multiplier,
            "sample-rate": plan.sample_rate, "max-grad-norm": p.max_grad_norm,
            "noise-multiplicity": p.noise_multiplicity, "accountant": p.accountant,
            "empty-batches": done.empty_batches}
