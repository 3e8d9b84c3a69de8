"""The coordinator's side of a federated run: FedAvg rounds on Flower's legacy workflow, and their records.

After every round the server writes a checkpoint, one line of ``metrics.jsonl`` (per-site loss, who took part
and who was missing, payload bytes, wall time) and, every ``federation.sample-every`` rounds, a sample grid.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from flwr.app import Context
from flwr.server import LegacyContext, ServerConfig
from flwr.server.workflow import DefaultWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, Key
from flwr.serverapp import Grid

from medfed.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from medfed.config import RunConfig, from_flat
from medfed.devices import resolve_device
from medfed.errors import ConfigError
from medfed.diffusion import sample_images
from medfed.federation.secagg import SecureRound, ask_example_counts, secure_fit_round
from medfed.federation.site import federated_data_config
from medfed.federation.strategy import DeltaFedAvg, failure_reason
from medfed.federation.weights import get_weights, set_weights
from medfed.federation.workflow import MeteredGrid, plain_fit_round
from medfed.images import save_grid
from medfed.models import build_unet, count_parameters
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

    def secagg_max_weight(self, grid: Grid) -> float:
        """``secagg.max-weight`` if set, else the largest example count of any site (asked once)."""
        if self.cfg.secagg.max_weight > 0:
            return self.cfg.secagg.max_weight
        if self.max_weight <= 0:
            counts = ask_example_counts(grid, timeout=self.cfg.federation.round_timeout)
            self.max_weight = float(max(counts.values(), default=1000))
        return self.max_weight

    def record(self, server_round: int, grid: MeteredGrid, wall_s: float,
               secure: SecureRound | None = None) -> dict[str, Any]:
        outcome = self.strategy.outcome
        if secure is not None:
            outcome.failures.extend(failure_reason(failure) for failure in secure.halted_failures)
            largest = max((int(m["num-examples"]) for m in outcome.accepted.values()), default=0)
            self.max_weight = max(self.max_weight, float(largest))
        for node, metrics in outcome.accepted.items():
            self.site_names[node] = str(metrics.get("site", node))
        name = lambda node: self.site_names.get(node, f"node-{node}")  # noqa: E731
        participating = sorted(name(n) for n in outcome.accepted)
        record: dict[str, Any] = {
            "round": server_round,
            "aggregated": outcome.aggregated,
            "sites_sampled": len(outcome.sampled),
            "sites_participating": participating,
            "sites_missing": sorted(name(n) for n in outcome.sampled if n not in outcome.accepted),
            "rejected": {name(n): why for n, why in outcome.rejected.items()},
            "failures": outcome.failures,
            "train_loss": {name(n): m["train-loss"] for n, m in outcome.accepted.items() if "train-loss" in m},
            "num_examples": {name(n): m["num-examples"] for n, m in outcome.accepted.items()},
            "site_seconds": {name(n): m["seconds"] for n, m in outcome.accepted.items() if "seconds" in m},
            "privacy": privacy_label(self.cfg),
            "epsilon": {name(n): m["epsilon"] for n, m in outcome.accepted.items() if "epsilon" in m},
            "cap_epsilon": {name(n): m["cap-epsilon"] for n, m in outcome.accepted.items() if "cap-epsilon" in m},
            "delta": {name(n): m["delta"] for n, m in outcome.accepted.items() if "delta" in m},
            "secure_aggregation": secure.settings.as_record() if secure else None,
            "secagg_clipped_values": {name(n): m["secagg-clipped-values"] for n, m in outcome.accepted.items()
                                      if "secagg-clipped-values" in m},
            "bytes_down": grid.bytes_down,
            "bytes_up": grid.bytes_up,
            "wall_s": wall_s,
        }
        if not outcome.aggregated:
            halted = secure is not None and not secure.completed
            record["skipped"] = ("secure aggregation halted: too few sites to unmask the sum (see failures)"
                                 if halted else "no valid update arrived (see failures and rejected)")
        self.run.append_metrics(record)
        set_weights(self.model, self.strategy.current)
        ckpt = Checkpoint(model=self.model.state_dict(), config=self.cfg, image_shape=self.image_shape,
                          step=server_round, extra={"kind": "federated", "privacy": privacy_label(self.cfg)})
        save_checkpoint(ckpt, self.run.checkpoints / f"round_{server_round:04d}.pt")
        save_checkpoint(ckpt, self.run.latest_checkpoint)
        every = self.cfg.federation.sample_every
        if (every and server_round % every == 0) or server_round == self.cfg.federation.rounds:
            write_sample_grid(self.model, self.cfg, self.image_shape, self.device,
                              self.run.samples / f"round_{server_round:04d}{file_tag(self.cfg)}.png")
        plot_rounds(self.run)
        return record


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
    """``rounds.png``: each site's training loss, and round wall time, against the round number."""
    records = [r for r in run.read_metrics() if "round" in r]
    losses: dict[str, tuple[list[float], list[float]]] = {}
    for r in records:
        for site, loss in r["train_loss"].items():
            xs, ys = losses.setdefault(site, ([], []))
            xs.append(r["round"])
            ys.append(loss)
    rounds = [r["round"] for r in records]
    return line_plot([("training loss per site", "denoising loss", losses),
                      ("round wall time", "seconds", {"round": (rounds, [r["wall_s"] for r in records])})],
                     run.root / "rounds.png", xlabel="round")


def run_server(grid: Grid, context: Context, fit_round_type: type[FederatedRound] = FederatedRound) -> RunDir:
    """Run all rounds of a federated run (or the remaining ones, when resuming) and write the summary.

    ``fit_round_type`` runs each round; a benchmark may pass a variant of :class:`FederatedRound`."""
    cfg = from_flat(context.run_config)
    image_shape = image_shape_of(cfg)
    run = open_run(cfg)
    device = resolve_device(cfg.train.device)
    torch.manual_seed(cfg.train.seed)
    model = build_unet(cfg.model.preset, image_shape[0])
    done = 0
    if cfg.output.resume:
        ckpt = load_checkpoint(run.latest_checkpoint)
        model.load_state_dict(ckpt.model)
        done = ckpt.step
    elif cfg.federation.init_checkpoint:
        load_initial_weights(model, cfg.federation.init_checkpoint, cfg, image_shape)
    fed = cfg.federation
    min_sites = fed.min_sites or fed.num_sites
    strategy = DeltaFedAvg(get_weights(model), num_sites=fed.num_sites, min_sites=min_sites,
                           fraction_fit=fed.fraction_fit, round_offset=done, wait_timeout=fed.round_timeout)
    if done == 0:
        run.append_metrics({"event": "start", "parameters": count_parameters(model), "image_shape": image_shape,
                            "sites": fed.num_sites, "rounds": fed.rounds, "privacy": privacy_label(cfg),
                            "init_checkpoint": fed.init_checkpoint or None})
        save_checkpoint(Checkpoint(model=model.state_dict(), config=cfg, image_shape=image_shape, step=0,
                                   extra={"kind": "federated", "privacy": privacy_label(cfg)}),
                        run.checkpoints / "round_0000.pt")
    fit_round = fit_round_type(cfg=cfg, run=run, strategy=strategy, model=model, image_shape=image_shape,
                               device=device)
    if fed.rounds > done:
        legacy = LegacyContext(context=context, strategy=strategy,
                               config=ServerConfig(num_rounds=fed.rounds - done, round_timeout=fed.round_timeout))
        from medfed.evaluation.federated import FederatedEvaluation

        evaluate_round = FederatedEvaluation(cfg=cfg, run=run, image_shape=image_shape, device=device,
                                             round_offset=done)
        DefaultWorkflow(fit_workflow=fit_round, evaluate_workflow=evaluate_round)(grid, legacy)
    write_summary(run, cfg)
    return run


def load_initial_weights(model: torch.nn.Module, path: str, cfg: RunConfig,
                         image_shape: tuple[int, int, int]) -> None:
    """Load a checkpoint's sampling weights as the first global model; it must match the run's preset and shape."""
    ckpt = load_checkpoint(path)
    if ckpt.config.model.preset != cfg.model.preset or tuple(ckpt.image_shape) != tuple(image_shape):
        raise ConfigError(f"config key 'federation.init-checkpoint': {path} is a {ckpt.config.model.preset} model "
                          f"for {tuple(ckpt.image_shape)} images; this run trains {cfg.model.preset} on {image_shape}")
    model.load_state_dict(ckpt.sampling_weights())


def write_summary(run: RunDir, cfg: RunConfig) -> dict[str, Any]:
    """``summary.json``: rounds completed, rounds skipped, final per-site loss, privacy spent, outputs."""
    records = [r for r in run.read_metrics() if "round" in r]
    last = records[-1] if records else {}
    summary = {
        "rounds_completed": sum(1 for r in records if r["aggregated"]),
        "rounds_skipped": [r["round"] for r in records if not r["aggregated"]],
        "last_round": last.get("round", 0),
        "final_train_loss": last.get("train_loss", {}),
        "mean_round_wall_s": float(np.mean([r["wall_s"] for r in records])) if records else 0.0,
        "checkpoint": str(run.latest_checkpoint),
        "samples": sorted(str(p) for p in run.samples.glob("*.png"))[-1:],
        "sites": cfg.federation.num_sites,
        "privacy": privacy_summary(records, cfg),
        "secure_aggregation": secagg_summary(records, cfg),
    }
    run.write_json(run.summary_path, summary)
    return summary


def secagg_summary(records: list[dict[str, Any]], cfg: RunConfig) -> dict[str, Any]:
    """Whether every round's update was securely aggregated, and with which parameters."""
    if not cfg.secagg.enabled:
        return {"used": False, "note": "secagg.enabled was false: the server saw each site's update"}
    return {"used": True, "protocol": "SecAgg+ (Flower legacy workflow)",
            "rounds": {r["round"]: r["secure_aggregation"] for r in records},
            "note": "honest-but-curious server; masks from ChaCha20 keyed by the full shared secret"}


def privacy_summary(records: list[dict[str, Any]], cfg: RunConfig) -> dict[str, Any]:
    """Per site: the latest epsilon it reported (computed by its own accountant) and its cap."""
    if not cfg.privacy.enabled:
        return {"label": "NOT PRIVATE", "note": "privacy.enabled was false: no differential privacy guarantee"}
    sites: dict[str, dict[str, Any]] = {}
    for r in records:
        for site, eps in r.get("epsilon", {}).items():
            sites[site] = {"epsilon": eps, "delta": r["delta"].get(site), "cap_epsilon": r["cap_epsilon"].get(site),
                           "last_round": r["round"]}
    return {"label": privacy_label(cfg), "accountant": cfg.privacy.accountant,
            "target_epsilon": cfg.privacy.target_epsilon, "max_grad_norm": cfg.privacy.max_grad_norm,
            "noise_multiplicity": cfg.privacy.noise_multiplicity, "sites": sites,
            "note": "epsilon as computed and reported by each site's own accountant; the server cannot verify it. "
                    "Reported training losses and example counts are not covered by the guarantee."}
