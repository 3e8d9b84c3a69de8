"""``medfed study clients``: how quality and privacy change with the number of sites.

The same training images (``limit`` of the train split) are split across 2, 5, 10, 20 or 50 simulated sites, IID
or label-skewed (Dirichlet beta), and trained with the same compute in every setting: ``rounds`` x
``local_epochs`` passes over the whole data (each image is used that often; the local optimizer steps, recorded
per setting, differ only by each site rounding its last batch up). Each setting is a real Flower run (DP-SGD and
SecAgg+ on), and again without DP, labelled NOT PRIVATE. The final global model's samples are scored against the
whole test split on the study's named feature network; epsilon is what each site's ledger records.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medfed.config import RunConfig, to_flat, validate
from medfed.errors import ConfigError
from medfed.federation.partition import partition
from medfed.federation.server import privacy_label
from medfed.plots import line_plot
from medfed.runs import RunDir
from medfed.studies.common import (
    NOT_PRIVATE,
    CpuMeter,
    announce,
    document,
    federated_run,
    fmt,
    md_table,
    network_line,
    open_study,
    prepare_scorer,
    reported_epsilons,
    round_records,
    sample_checkpoint,
    sample_grid,
    simulated_ledgers,
    study_header,
    write_study,
)
from medfed.studies.settings import StudySetup, run_config, study_base

NAME = "clients"
PLOT = "clients.png"
PARTITIONS = ("iid", "dirichlet")


@dataclass(frozen=True)
class ClientsOptions:
    """The grid of the clients study.

    Attributes:
        setup: data, model, training, privacy and scoring settings shared by every setting.
        site_counts: numbers of sites to split the same data across.
        partitions: ``iid`` and/or ``dirichlet``.
        beta: Dirichlet concentration of the label-skewed split.
        private: ``True`` (DP-SGD) and/or ``False`` (no DP: NOT PRIVATE) arms.
    """

    setup: StudySetup
    site_counts: tuple[int, ...] = (3, 5, 10)
    partitions: tuple[str, ...] = PARTITIONS
    beta: float = 0.5
    private: tuple[bool, ...] = (True, False)


def small_options(data_path: str) -> ClientsOptions:
    """The default: 600 training images, micro UNet, 2 rounds, 3/5/10 sites (about 30 minutes on 2 CPU cores)."""
    return ClientsOptions(StudySetup(study_base(data_path)))


def full_options(data_path: str) -> ClientsOptions:
    """``--full``, for a GPU machine: the whole train split, tiny UNet, 20 rounds, 3/5/10/20/50 sites, 1,000
    samples with 50 DDIM steps, four sites training at once."""
    return ClientsOptions(StudySetup(study_base(data_path, limit=0, preset="tiny", rounds=20, lr=2e-4),
                                     num_samples=1000, sample_steps=50, parallel_sites=4, cpus_per_site=4),
                          site_counts=(3, 5, 10, 20, 50))


@dataclass(frozen=True)
class Setting:
    sites: int
    partition: str
    private: bool

    @property
    def name(self) -> str:
        return f"sites{self.sites:02d}-{self.partition}-{'dp' if self.private else 'not-private'}"

    @property
    def label(self) -> str:
        return f"{self.sites} sites, {self.partition}, {'DP-SGD' if self.private else NOT_PRIVATE}"


def check_options(options: ClientsOptions) -> None:
    if not options.site_counts or min(options.site_counts) < 3:
        raise ConfigError(f"--sites {','.join(map(str, options.site_counts))}: every count must be >= 3 "
                          "(secure aggregation over 2 sites would show each site the other's update)")
    unknown = [p for p in options.partitions if p not in PARTITIONS]
    if not options.partitions or unknown:
        raise ConfigError(f"--partitions: {','.join(unknown) or 'empty'} (choose from {', '.join(PARTITIONS)})")
    if not options.private:
        raise ConfigError("--privacy: choose dp, none or both")
    if options.beta <= 0:
        raise ConfigError(f"--beta {options.beta:g}: must be > 0")


def setting_config(cfg: RunConfig, s: Setting, beta: float) -> RunConfig:
    """The study's run config ``cfg`` for setting ``s``: its sites and split, DP-SGD on or off (the simulated
    sites' policy requires DP exactly in the DP arm); checked."""
    cfg = dataclasses.replace(
        cfg, federation=dataclasses.replace(cfg.federation, num_sites=s.sites, partition=s.partition,
                                            dirichlet_beta=beta),
        privacy=dataclasses.replace(cfg.privacy, enabled=s.private),
        policy=dataclasses.replace(cfg.policy, require_dp=s.private))
    validate(cfg)
    return cfg


def settings_of(options: ClientsOptions) -> list[Setting]:
    return [Setting(n, p, private) for n in sorted(set(options.site_counts)) for p in options.partitions
            for private in options.private]


def local_steps(shards: list[np.ndarray], batch_size: int, rounds: int, local_epochs: int) -> int:
    """Optimizer steps of all sites over the run: each site takes ceil(n_i / B) steps per local epoch (DP-SGD's
    Poisson batches have that count too, with expected size n_i / ceil(n_i / B))."""
    return rounds * local_epochs * sum(math.ceil(len(s) / batch_size) for s in shards)


def run_clients_study(options: ClientsOptions, out: str | Path | None = None, command: str = "",
                      show_progress: bool = True) -> Path:
    """Run every setting of the grid; returns the study folder (``study.json``, ``report.md``, ``clients.png``).

    Raises:
        ConfigError, DatasetError: bad options or data, before any training.
        MedfedError: a federated run failed; the settings finished before it stay in ``study.json``.
    """
    setup = options.setup
    check_options(options)
    train, test, device, folder = open_study(NAME, setup, out)
    plans: list[tuple[Setting, RunConfig, list[np.ndarray]]] = []
    for s in settings_of(options):  # every config and split is checked before the first run starts
        cfg = setting_config(run_config(setup, folder, s.name, train.image_shape), s, options.beta)
        shards = partition(train.labels.numpy(), s.sites, s.partition, options.beta, seed=cfg.train.seed)
        plans.append((s, cfg, shards))
    payload = study_header(NAME, options, command)
    payload.update({"training_images": len(train), "training_source": train.name, "results": []})
    start = time.perf_counter()
    with CpuMeter(folder) as meter:
        scorer = prepare_scorer(setup, folder, device, show_progress)
        reference = scorer.features(test.images, f"{test.name} ({len(test)} images)")
        payload.update({"feature_network": scorer.record, "reference": reference.source})
        for index, (s, cfg, shards) in enumerate(plans, start=1):
            announce(f"[{index}/{len(plans)}] {s.label}: federated run of {len(train)} images")
            t0, c0 = time.perf_counter(), meter.cpu_s
            run, used = federated_run(cfg, setup, show_progress)
            trained_s = time.perf_counter() - t0
            announce(f"[{index}/{len(plans)}] {s.label}: scoring {setup.num_samples} samples on {scorer.name}")
            scores = scorer.score(reference, sample_checkpoint(run.latest_checkpoint, setup, device, show_progress))
            payload["results"].append(setting_record(s, options, used, run, shards, scores, scorer.name, {
                "federated": trained_s, "total": time.perf_counter() - t0}, meter.cpu_s - c0))
            write_study(folder, payload, markdown, start, meter)
            plot(payload, folder / PLOT)
        payload["complete"] = True
    write_study(folder, payload, markdown, start, meter)
    return folder


def setting_record(s: Setting, options: ClientsOptions, cfg: RunConfig, run: RunDir, shards: list[np.ndarray],
                   scores: dict[str, float], network: str, wall_s: dict[str, float], cpu_s: float) -> dict[str, Any]:
    """One row of ``study.json``: the setting, its compute, scores, privacy spent, timings and full config."""
    sizes = [len(x) for x in shards]
    records = round_records(run)
    last_losses = list(records[-1].train_loss.values()) if records else []  # NOT PRIVATE runs only
    fed = cfg.federation
    record: dict[str, Any] = {
        "setting": s.name, "sites": s.sites, "partition": s.partition,
        "dirichlet_beta": options.beta if s.partition == "dirichlet" else None,
        "privacy": privacy_label(cfg),
        "site_images": {"min": min(sizes), "median": float(np.median(sizes)), "max": max(sizes),
                        "total": sum(sizes)},
        "compute": {"rounds": fed.rounds, "local_epochs": fed.local_epochs, "batch_size": cfg.train.batch_size,
                    "image_passes": fed.rounds * fed.local_epochs * sum(sizes),
                    "local_steps": local_steps(shards, cfg.train.batch_size, fed.rounds, fed.local_epochs)},
        "rounds_completed": sum(1 for r in records if r.aggregated),
        "final_train_loss": float(np.mean(last_losses)) if last_losses else None,
        "feature_network": network, "scores": scores, "epsilon": None,
        "run": str(run.root), "sample_grid": sample_grid(run), "wall_s": wall_s, "cpu_s": cpu_s,
        "config": to_flat(cfg),
    }
    if cfg.privacy.enabled:
        ledgers = simulated_ledgers(cfg)
        reported = reported_epsilons(run)
        spent = [v["epsilon"] for v in ledgers.values()]
        record["epsilon"] = {
            "max": max(spent), "min": min(spent), "delta": cfg.privacy.delta, "accountant": cfg.privacy.accountant,
            "target": cfg.privacy.target_epsilon, "per_site": {k: v["epsilon"] for k, v in ledgers.items()},
            "reported_by_sites": reported,
            "ledgers_match_reports": all(abs(ledgers[k]["epsilon"] - v) < 1e-9 for k, v in reported.items())
            and set(reported) == set(ledgers),
            "noise_multipliers": sorted({m for v in ledgers.values() for m in v["noise_multipliers"]}),
            "sample_rates": sorted({q for v in ledgers.values() for q in v["sample_rates"]}),
            "ledger_steps": sum(v["steps"] for v in ledgers.values()),
            "refusals": [r for v in ledgers.values() for r in v["refusals"]],
        }
    return record


def arm(r: dict[str, Any]) -> str:
    private = "DP" if r["epsilon"] is not None else NOT_PRIVATE
    return f"{r['partition']}{'' if r['dirichlet_beta'] is None else ' b=' + format(r['dirichlet_beta'], 'g')}, " \
           f"{private}"


def plot(payload: dict[str, Any], path: Path) -> Path:
    """FID, the largest site epsilon and noise multiplier, and the local optimizer steps against the number of
    sites."""
    fid: dict[str, tuple[list[float], list[float]]] = {}
    eps: dict[str, tuple[list[float], list[float]]] = {}
    steps: dict[str, tuple[list[float], list[float]]] = {}

    def add(series: dict[str, tuple[list[float], list[float]]], name: str, x: float, y: float) -> None:
        xs, ys = series.setdefault(name, ([], []))
        if x not in xs:  # local steps are the same for both privacy arms
            xs.append(x)
            ys.append(y)

    sigma: dict[str, tuple[list[float], list[float]]] = {}
    for r in payload["results"]:
        add(fid, arm(r), r["sites"], r["scores"]["fid"])
        add(steps, r["partition"], r["sites"], r["compute"]["local_steps"])
        if r["epsilon"] is not None:
            add(eps, r["partition"], r["sites"], r["epsilon"]["max"])
            add(sigma, r["partition"], r["sites"], max(r["epsilon"]["noise_multipliers"]))
    setup = payload["options"]["setup"]
    return line_plot([(f"FID ({payload['feature_network']['name']})", "FID (lower is better)", fid),
                      ("epsilon of the most spent site (DP arms)", "epsilon", eps),
                      ("largest noise multiplier of a site (DP arms)", "sigma", sigma),
                      ("local optimizer steps, all sites and rounds", "steps", steps)], path, xlabel="sites",
                     hlines={1: {"planned epsilon": setup["target_epsilon"], "site cap": setup["cap_epsilon"]}})


def epsilon_note(results: list[dict[str, Any]]) -> str:
    dp = [r for r in results if r["epsilon"] is not None]
    if not dp:
        return "- no DP setting has finished (NOT PRIVATE runs have no epsilon)."
    return (f"- epsilon: the largest epsilon any site's verified privacy ledger records after the run, at delta "
            f"{dp[0]['epsilon']['delta']:g} ({dp[0]['epsilon']['accountant']} accountant, computed by each site). "
            "A site with fewer images than a batch samples every image at every step (sample rate 1): no "
            "amplification by subsampling, so it needs more noise for the same epsilon.")


def markdown(payload: dict[str, Any]) -> str:
    setup = payload["options"]["setup"]
    results = payload["results"]
    header = ["sites", "split", "privacy", "images per site (min-max)", "local steps", "FID", "KID",
              "epsilon (max over sites)", "noise multiplier (max)", "final loss", "wall (min)"]
    rows = [[str(r["sites"]), r["partition"] + ("" if r["dirichlet_beta"] is None else f" (b={r['dirichlet_beta']:g})"),
             "DP-SGD" if r["epsilon"] is not None else NOT_PRIVATE,
             f"{r['site_images']['min']}-{r['site_images']['max']}", str(r["compute"]["local_steps"]),
             fmt(r["scores"]["fid"], 1), fmt(r["scores"]["kid"], 3),
             fmt(r["epsilon"]["max"], 2) if r["epsilon"] is not None else NOT_PRIVATE,
             fmt(max(r["epsilon"]["noise_multipliers"]), 3) if r["epsilon"] is not None else NOT_PRIVATE,
             fmt(r["final_train_loss"], 3), fmt(r["wall_s"]["total"] / 60, 1)] for r in results]
    fed = f"{setup['rounds']} rounds x {setup['local_epochs']} local epoch(s)"
    lines = [
        "# Study: number of clients", "",
        f"The same {payload['training_images']} training images ({payload['training_source']}) split across "
        f"{', '.join(str(n) for n in payload['options']['site_counts'])} simulated sites, with the same compute in "
        f"every setting: {fed}, so each image is used {setup['rounds'] * setup['local_epochs']} times. "
        f"`{setup['preset']}` UNet, batch {setup['batch_size']}, lr {setup['lr']:g}; real Flower runs with "
        "SecAgg+; DP-SGD with each site planning epsilon "
        f"{setup['target_epsilon']:g} (cap {setup['cap_epsilon']:g}), or no DP (NOT PRIVATE: no guarantee).", "",
        f"Scores: {setup['num_samples']} samples (DDIM, {setup['sample_steps']} steps, seed {setup['seed']}) of the "
        f"final global model against {payload.get('reference', 'the test split')}. "
        f"{network_line(payload['feature_network'])}", "",
        md_table(header, rows), "",
        f"![FID, epsilon and local steps against the number of sites]({PLOT})", "",
        epsilon_note(results),
        "- FID from a few hundred samples is biased upward; compare numbers only within this table.",
    ]
    return document(lines, payload, f"{len(results)} settings")
