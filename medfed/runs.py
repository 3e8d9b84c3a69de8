"""The run folder: one directory per run holding config, metrics, checkpoints, samples and summaries."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medfed.config import RUN_CONFIG_FILE, RunConfig, to_dict, write_config_file
from medfed.contracts import RoundRecord, round_records
from medfed.errors import ConfigError, MedfedError


class IncompleteRunError(MedfedError):
    """A federated run aggregated fewer rounds than it was asked for."""


@dataclass(frozen=True)
class RunDir:
    """Paths of one run's outputs under ``root``."""

    root: Path

    @property
    def config_path(self) -> Path:
        return self.root / "config.json"

    @property
    def metrics_path(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def latest_checkpoint(self) -> Path:
        return self.checkpoints / "latest.pt"

    @property
    def samples(self) -> Path:
        return self.root / "samples"

    @property
    def summary_path(self) -> Path:
        return self.root / "summary.json"

    def append_metrics(self, record: dict[str, Any]) -> None:
        """Append one JSON line to ``metrics.jsonl``."""
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.exists():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]

    def rounds(self) -> list[RoundRecord]:
        """The federated rounds recorded in ``metrics.jsonl`` (typed; other lines skipped)."""
        return round_records(self.read_metrics())

    def require_rounds(self, asked: int) -> list[RoundRecord]:
        """The run's rounds, or :class:`IncompleteRunError` when fewer than ``asked`` were aggregated: the
        message lists each round that was not, with who refused or failed and why."""
        records = self.rounds()
        done = sum(1 for r in records if r.aggregated)
        if done < asked:
            lines = [r.summary_line() for r in records if not r.aggregated]
            missing = asked - len(records)
            if missing > 0:
                lines.append(f"{missing} round(s) never recorded (see {self.root / 'flower' / 'serverapp.log'})")
            raise IncompleteRunError(f"{self.root}: {done} of {asked} rounds aggregated; " + "; ".join(lines))
        return records

    def write_json(self, path: Path, obj: Any) -> Path:
        path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
        return path


def run_name(cfg: RunConfig) -> str:
    return cfg.output.name or time.strftime("%Y%m%d-%H%M%S")


def open_run(cfg: RunConfig, name: str | None = None) -> RunDir:
    """Create the run folder (or reopen it when ``output.resume`` is set) and write ``config.json`` and
    ``run.toml``.

    Raises:
        ConfigError: the folder already holds a run and ``output.resume`` is off, or resume finds no run or a
            checkpoint of another model (:func:`medfed.checkpoint.require_same_model`).
    """
    run = RunDir(Path(cfg.output.dir).expanduser().resolve() / (name or run_name(cfg)))
    if cfg.output.resume:
        if not run.latest_checkpoint.exists():
            raise ConfigError(f"{run.root}: nothing to resume (no checkpoints/latest.pt)")
        from medfed.checkpoint import load_checkpoint, require_same_model

        # before config.json is rewritten: a refused resume leaves the run folder as it was
        require_same_model(load_checkpoint(run.latest_checkpoint), cfg, None, key="output.resume",
                           path=run.latest_checkpoint)
    elif run.config_path.exists():
        raise ConfigError(f"{run.root}: run folder already exists; pass --resume or choose another --name")
    for folder in (run.root, run.checkpoints, run.samples):
        folder.mkdir(parents=True, exist_ok=True)
    run.write_json(run.config_path, to_dict(cfg))
    write_config_file(cfg, run.root / RUN_CONFIG_FILE)  # `--config run.toml` reads it back
    return run
