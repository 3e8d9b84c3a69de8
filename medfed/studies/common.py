"""What every study shares: its folder and report files, the machine it ran on, the CPU time of its Flower
processes, the named feature network that scores it, federated runs and what the sites' ledgers say. Its settings
and the run configs derived from them are :mod:`medfed.studies.settings`.

A study folder (``runs/study-<name>-<timestamp>/`` or ``--out``) holds:

* ``study.json``: the command, the machine, every option, the feature network (name, sha256, test accuracy) and
  one record per setting, rewritten after each setting, so an interrupted study keeps what it finished
  (``complete`` says whether it did);
* ``report.md`` and its plots (PNG);
* ``runs/<setting>/``: each federated run folder (config, ``metrics.jsonl``, checkpoints, sample grid);
* ``site-state/``: the simulated sites' privacy ledgers;
* ``feature-classifier.pt``: the domain classifier trained for the study (when ``feature_network=classifier``).
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from medfed.config import RunConfig, from_dict
from medfed.datasets import ImageDataset
from medfed.devices import describe_machine, resolve_device
from medfed.errors import ConfigError, MedfedError
from medfed.evaluation.features import load_feature_network
from medfed.evaluation.scoring import Scorer
from medfed.contracts import RoundRecord
from medfed.runs import RunDir
from medfed.studies.settings import CLASSIFIER, StudySetup, check_setup, load_split, options_record

STUDY_FILE = "study.json"
REPORT_FILE = "report.md"
NOT_PRIVATE = "NOT PRIVATE"

console = Console(stderr=True, soft_wrap=True)


# ------------------------------------------------------------------------------------------- folder and report

def study_folder(name: str, out: str | Path | None) -> Path:
    """The study's folder: ``out``, or ``runs/study-<name>-<timestamp>``; an existing study there is refused."""
    folder = Path(out) if out else Path("runs") / f"study-{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    folder = folder.expanduser().resolve()
    if (folder / STUDY_FILE).exists():
        raise ConfigError(f"{folder}: already holds a study ({STUDY_FILE}); choose another --out")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def study_header(name: str, options: Any, command: str) -> dict[str, Any]:
    """The opening fields of ``study.json``: what ran, where, with which options."""
    return {"study": name, "command": command, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": describe_machine(), "options": options_record(options), "complete": False}


def write_study(folder: Path, payload: dict[str, Any], markdown: Callable[[dict[str, Any]], str], start: float,
                meter: CpuMeter) -> None:
    """Stamp the study's wall time since ``start`` (``time.perf_counter``) and CPU time so far into ``payload``,
    then write ``study.json`` and ``report.md`` (``markdown(payload)``), each replaced atomically."""
    payload.update(wall_s=time.perf_counter() - start, cpu_s=meter.cpu_s)
    for name, text in ((STUDY_FILE, json.dumps(payload, indent=2, default=str) + "\n"),
                       (REPORT_FILE, markdown(payload))):
        tmp = folder / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, folder / name)


def announce(message: str) -> None:
    """One progress line on stderr (the long steps draw their own bars)."""
    console.print(f"[bold cyan]study:[/] {message}", highlight=False)


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table (the evaluation report's writer)."""
    from medfed.evaluation.report import _md_table

    return _md_table(list(header), [list(r) for r in rows])


def fmt(value: float | None, decimals: int = 2) -> str:
    """A table cell: fixed decimals; ``-`` only where a number does not apply (never for a missing one)."""
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        raise MedfedError(f"a study number is {value}: refusing to tabulate it")
    return f"{value:.{decimals}f}"


def document(lines: Sequence[str], payload: Mapping[str, Any], finished: str) -> str:
    """A study's Markdown: ``lines`` (title first), the machine lines, and a warning under the title while the
    study is incomplete (``finished``: what is done so far, e.g. "3 settings")."""
    out = [*lines, *machine_lines(payload)]
    if not payload.get("complete"):
        out.insert(2, f"**Incomplete: {finished} finished so far.**\n")
    return "\n".join(out) + "\n"


def machine_lines(payload: Mapping[str, Any]) -> list[str]:
    """Markdown bullet lines: command, machine, load, wall and CPU time."""
    m = payload["machine"]
    lines = [f"- command: `{payload['command']}`",
             f"- machine: {m['cpu_count']} CPUs ({m['platform']}), torch {m['torch']} with {m['torch_threads']} "
             f"threads, GPU: {m['cuda'] or 'none'}; load average at start {m['load_average_1m']:.1f} (1 min), "
             f"{m['load_average_15m']:.1f} (15 min)"]
    if "wall_s" in payload:
        lines.append(f"- wall time {payload['wall_s'] / 60:.1f} min, CPU time {payload['cpu_s'] / 60:.1f} min "
                     "(this process and its Flower processes, sampled each second; on a shared machine the wall "
                     "time grows with the load, the CPU time much less)")
    return lines


# ------------------------------------------------------------------------------------------------- CPU time

class CpuMeter:
    """CPU seconds of this process plus every process whose ``FLWR_HOME`` lies under ``root``: the SuperLink,
    simulation and Ray worker processes of the study's federated runs (their ``FLWR_HOME`` is inside each run
    folder). Polled every ``interval`` seconds by a thread, so it is a slight lower bound.

    Use as a context manager; read :attr:`cpu_s` at any time.
    """

    def __init__(self, root: Path, interval: float = 1.0) -> None:
        self.marker = f"FLWR_HOME={Path(root).resolve()}".encode()
        self.interval = interval
        self.tick = os.sysconf("SC_CLK_TCK")
        self.others: dict[int, float] = {}
        self.ignored: set[int] = set()
        self.own_start = time.process_time()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="medfed-cpu-meter")

    def __enter__(self) -> CpuMeter:
        self.own_start = time.process_time()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.poll()

    @property
    def cpu_s(self) -> float:
        return time.process_time() - self.own_start + sum(self.others.values())

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.poll()

    def poll(self) -> None:
        """Read the CPU time of every matching process now."""
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            if pid in self.ignored:
                continue
            try:
                if pid not in self.others:
                    environ = Path(f"/proc/{pid}/environ").read_bytes()
                    if not any(v.startswith(self.marker) for v in environ.split(b"\0")):
                        self.ignored.add(pid)
                        continue
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                self.others[pid] = max(self.others.get(pid, 0.0), (int(fields[11]) + int(fields[12])) / self.tick)
            except (OSError, IndexError, ValueError):
                self.ignored.add(pid)


# ------------------------------------------------------------------------------------------ data and configs

def open_study(name: str, setup: StudySetup, out: str | Path | None) -> tuple[ImageDataset, ImageDataset,
                                                                             torch.device, Path]:
    """Check the setup and load the data (the train split's ``data.limit`` subset, the whole test split) before
    creating the study folder, so bad input leaves nothing behind. Returns train, test, device and folder."""
    check_setup(setup)
    train = load_split(setup, "train", setup.base.data.limit)
    test = load_split(setup, "test")
    device = resolve_device(setup.base.train.device)
    return train, test, device, study_folder(name, out)


def federated_run(cfg: RunConfig, setup: StudySetup, show_progress: bool = True) -> tuple[RunDir, RunConfig]:
    """Run ``cfg`` with real Flower (:func:`run_simulation`); returns the run folder and the config the server
    used (resolved: absolute paths, image shape)."""
    from medfed.launch.simulation import run_simulation

    run = run_simulation(cfg, parallel_sites=setup.parallel_sites, cpus_per_site=setup.cpus_per_site,
                         show_progress=show_progress)
    try:
        run.require_rounds(cfg.federation.rounds)
    except MedfedError as err:
        raise MedfedError(f"{err}. The study compares settings at equal compute, so it stops here; finished "
                          "settings stay in study.json.") from None
    return run, from_dict(json.loads(run.config_path.read_text()))


def round_records(run: RunDir) -> list[RoundRecord]:
    return run.rounds()


def sample_grid(run: RunDir) -> str:
    """The path of the server's last sample grid of the run ("" when it wrote none)."""
    grids = sorted(run.samples.glob("*.png"))
    return str(grids[-1]) if grids else ""


# ------------------------------------------------------------------------------------------------ privacy

def ledger_record(state_dir: Path, delta: float, accountant: str) -> dict[str, Any]:
    """What a site's verified ledger says: epsilon of everything it records (at ``delta``), its round entries
    (noise multipliers, sample rates, steps) and refusals."""
    from medfed.privacy.budget import history_of, spent_epsilon
    from medfed.privacy.ledger import site_ledger

    ledger = site_ledger(state_dir)
    entries = ledger.entries()
    history = history_of(entries)
    return {"state_dir": str(state_dir), "epsilon": spent_epsilon(ledger, delta, accountant), "delta": delta,
            "accountant": accountant, "rounds": len(history), "steps": sum(int(s) for _, _, s in history),
            "noise_multipliers": sorted({float(sigma) for sigma, _, _ in history}),
            "sample_rates": sorted({float(q) for _, q, _ in history}),
            "refusals": [e.data["reason"] for e in entries if e.kind == "refusal"]}


def simulated_ledgers(cfg: RunConfig) -> dict[str, dict[str, Any]]:
    """Each simulated site's ledger record (``site-<i>``), from the state folders the run's sites used."""
    from medfed.federation.policy import simulated_node
    from medfed.federation.site import load_site

    n = cfg.federation.num_sites
    return {f"site-{i}": ledger_record(load_site(cfg, simulated_node(cfg, i, n)).state_dir, cfg.privacy.delta,
                                       cfg.privacy.accountant) for i in range(n)}


def reported_epsilons(run: RunDir) -> dict[str, float]:
    """The epsilon each site reported after its last round (``summary.json``; computed by the site)."""
    summary = json.loads(run.summary_path.read_text())
    return {site: float(v["epsilon"]) for site, v in summary.get("privacy", {}).get("sites", {}).items()}


# -------------------------------------------------------------------------------------------------- scores

def prepare_scorer(setup: StudySetup, folder: Path, device: torch.device, show_progress: bool = True) -> Scorer:
    """Load the feature network, or train the domain classifier with ``medfed evaluate train-features``' code
    on the dataset's whole train split (test accuracy on its test split) and save it in the study folder."""
    from medfed.evaluation.classifier import save_classifier, train_classifier

    spec = setup.feature_network
    if spec == CLASSIFIER:
        announce(f"training the domain classifier (feature network) on the train split of {setup.base.data.path}")
        train, test = load_split(setup, "train"), load_split(setup, "test")
        trained = train_classifier(train, test, dataset=setup.base.data.path, epochs=setup.classifier_epochs,
                                   seed=setup.base.train.seed, device=device, show_progress=show_progress)
        path = save_classifier(trained, folder / "feature-classifier.pt")
        network = load_feature_network(str(path), device=device)  # the saved, hash-checked file
        record = {"file": str(path), **network.info}
    else:
        network = load_feature_network(spec, device=device)
        record = {"file": spec if Path(spec).expanduser().is_file() else "", **getattr(network, "info", {})}
    record.update({"name": network.name, "spec": spec})
    return Scorer(network=network, record=record, seed=setup.base.train.seed)


def network_line(record: Mapping[str, Any]) -> str:
    """One sentence naming the feature network, for every table's caption."""
    text = f"Feature network `{record['name']}`"
    if "test_accuracy" in record:
        text += (f" (medfed's domain classifier, trained on {record.get('num_train')} images, test accuracy "
                 f"{record['test_accuracy']:.3f} on {record.get('num_test')} test images; sha256 "
                 f"`{record.get('sha256', '')[:16]}…`). Its numbers are not comparable with Inception FIDs "
                 "from papers")
    return text + "."


def sample_model(model: torch.nn.Module, cfg: RunConfig, setup: StudySetup, image_shape: tuple[int, int, int],
                 device: torch.device, show_progress: bool = True, num: int | None = None) -> torch.Tensor:
    """``setup.num_samples`` (or ``num``) images (N, C, H, W) in [-1, 1] from ``model``: DDIM with
    ``setup.sample_steps`` steps, seeded by the base's ``train.seed``, through
    :func:`medfed.diffusion.sample_images`."""
    from medfed.diffusion import sample_images

    return sample_images(model.to(device), cfg.diffusion, num or setup.num_samples, image_shape, device=device,
                         seed=setup.base.train.seed, sampler="ddim", steps=setup.sample_steps,
                         show_progress=show_progress)


def sample_checkpoint(path: Path, setup: StudySetup, device: torch.device,
                      show_progress: bool = True) -> torch.Tensor:
    """:func:`sample_model` of a checkpoint's sampling weights."""
    from medfed.generate import load_model

    model, ckpt = load_model(path, device)
    return sample_model(model, ckpt.config, setup, tuple(ckpt.image_shape), device, show_progress)


def bar_plot(panels: Sequence[tuple[str, str, Sequence[str], Mapping[str, Sequence[float]]]], path: Path) -> Path:
    """A PNG with one grouped bar chart per ``(title, ylabel, group names, {series: one value per group})``,
    side by side, in the style of :func:`medfed.plots.line_plot` (which draws lines, not categories)."""
    import numpy as np

    from medfed.plots import plt  # the headless (Agg) matplotlib that medfed.plots sets up

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (title, ylabel, groups, series) in zip(axes[0], panels):
        width = 0.8 / max(1, len(series))
        for i, (name, values) in enumerate(series.items()):
            ax.bar(np.arange(len(groups)) + (i - (len(series) - 1) / 2) * width, list(values), width, label=name)
        ax.set_xticks(np.arange(len(groups)), list(groups))
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
