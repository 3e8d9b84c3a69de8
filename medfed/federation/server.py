"""The coordinator's side of a federated run: FedAvg rounds on Flower's legacy workflow, and their records.

After every round the server writes a checkpoint, one line of ``metrics.jsonl`` (per-site loss, who took part
and who was missing, payload bytes, wall time) and, every ``federation.sample-every`` rounds, a sample grid.
"""

from __future__ import annotations

import copy
import time
from logging import INFO, WARNING
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from flwr.app import Context
from flwr.common.logger import log
from flwr.server import LegacyContext, ServerConfig
from flwr.server.workflow import DefaultWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, Key
from flwr.serverapp import Grid

from medfed.checkpoint import Checkpoint, load_checkpoint, require_same_model, save_checkpoint
from medfed.config import RunConfig, from_flat
from medfed.contracts import Reason, RoundRecord, SiteOutcome, Status
from medfed.devices import resolve_device
from medfed.diffusion import sample_images
from medfed.federation.secagg import SecureRound, ask_example_counts, secure_fit_round
from medfed.federation.site import federated_data_config
from medfed.federation.strategy import DeltaFedAvg, RoundOutcome, failure_text
from medfed.federation.weights import get_weights, set_weights
from medfed.federation.workflow import MeteredGrid, plain_fit_round
from medfed.images import save_grid
from medfed.privacy.anchors import AnchorError, AnchorStore, LedgerHead
from medfed.models import build_unet, count_parameters
from medfed.models.ema import ema_update, warmup_decay
from medfed.plots import line_plot
from medfed.runs import RunDir, open_run


def image_shape_of(cfg: RunConfig) -> tuple[int, int, int]:
    data = federated_data_config(cfg)
    return data.channels, data.image_size, data.image_size


@dataclass
class FederatedRound:
    """The fit workflow of one round: run it, then record it. Called by Flower's ``DefaultWorkflow``."""

    cfg: RunConfig
    run: RunDir
    strategy: DeltaFedAvg
    model: torch.nn.Module
    image_shape: tuple[int, int, int]
    device: torch.device
    ema: torch.nn.Module | None = None
    """EMA of the global model over rounds (``federation.ema-decay``), the weights checkpoints sample with."""
    site_names: dict[int, str] = field(default_factory=dict)
    max_weight: float = 0.0
    """SecAgg+ max weight in use: ``secagg.max-weight``, else the largest site example count seen."""

    def __call__(self, grid: Grid, context: LegacyContext) -> None:
        local_round = cast(int, context.state.config_records[MAIN_CONFIGS_RECORD][Key.CURRENT_ROUND])
        server_round = self.strategy.round_offset + local_round
        metered = MeteredGrid(grid)
        start = time.perf_counter()
        secure = None
        if self.cfg.secagg.enabled:
            waiting_for = self.strategy.num_sites if local_round == 1 else self.strategy.min_sites
            context.client_manager.wait_for(waiting_for, timeout=int(self.cfg.federation.round_timeout))
            secure = secure_fit_round(metered, context, self.cfg,
                                      self.strategy.sample_size(context.client_manager.num_available()),
                                      self.secagg_max_weight(metered))
        else:
            plain_fit_round(metered, context, timeout=self.cfg.federation.round_timeout)
        self.record(server_round, metered, time.perf_counter() - start, secure)

    def advance_anchors(self, outcome: RoundOutcome) -> None:
        """Record each site's ledger head after a round it trained in (deployments: ``federation.ledger-anchors``).
        A head behind the anchor is never recorded (the site itself refuses such a round; this is the second
        line)."""
        if not self.cfg.federation.ledger_anchors:
            return
        store = AnchorStore(self.cfg.federation.ledger_anchors)
        for accepted in outcome.accepted.values():
            reply = accepted.reply
            if reply.ledger_count is not None and reply.ledger_hash is not None:
                try:
                    store.update(reply.site, LedgerHead(reply.ledger_count, reply.ledger_hash))
                except AnchorError as err:
                    log(WARNING, "%s", err)

    def secagg_max_weight(self, grid: Grid) -> float:
        """``secagg.max-weight`` if set, else the largest example count of any site (asked once)."""
        if self.cfg.secagg.max_weight > 0:
            return self.cfg.secagg.max_weight
        if self.max_weight <= 0:
            counts = ask_example_counts(grid, timeout=self.cfg.federation.round_timeout)
            self.max_weight = float(max(counts.values(), default=1000))
        return self.max_weight

    def record(self, server_round: int, grid: MeteredGrid, wall_s: float,
               secure: SecureRound | None = None) -> RoundRecord:
        outcome = self.strategy.outcome
        if secure is not None:
            for failure in secure.halted_failures:
                outcome.add_failure(failure_text(failure))
            largest = max((a.num_examples for a in outcome.accepted.values()), default=0)
            self.max_weight = max(self.max_weight, float(largest))
        for node, accepted in outcome.accepted.items():
            self.site_names[node] = accepted.reply.site
        record = round_record(server_round, outcome, self.site_names, self.cfg, wall_s=wall_s,
                              bytes_down=grid.bytes_down, bytes_up=grid.bytes_up,
                              secure_settings=secure.settings.as_record() if secure else None,
                              halted=secure is not None and not secure.completed)
        log(INFO, "%s", record.summary_line())
        self.advance_anchors(outcome)
        self.run.append_metrics(record.to_dict())
        set_weights(self.model, self.strategy.current)
        if self.ema is not None and outcome.aggregated:
            ema_update(self.ema, self.model, warmup_decay(server_round - 1, self.cfg.federation.ema_decay))
        ckpt = Checkpoint(model=self.model.state_dict(), config=self.cfg, image_shape=self.image_shape,
                          step=server_round, ema=self.ema.state_dict() if self.ema is not None else None,
                          extra={"kind": "federated", "privacy": privacy_label(self.cfg)})
        save_checkpoint(ckpt, self.run.checkpoints / f"round_{server_round:04d}.pt")
        save_checkpoint(ckpt, self.run.latest_checkpoint)
        every = self.cfg.federation.sample_every
        if (every and server_round % every == 0) or server_round == self.cfg.federation.rounds:
            write_sample_grid(self.ema if self.ema is not None else self.model, self.cfg, self.image_shape,
                              self.device, self.run.samples / f"round_{server_round:04d}{file_tag(self.cfg)}.png")
        plot_rounds(self.run)
        return record


def anchors_of(store: AnchorStore) -> dict[str, tuple[int, str]]:
    """Every site's last recorded ledger head, as sent with each round's global model."""
    heads = {site: store.get(site) for site in store.sites()}
    return {site: (h.count, h.hash) for site, h in heads.items() if h is not None}


def round_record(server_round: int, outcome: RoundOutcome, site_names: dict[int, str], cfg: RunConfig, *,
                 wall_s: float, bytes_down: int = 0, bytes_up: int = 0,
                 secure_settings: dict[str, float | int] | None = None, halted: bool = False) -> RoundRecord:
    """The round's typed record from what the strategy saw: who trained (with the epsilon each site's own
    accountant computed), who refused and why, who was rejected or missing."""
    name = lambda node: site_names.get(node, f"node-{node}")  # noqa: E731
    sites: list[SiteOutcome] = []
    for node, a in sorted(outcome.accepted.items(), key=lambda kv: name(kv[0])):
        sites.append(SiteOutcome(name(node), Status.TRAINED, epsilon=a.reply.epsilon, cap_epsilon=a.reply.cap_epsilon,
                                 delta=a.reply.delta))
    sites += [SiteOutcome(name(node), Status.REJECTED, reason) for node, reason in sorted(outcome.rejected.items())]
    sites += [SiteOutcome(r.site, Status.REFUSED, r.reason) for r in sorted(outcome.refusals, key=lambda r: r.site)]
    answered = len(outcome.accepted) + len(outcome.rejected) + len(outcome.refusals)
    silent = [n for n in outcome.sampled if n not in outcome.accepted and n not in outcome.rejected
              and name(n) not in {r.site for r in outcome.refusals}]
    reasons = list(outcome.unexplained) + [Reason.NO_REPLY] * len(silent)
    for node, reason in zip(silent[: max(len(outcome.sampled) - answered, 0)], reasons):
        sites.append(SiteOutcome(name(node), Status.MISSING, reason))
    skipped = ""
    if not outcome.aggregated:
        skipped = ("secure aggregation halted: too few sites left to unmask the sum" if halted
                   else "no valid update arrived")
    return RoundRecord(
        round=server_round, aggregated=outcome.aggregated, sites=tuple(sites), privacy=privacy_label(cfg),
        wall_s=wall_s, bytes_down=bytes_down, bytes_up=bytes_up, secure_aggregation=secure_settings,
        weights={name(n): float(a.num_examples) for n, a in outcome.accepted.items()},
        train_loss={name(n): a.reply.train_loss for n, a in outcome.accepted.items() if a.reply.train_loss is not None},
        site_seconds={name(n): a.reply.seconds for n, a in outcome.accepted.items() if a.reply.seconds is not None},
        skipped=skipped)


def privacy_label(cfg: RunConfig) -> str:
    """How a run's outputs are labelled: ``DP-SGD (sample-level, per site)`` or ``NOT PRIVATE``."""
    return "DP-SGD (sample-level, per site)" if cfg.privacy.enabled else "NOT PRIVATE"


def file_tag(cfg: RunConfig) -> str:
    """Suffix for output file names: non-private runs say so in every file name."""
    return "" if cfg.privacy.enabled else "_NOT_PRIVATE"


def write_sample_grid(model: torch.nn.Module, cfg: RunConfig, image_shape: tuple[int, int, int],
                      device: torch.device, path: Path) -> Path:
    model.to(device)
    images = sample_images(model, cfg.diffusion, cfg.train.num_samples, image_shape, device=device,
                           seed=cfg.train.seed)
    model.cpu()
    return save_grid(images, path)


def plot_rounds(run: RunDir) -> Path:
    """``rounds.png``: sites taking part, each site's reported epsilon, and the round wall time, per round.
    Training losses appear only for NOT PRIVATE runs (a private site keeps its losses in its own log)."""
    records = run.rounds()
    rounds = [r.round for r in records]
    per_site_eps: dict[str, tuple[list[float], list[float]]] = {}
    losses: dict[str, tuple[list[float], list[float]]] = {}
    for r in records:
        for site, eps in r.epsilon.items():
            xs, ys = per_site_eps.setdefault(site, ([], []))
            xs.append(r.round)
            ys.append(eps)
        for site, loss in r.train_loss.items():
            xs, ys = losses.setdefault(site, ([], []))
            xs.append(r.round)
            ys.append(loss)
    panels = [("sites that trained", "sites", {"trained": (rounds, [len(r.participants) for r in records])})]
    if per_site_eps:
        panels.append(("epsilon spent per site (site accountants)", "epsilon", per_site_eps))
    if losses:
        panels.append(("training loss per site (NOT PRIVATE run)", "denoising loss", losses))
    panels.append(("round wall time", "seconds", {"round": (rounds, [r.wall_s for r in records])}))
    return line_plot(panels, run.root / "rounds.png", xlabel="round")


def run_server(grid: Grid, context: Context, fit_round_type: type[FederatedRound] = FederatedRound) -> RunDir:
    """Run all rounds of a federated run (or the remaining ones, when resuming) and write the summary.

    ``fit_round_type`` runs each round; a benchmark may pass a variant of :class:`FederatedRound`."""
    cfg = from_flat(context.run_config)
    image_shape = image_shape_of(cfg)
    run = open_run(cfg)
    device = resolve_device(cfg.train.device)
    torch.manual_seed(cfg.train.seed)
    model = build_unet(cfg.model.preset, image_shape[0], cfg.model.num_classes)
    done = 0
    ema = None
    if cfg.output.resume:
        ckpt = load_checkpoint(run.latest_checkpoint)
        model.load_state_dict(ckpt.model)
        done = ckpt.step
        if cfg.federation.ema_decay > 0:
            ema = copy.deepcopy(model)
            ema.load_state_dict(ckpt.ema if ckpt.ema is not None else ckpt.model)
    elif cfg.federation.init_checkpoint:
        load_initial_weights(model, cfg.federation.init_checkpoint, cfg, image_shape)
    if ema is None and cfg.federation.ema_decay > 0:
        ema = copy.deepcopy(model)
    fed = cfg.federation
    min_sites = fed.min_sites or fed.num_sites
    strategy = DeltaFedAvg(get_weights(model), num_sites=fed.num_sites, min_sites=min_sites,
                           fraction_fit=fed.fraction_fit, round_offset=done, wait_timeout=fed.round_timeout)
    if fed.ledger_anchors:
        strategy.anchors = lambda: anchors_of(AnchorStore(fed.ledger_anchors))
    if done == 0:
        run.append_metrics({"event": "start", "parameters": count_parameters(model), "image_shape": image_shape,
                            "sites": fed.num_sites, "rounds": fed.rounds, "privacy": privacy_label(cfg),
                            "init_checkpoint": fed.init_checkpoint or None})
        save_checkpoint(Checkpoint(model=model.state_dict(), config=cfg, image_shape=image_shape, step=0,
                                   extra={"kind": "federated", "privacy": privacy_label(cfg)}),
                        run.checkpoints / "round_0000.pt")
    fit_round = fit_round_type(cfg=cfg, run=run, strategy=strategy, model=model, image_shape=image_shape,
                               device=device, ema=ema)
    if fed.rounds > done:
        legacy = LegacyContext(context=context, strategy=strategy,
                               config=ServerConfig(num_rounds=fed.rounds - done, round_timeout=fed.round_timeout))
        from medfed.federation.evaluation import FederatedEvaluation

        evaluate_round = FederatedEvaluation(cfg=cfg, run=run, image_shape=image_shape, device=device,
                                             round_offset=done)
        DefaultWorkflow(fit_workflow=fit_round, evaluate_workflow=evaluate_round)(grid, legacy)
    write_summary(run, cfg)
    return run


def load_initial_weights(model: torch.nn.Module, path: str, cfg: RunConfig,
                         image_shape: tuple[int, int, int]) -> None:
    """Load a checkpoint's sampling weights as the first global model; it must be the run's model
    (:func:`~medfed.checkpoint.require_same_model`)."""
    ckpt = load_checkpoint(path)
    require_same_model(ckpt, cfg, image_shape, key="federation.init-checkpoint", path=path)
    model.load_state_dict(ckpt.sampling_weights())


def write_summary(run: RunDir, cfg: RunConfig) -> dict[str, Any]:
    """``summary.json``: rounds asked and completed, rounds skipped and why, refusals, privacy spent, outputs."""
    records = run.rounds()
    last = records[-1] if records else None
    summary = {
        "rounds_asked": cfg.federation.rounds,
        "rounds_completed": sum(1 for r in records if r.aggregated),
        "rounds_skipped": [r.round for r in records if not r.aggregated],
        "last_round": last.round if last else 0,
        "final_train_loss": dict(last.train_loss) if last else {},
        "refusals": [{"round": r.round, "site": s.site, "status": s.status.value,
                      "reason": s.reason.value if s.reason else None, "text": s.reason_text}
                     for r in records for s in r.sites if s.status != Status.TRAINED],
        "mean_round_wall_s": float(np.mean([r.wall_s for r in records])) if records else 0.0,
        "checkpoint": str(run.latest_checkpoint),
        "samples": sorted(str(p) for p in run.samples.glob("*.png"))[-1:],
        "sites": cfg.federation.num_sites,
        "privacy": privacy_summary(records, cfg),
        "secure_aggregation": secagg_summary(records, cfg),
    }
    run.write_json(run.summary_path, summary)
    return summary


def secagg_summary(records: list[RoundRecord], cfg: RunConfig) -> dict[str, Any]:
    """Whether every round's update was securely aggregated, and with which parameters."""
    if not cfg.secagg.enabled:
        return {"used": False, "note": "secagg.enabled was false: the server saw each site's update"}
    return {"used": True, "protocol": "SecAgg+ (Flower legacy workflow)",
            "rounds": {r.round: r.secure_aggregation for r in records},
            "note": "honest-but-curious server; masks from ChaCha20 keyed by the full shared secret"}


def privacy_summary(records: list[RoundRecord], cfg: RunConfig) -> dict[str, Any]:
    """Per site: the latest epsilon it reported (computed by its own accountant) and its cap."""
    if not cfg.privacy.enabled:
        return {"label": "NOT PRIVATE", "note": "privacy.enabled was false: no differential privacy guarantee"}
    sites: dict[str, dict[str, Any]] = {}
    for r in records:
        for s in r.sites:
            if s.epsilon is not None:
                sites[s.site] = {"epsilon": s.epsilon, "delta": s.delta, "cap_epsilon": s.cap_epsilon,
                                 "last_round": r.round}
    return {"label": privacy_label(cfg), "accountant": cfg.privacy.accountant,
            "target_epsilon": cfg.privacy.target_epsilon, "max_grad_norm": cfg.privacy.max_grad_norm,
            "noise_multiplicity": cfg.privacy.noise_multiplicity, "sites": sites,
            "adjacency": "add/remove one image at one site (sample-level DP, per site)",
            "note": "epsilon as computed and reported by each site's own accountant from public values (its "
                    "declared dataset size, batch size, noise multiplier, steps); the server cannot verify it. "
                    "Losses, timing and exact image counts stay at the sites."}
