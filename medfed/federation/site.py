"""What runs at a hospital site: find its own images, train the global model locally, return the delta.

Plain functions, independent of Flower, so they are testable and reused by the ClientApp and the studies.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import os
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from medfed.config import DataConfig, RunConfig, SitePath
from medfed.contracts import NodeConfig, Reason, SiteReply
from medfed.datasets import ImageDataset, load_dataset
from medfed.datasets.cache import load_cached as load_site_data
from medfed.devices import resolve_device
from medfed.diffusion import StepOptions, check_labels, make_scheduler, train_step
from medfed.errors import ConfigError
from medfed.federation.partition import partition
from medfed.federation.policy import Refused, check_noise
from medfed.federation.weights import check_arrays, get_weights, set_weights
from medfed.models import build_unet
from medfed.privacy.accounting import NoisePlan, plan_noise
from medfed.privacy.budget import PrivacyCap, commit_round
from medfed.privacy.ledger import LedgerEntry
from medfed.privacy.dp_sgd import check_runnable, train_private
from medfed.privacy.anchors import LedgerHead, check_ledger_against
from medfed.privacy.ledger import site_ledger

Scalar = bool | int | float | str
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Site:
    """A site's view of itself. Nothing here leaves the site except through :class:`LocalUpdate`.

    Attributes:
        name: display name used in metrics (``site-<partition>`` in simulation, ``site-name`` in deployment).
        data: the site's training images.
        state_dir: persistent site-local folder (privacy ledger), or None.
        cap: the (epsilon, delta) cap the hospital set; required when the run is private.
        node: the site's node config (its policy included).
        declared_size: the dataset size the site declares public; DP-SGD's sample rate, steps and normaliser
            depend only on it, and FedAvg weighs the site by it.
    """

    name: str
    data: ImageDataset
    state_dir: Path | None
    cap: PrivacyCap | None = None
    node: NodeConfig = dataclasses.field(default_factory=NodeConfig)
    declared_size: int = 0


@dataclass(frozen=True)
class LocalUpdate:
    """What a site sends back after a round (before secure-aggregation masking)."""

    delta: list[np.ndarray]
    num_examples: int
    """The site's declared (public) dataset size: its FedAvg weight."""
    reply: SiteReply
    """What may leave the site: its name and values computed from public settings (epsilon, noise, steps)."""
    local_metrics: dict[str, Scalar] = dataclasses.field(default_factory=dict)
    """What stays in the site's own log: loss, timing, empty Poisson batches (they depend on private data)."""


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


def site_data_entry(data_cfg: DataConfig, index: int) -> SitePath:
    """``(format, path)`` of simulated site ``index``: its entry of ``data.site-paths`` (parsed by the config).

    Raises:
        ConfigError: ``data.site-paths`` lists fewer sites than ``index + 1``.
    """
    entries = data_cfg.site_entries
    if index >= len(entries):
        raise ConfigError(f"config key 'data.site-paths' lists {len(entries)} sites; site {index} has no entry",
                          key="data.site-paths")
    return entries[index]


def load_site(cfg: RunConfig, node: NodeConfig) -> Site:
    """Resolve a site's data, state folder, privacy cap and declared dataset size from its node config.

    Deployment (``node.deployed``): ``data_path``/``data_format`` point at the hospital's own data; its state
    folder, cap and policy (delta, declared dataset size) come from its ``site.toml``. Simulation:
    ``partition_id`` of ``num_partitions`` selects a shard of ``cfg.data`` (split by ``federation.partition``) or
    an entry of ``data.site-paths``; caps come from ``privacy.site-cap-epsilon``, state folders live under
    ``privacy.site-state-root`` and the declared dataset size is the shard's own count.

    Raises:
        ConfigError: a private run at a deployed site without a state folder, cap, policy delta or declared size.
        DatasetError: the site's data could not be loaded (naming the file, for the site's own log).
    """
    data_cfg = federated_data_config(cfg)
    if node.deployed:
        fmt = node.data_format or data_cfg.dataset
        data = load_site_data(dataclasses.replace(data_cfg, dataset=fmt, path=node.data_path), cfg.train.seed,
                              Path(node.state_dir) if node.state_dir else None)
        name = node.site_name or Path(node.data_path).name
        state_dir = Path(node.state_dir) if node.state_dir else None
        return Site(name=name, data=data, state_dir=state_dir, cap=deployed_cap(cfg, node, name, state_dir),
                    node=node, declared_size=node.policy.dataset_size or len(data))  # undeclared: NOT PRIVATE only
    if node.partition_id < 0:
        raise ConfigError("node config needs either data-path (deployment) or partition-id (simulation)")
    pid, count = node.partition_id, node.num_partitions
    name = node.site_name or f"site-{pid}"
    if data_cfg.site_entries:
        fmt, path = site_data_entry(data_cfg, pid)
        data = load_dataset(dataclasses.replace(data_cfg, dataset=fmt, path=path), seed=cfg.train.seed)
    else:
        full = _load_shared_dataset(data_cfg, cfg.train.seed)
        shards = partition(full.labels.numpy(), count, cfg.federation.partition, cfg.federation.dirichlet_beta,
                           seed=cfg.train.seed)
        data = full.subset(shards[pid], name=name)
    return Site(name=name, data=data, state_dir=simulated_state_dir(cfg, pid, shard_fingerprint(data)),
                cap=simulated_cap(cfg, pid) if cfg.privacy.enabled else None, node=node,
                declared_size=node.policy.dataset_size or len(data))


def deployed_cap(cfg: RunConfig, node: NodeConfig, name: str, state_dir: Path | None) -> PrivacyCap | None:
    """The cap a deployed site's hospital set in its ``site.toml`` (required for private runs): its epsilon
    over all runs at the policy's delta. The run's ``privacy.delta`` never sets it."""
    if not cfg.privacy.enabled:
        return None
    if state_dir is None:
        raise ConfigError(f"site {name}: node config has no state-dir; a private run needs it for the site's "
                          "privacy ledger")
    if node.cap_epsilon <= 0:
        raise ConfigError(f"site {name}: node config has no cap-epsilon; the hospital must set its cap")
    if node.policy.delta <= 0:
        raise ConfigError(f"site {name}: node config has no policy-delta; the hospital must set its delta")
    if node.policy.dataset_size <= 0:
        raise ConfigError(f"site {name}: node config has no policy-dataset-size; the hospital must declare its "
                          "dataset size (it sets the sample rate and steps, never the private count)")
    return PrivacyCap(epsilon=node.cap_epsilon, delta=node.policy.delta)


def simulated_cap(cfg: RunConfig, pid: int) -> PrivacyCap:
    """Simulated site ``pid``'s cap from ``privacy.site-cap-epsilon`` (one value, or one per site), at the run's
    ``privacy.delta``.

    Raises:
        ConfigError: the key lists caps per site, but none for site ``pid``.
    """
    caps = cfg.privacy.site_caps
    if len(caps) > 1 and pid >= len(caps):
        raise ConfigError(f"config key 'privacy.site-cap-epsilon' lists {len(caps)} caps; site {pid} has none",
                          key="privacy.site-cap-epsilon")
    return PrivacyCap(epsilon=caps[pid] if len(caps) > 1 else caps[0], delta=cfg.privacy.delta)


def simulated_state_dir(cfg: RunConfig, pid: int, shard_sha256: str) -> Path:
    """A simulated site's state folder (``<privacy.site-state-root>/site-<pid>-<fingerprint>``), keyed by the
    content of the shard it holds (:func:`shard_fingerprint`): a later run over the same images continues the
    same budget whatever its seed or other settings, and different images never share it."""
    root = Path(cfg.privacy.site_state_root or Path(cfg.output.dir) / "site-state").expanduser()
    return root / f"site-{pid}-{shard_sha256[:16]}"


def shard_fingerprint(data: ImageDataset) -> str:
    """SHA-256 of a shard's content: each image's bytes (float32, as loaded) with its label, in any order.

    The same images loaded the same way give the same fingerprint, whichever partition seed or order delivered
    them. Images loaded at another size or intensity setting have other bytes, hence another fingerprint.
    """
    images = data.images.detach().to(torch.float32).contiguous().cpu().numpy()
    labels = data.labels.detach().cpu().numpy().astype(np.int64)
    digests = sorted(hashlib.sha256(img.tobytes() + int(label).to_bytes(8, "little", signed=True)).digest()
                     for img, label in zip(images, labels))
    return hashlib.sha256(str(images.shape[1:]).encode() + b"".join(digests)).hexdigest()


def site_seed(cfg: RunConfig, site: Site, server_round: int) -> int:
    """A seed unique to (run seed, site, round), stable across processes."""
    return (cfg.train.seed * 1_000_003 + server_round * 10_007 + zlib.crc32(site.name.encode())) % 2**63


def train_epochs(model: nn.Module, data: ImageDataset, cfg: RunConfig, seed: int,
                 device: torch.device) -> list[float]:
    """Non-private local training: ``federation.local-epochs`` shuffled passes of the centralized trainer's step
    (:func:`medfed.diffusion.train_step`, with the site's own labels when conditional); returns each step's loss."""
    check_labels(data.labels, cfg.model.num_classes, f"dataset {data.name}")
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(data, batch_size=min(cfg.train.batch_size, len(data)), shuffle=True, generator=generator)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
    scheduler = make_scheduler(cfg.diffusion)
    options = StepOptions.from_config(cfg, device)
    noise_gen = torch.Generator(device=device).manual_seed(seed)
    losses = []
    model.train()
    for _ in range(cfg.federation.local_epochs):
        for x0, labels in loader:
            losses.append(train_step(model, optimizer, scheduler, x0.to(device), labels.to(device), noise_gen,
                                     options))
    return losses


def fit_site(global_weights: list[np.ndarray], cfg: RunConfig, site: Site, server_round: int,
             run_id: int = 0, anchors: Mapping[str, tuple[int, str]] | None = None) -> LocalUpdate:
    """One round at a site: load the global model, train locally, return ``new - global`` and metrics.

    With privacy on (the default) the site plans its noise for the whole run from its declared dataset size,
    commits the round's spend to its ledger if its cap allows (else raises :class:`BudgetExceededError`), and
    trains with DP-SGD. ``LocalUpdate.metrics`` holds only what may leave the site (:func:`public_metrics`);
    ``local_metrics`` (loss, timing, empty batches) stays in the site's own log.

    Raises:
        Refused: the site's ledger no longer extends the coordinator's anchor, or the plan breaks its policy.
        BudgetExceededError: the round would exceed the site's privacy cap (recorded in its ledger).
        ValueError: the global weights do not fit the model, or local training produced NaN/Inf (the site
            refuses to send such an update rather than poisoning the federation).
    """
    start = time.perf_counter()
    note_declared_size(site)
    check_anchor(site, (anchors or {}).get(site.name))
    remember_global_model(site, run_id, server_round, global_weights)
    device = resolve_device(cfg.train.device)
    model = build_unet(cfg.model.preset, site.data.image_shape[0], cfg.model.num_classes)
    set_weights(model, global_weights)
    model.to(device)
    local: dict[str, Scalar] = {}
    if cfg.privacy.enabled:
        reply = train_site_privately(model, cfg, site, server_round, run_id, device, local)
    else:
        losses = train_epochs(model, site.data, cfg, site_seed(cfg, site, server_round), device)
        reply = SiteReply(site=site.name, private=False, steps=len(losses), train_loss=float(np.mean(losses)))
        local["train-loss"] = reply.train_loss
    delta = [new - old for new, old in zip(get_weights(model), global_weights)]
    check_arrays(model, delta, f"{site.name} update")
    local["seconds"] = time.perf_counter() - start
    if not cfg.privacy.enabled:  # NOT PRIVATE: nothing is covered anyway; the coordinator may plot the losses
        reply = dataclasses.replace(reply, seconds=float(local["seconds"]))
    return LocalUpdate(delta=delta, num_examples=site.declared_size, reply=reply, local_metrics=local)


@dataclass(frozen=True)
class HeldModel:
    """The global model a site last received for training: the only model it evaluates."""

    run_id: int
    server_round: int
    weights: list[np.ndarray]


HELD_MODEL_FILE = "global-model.npz"


def remember_global_model(site: Site, run_id: int, server_round: int, weights: list[np.ndarray]) -> None:
    """Keep the global model of this round in the site's state folder (0600), so a later evaluation request
    scores this model and not one the coordinator sends."""
    if site.state_dir is None:
        return
    site.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = site.state_dir / HELD_MODEL_FILE
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        np.savez(f, run_id=run_id, round=server_round, **{f"w{i}": w for i, w in enumerate(weights)})
    os.replace(tmp, path)


def held_global_model(site: Site, run_id: int) -> HeldModel | None:
    """The global model the site received for training in run ``run_id``, or None."""
    path = site.state_dir / HELD_MODEL_FILE if site.state_dir else None
    if path is None or not path.is_file():
        return None
    with np.load(path) as z:
        if int(z["run_id"]) != run_id:
            return None
        count = sum(1 for k in z.files if k.startswith("w"))
        return HeldModel(run_id, int(z["round"]), [z[f"w{i}"] for i in range(count)])


def check_anchor(site: Site, anchor: tuple[int, str] | None) -> None:
    """Refuse to take part when the site's ledger no longer extends the head the coordinator recorded last
    (deleted, truncated or rewritten since: its spent budget would be rolled back)."""
    if anchor is None or site.state_dir is None:
        return
    check = check_ledger_against(site_ledger(site.state_dir), LedgerHead(*anchor), where=f"site {site.name}'s ledger")
    if not check.extends:
        raise Refused(Reason.LEDGER, check.message)


def note_declared_size(site: Site) -> None:
    """Log, in the site's own log only, when its data does not hold the dataset size its policy declares public.

    The site trains all the same: DP-SGD's sample rate, steps and normaliser come from the declared size, and the
    guarantee holds for any real count (:mod:`medfed.privacy.accounting`); refusing would reveal whether the private
    count equals the declared one. Only utility and the FedAvg weight suffer, so the operator should review it."""
    if site.declared_size and len(site.data) != site.declared_size:
        log.warning("site %s: the data holds %d images, its policy declares dataset-size = %d; training the "
                    "declared mechanism anyway (review the data, then update site.toml [policy] dataset-size)",
                    site.name, len(site.data), site.declared_size)


def site_noise_plan(cfg: RunConfig, site: Site) -> NoisePlan:
    """The noise this site uses in every round of the run (planned from the run's target epsilon)."""
    p = cfg.privacy
    return plan_noise(site.declared_size, cfg.train.batch_size, cfg.federation.local_epochs, cfg.federation.rounds,
                      p.target_epsilon, p.delta, p.accountant)


def gate_round(cfg: RunConfig, site: Site, server_round: int, run_id: int,
               record_spend: bool = True) -> LedgerEntry | None:
    """The site's privacy gate for a round: commit its spend to the ledger, or record a refusal and raise
    :class:`BudgetExceededError` (``record_spend=False``: check only)."""
    if site.state_dir is None or site.cap is None:
        raise ConfigError(f"site {site.name}: a private run needs a state folder and a privacy cap")
    p = cfg.privacy
    plan = site_noise_plan(cfg, site)
    broken = check_noise(plan.noise_multiplier, site.node.policy)
    if broken is not None:
        raise Refused(broken, f"site {site.name}: planned noise multiplier {plan.noise_multiplier:.3f} is below the "
                      f"policy's min-noise-multiplier {site.node.policy.min_noise_multiplier}")
    return commit_round(site_ledger(site.state_dir), site.cap, plan, site_name=site.name,
                        run_id=run_id, run_name=cfg.output.name, server_round=server_round,
                        max_grad_norm=p.max_grad_norm, noise_multiplicity=p.noise_multiplicity,
                        num_examples=len(site.data), record_spend=record_spend)


def train_site_privately(model: nn.Module, cfg: RunConfig, site: Site, server_round: int, run_id: int,
                         device: torch.device, local: dict[str, Scalar] | None = None) -> SiteReply:
    """Plan, commit and run one DP-SGD round at the site; returns the round's privacy metrics, all computed from
    public values (declared size, batch size, noise, steps). Loss and empty-batch count go into ``local``."""
    p = cfg.privacy
    batch_size = cfg.train.batch_size
    plan = site_noise_plan(cfg, site)
    # everything that would stop training before its first step, checked before the spend is committed
    check_runnable(model, site.data, plan, engine=p.per_sample_grads, batch_size=batch_size,
                   local_epochs=cfg.federation.local_epochs, num_classes=cfg.model.num_classes)
    entry = gate_round(cfg, site, server_round, run_id)
    assert entry is not None
    done = train_private(model, site.data, plan, batch_size=batch_size, lr=cfg.train.lr,
                         local_epochs=cfg.federation.local_epochs, max_grad_norm=p.max_grad_norm,
                         noise_multiplicity=p.noise_multiplicity, engine=p.per_sample_grads,
                         scheduler=make_scheduler(cfg.diffusion), device=device, chunk_size=p.per_sample_chunk,
                         num_classes=cfg.model.num_classes, label_dropout=cfg.train.label_dropout)
    if local is not None:
        local.update({"train-loss": float(np.mean(done.losses)) if done.losses else float("nan"),
                      "empty-batches": done.empty_batches})
    return SiteReply(site=site.name, private=True, steps=plan.steps_per_round, epsilon=float(entry.data["epsilon"]),
                     delta=site.cap.delta, cap_epsilon=site.cap.epsilon, noise_multiplier=plan.noise_multiplier,
                     sample_rate=plan.sample_rate, max_grad_norm=p.max_grad_norm,
                     noise_multiplicity=p.noise_multiplicity, accountant=p.accountant,
                     ledger_count=entry.index + 1, ledger_hash=entry.hash)  # the head: the entry just committed
