"""``medfed evaluate RUN_DIR``: sample a checkpoint, score the samples on each feature network, audit them for
memorization, and write ``scores.json``, ``memorization.json``, ``report.md`` and ``report.html`` with sample grids.

Numbers from different feature networks go into separate tables; every table names its network, protocol,
reference images and sample counts. Per-site scores of federated runs (``evaluation.jsonl``) are tabulated too.
"""

from __future__ import annotations

import dataclasses
import html
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from medfed.config import DataConfig, RunConfig, from_flat
from medfed.datasets import ImageDataset, from_uint8, load_dataset
from medfed.devices import resolve_device
from medfed.diffusion import sample_images
from medfed.errors import DatasetError, MedfedError
from medfed.evaluation.features import STANDARD, TUN_COMPAT, extract_features, load_feature_network
from medfed.federation.evaluation import read_records
from medfed.evaluation.memorization import audit_memorization, images_sha256, write_audit
from medfed.evaluation.metrics import Score, compute_scores
from medfed.generate import load_model
from medfed.images import save_grid
from medfed.runs import RunDir

METRIC_LABELS = {
    "fid": "FID", "kid": "KID", "precision": "precision", "recall": "recall", "density": "density",
    "coverage": "coverage", "inception-score": "Inception Score", "classifier-score": "classifier score",
}
TUN_NOTE = ("NON-STANDARD. Tun et al. (2023)'s call: torchmetrics FID/IS on [-1, 1] tensors with normalize=True, "
            "whose (x*255).byte() wraps negative pixels. Only for comparison with their table; never beside "
            "standard FID.")


@dataclass(frozen=True)
class ReportOptions:
    """What ``medfed evaluate`` evaluates; empty fields take the run's own settings.

    Attributes:
        checkpoint: checkpoint to sample (default: the run's ``checkpoints/latest.pt``).
        generated: folder of generated PNGs (``medfed sample`` layout) or ``.npz`` to score instead of sampling.
        networks: feature networks, each scored in its own table (default: ``evaluation.feature-network``).
        overrides: ``section.key`` settings layered over the checkpoint's config (e.g. ``evaluation.num-samples``).
        real, real_format, real_split: reference images for the scores (default: the run's dataset, ``test``).
        memorization: run the memorization audit against the run's training images.
        sampler, steps, seed, device: sampling settings (default: the checkpoint's).
        out: output folder (default: ``<run>/evaluation/<checkpoint>-n<N>``).
    """

    checkpoint: str = ""
    generated: str = ""
    networks: tuple[str, ...] = ()
    overrides: dict[str, object] = field(default_factory=dict)
    real: str = ""
    real_format: str = "npz"
    real_split: str = "test"
    memorization: bool = True
    sampler: str | None = None
    steps: int | None = None
    seed: int | None = None
    device: str = "auto"
    out: str = ""


def load_generated(path: str | Path, image_shape: tuple[int, int, int] | None = None) -> ImageDataset:
    """Generated images from a ``.npz`` (``images`` array) or a folder of PNGs (``00000.png``..., as written by
    ``medfed sample``; ``grid.png`` and other non-numbered files are ignored when numbered ones exist)."""
    from torchvision.io import ImageReadMode, decode_image

    path = Path(path).expanduser()
    if path.suffix == ".npz":
        data = load_dataset(DataConfig(dataset="npz", path=str(path)))
    elif path.is_dir():
        files = sorted(p for p in path.glob("*.png") if p.stem.isdigit())
        if not files:
            data = load_dataset(DataConfig(dataset="folder", path=str(path)))
        else:
            mode = {1: ImageReadMode.GRAY, 3: ImageReadMode.RGB}.get(image_shape[0] if image_shape else 0,
                                                                      ImageReadMode.UNCHANGED)
            try:
                pixels = torch.stack([decode_image(str(f), mode=mode) for f in files])
            except (RuntimeError, OSError, ValueError) as err:
                raise DatasetError(f"{path}: cannot read the generated PNGs ({err})") from err
            data = from_uint8(pixels, None, f"{path.name} (generated)", channels_last=False)
    else:
        raise DatasetError(f"{path}: generated images must be a folder of PNGs or a .npz file")
    if image_shape is not None and data.image_shape != tuple(image_shape):
        raise DatasetError(f"{path}: generated images are {data.image_shape}, the model makes {tuple(image_shape)}")
    return data


def reference_config(cfg: RunConfig, shape: tuple[int, int, int], split: str) -> DataConfig:
    """The run's dataset at ``split``, converted to the model's image shape."""
    return dataclasses.replace(cfg.data, split=split, channels=shape[0], image_size=shape[1])


def training_images(cfg: RunConfig, shape: tuple[int, int, int]) -> ImageDataset:
    """The images the run trained on (all sites' together in a simulation), for the memorization audit."""
    data = reference_config(cfg, shape, "train")
    if not data.site_entries:
        return load_dataset(data, seed=cfg.train.seed)
    parts = [load_dataset(dataclasses.replace(data, dataset=fmt, path=path, site_paths=""), seed=cfg.train.seed)
             for fmt, path in data.site_entries]
    return ImageDataset(torch.cat([p.images for p in parts]), torch.cat([p.labels for p in parts]),
                        "all sites' training images")


def _load_reference(what: str, load: Any) -> ImageDataset:
    try:
        return load()
    except MedfedError as err:
        raise DatasetError(f"{what} not available here ({err}); pass --real PATH, or read the per-site scores in "
                           "evaluation.jsonl (deployments keep the images at the sites)") from err


def evaluate_run(run_dir: str | Path, options: ReportOptions = ReportOptions(), show_progress: bool = True) -> Path:
    """Evaluate a run folder's checkpoint; returns the output folder (see the module docstring)."""
    run = RunDir(Path(run_dir).expanduser().resolve())
    checkpoint = Path(options.checkpoint) if options.checkpoint else run.latest_checkpoint
    device = resolve_device(options.device)
    model, ckpt = load_model(checkpoint, device)
    cfg = from_flat(dict(options.overrides), base=ckpt.config)
    ev, shape = cfg.evaluation, tuple(ckpt.image_shape)
    seed = cfg.train.seed if options.seed is None else options.seed
    # Everything that can fail (networks, reference images) is loaded before the slow sampling.
    networks = options.networks or (ev.feature_network,)
    runs = [(spec, protocol, load_feature_network(spec, inception_weights=ev.inception_weights,
                                                  allow_download=ev.allow_download, protocol=protocol, device=device))
            for spec in networks
            for protocol in [STANDARD] + ([TUN_COMPAT] if ev.protocol == TUN_COMPAT and spec == "inception" else [])]
    if options.real:
        real_cfg = DataConfig(dataset=options.real_format, path=options.real, split=options.real_split,
                              channels=shape[0], image_size=shape[1])
    else:
        real_cfg = dataclasses.replace(reference_config(cfg, shape, options.real_split), limit=0)
    real = _load_reference("reference images", lambda: load_dataset(real_cfg, seed=cfg.train.seed))
    reference = f"{real.name} ({len(real)} images)"
    train = _load_reference("the run's training images", lambda: training_images(cfg, shape)) \
        if options.memorization else None

    start = time.perf_counter()
    if options.generated:
        generated = load_generated(options.generated, shape).images
        source = f"{options.generated} (given)"
    else:
        generated = sample_images(model, cfg.diffusion, ev.num_samples, shape, device=device, seed=seed,
                                  sampler=options.sampler, steps=options.steps, show_progress=show_progress)
        source = (f"{checkpoint.name} (step {ckpt.step}), {options.sampler or cfg.diffusion.sampler} sampler, "
                  f"{options.steps or cfg.diffusion.sample_steps} steps, seed {seed}")
    sampling_s = time.perf_counter() - start
    out = Path(options.out) if options.out else run.root / "evaluation" / f"{checkpoint.stem}-n{len(generated)}"
    out.mkdir(parents=True, exist_ok=True)
    grid = save_grid(generated[:64], out / "samples.png")

    tables = []
    for _spec, protocol, network in runs:
        real_f = extract_features(network, real.images, source=reference, protocol=protocol,
                                  batch_size=ev.batch_size, show_progress=show_progress)
        gen_f = extract_features(network, generated, source="generated", protocol=protocol,
                                 batch_size=ev.batch_size, show_progress=show_progress)
        scores = compute_scores(real_f, gen_f, kid_subset_size=ev.kid_subset_size, prdc_k=ev.prdc_k, seed=seed)
        tables.append({"network": network.name, "protocol": protocol, "reference": reference,
                       "network_info": getattr(network, "info", {}), "scores": [s.to_dict() for s in scores]})

    audit = None
    if train is not None:
        audit = audit_memorization(generated, train.images, reference_source=f"{train.name} ({len(train)} images)",
                                   network=runs[0][2], threshold=ev.near_copy_threshold,
                                   max_fraction=ev.max_near_copy_fraction, batch_size=ev.batch_size,
                                   sheet_path=out / "closest_pairs.png", show_progress=show_progress)
        write_audit(audit, out / "memorization.json")

    result = {
        "run": str(run.root), "checkpoint": str(checkpoint), "step": ckpt.step, "generated": source,
        "num_generated": len(generated), "generated_sha256": images_sha256(generated), "sampling_s": sampling_s,
        "tables": tables, "memorization": audit, "federated": read_records(run),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (out / "scores.json").write_text(json.dumps(result, indent=2) + "\n")
    plot = run.root / "evaluation.png"
    plot_link = os.path.relpath(plot, out) if plot.exists() else None
    (out / "report.md").write_text(markdown_report(result, grid.name, plot_link))
    (out / "report.html").write_text(html_report(result, grid.name, plot_link))
    return out


def _fmt(value: float | None, digits: int = 4) -> str:
    if value is None:
        return "unavailable"
    return f"{value:.{digits}g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3e}"


def score_rows(scores: list[dict[str, Any]]) -> list[list[str]]:
    """Rows of metric, value, spread, N real, N generated, note."""
    rows = []
    for s in scores:
        score = Score(**s)
        rows.append([METRIC_LABELS.get(score.metric, score.metric), _fmt(score.value),
                     "" if score.std is None else _fmt(score.std), str(score.num_real or ""),
                     str(score.num_generated), score.note])
    return rows


def site_rows(record: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Per-site rows (and the example-weighted rows) of one federated evaluation record."""
    metrics = ["fid", "kid", "precision", "recall", "density", "coverage", "classifier-score", "inception-score",
               "near-copy-fraction", "num-real"]
    present = [m for m in metrics if any(m in s for s in record["sites"].values())]
    header = ["site", "feature network", *present, "audit"]
    rows = [[name, str(m.get("feature-network", "")), *[_fmt(m.get(k)) if k in m else "" for k in present],
             "passed" if m.get("memorization-passed") else "FAILED"] for name, m in sorted(record["sites"].items())]
    for group in record.get("weighted", []):
        means = group["means"]
        rows.append([f"weighted mean ({len(group['sites'])} sites)", group["feature_network"],
                     *[_fmt(means.get(k)) if k in means else "" for k in present], ""])
    return header, rows


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


SCORE_HEADER = ["metric", "value", "± (std)", "N real", "N generated", "note"]


def _table_title(table: dict[str, Any]) -> str:
    title = f"Feature network `{table['network']}`, protocol {table['protocol']}"
    info = table.get("network_info") or {}
    if "test_accuracy" in info:
        title += f" (domain classifier, test accuracy {info['test_accuracy']:.3f} on {info.get('num_test')} images)"
    return title


def markdown_report(result: dict[str, Any], grid_name: str, plot_link: str | None = None) -> str:
    parts = [f"# Evaluation of {Path(result['run']).name}", "",
             f"- generated: {result['num_generated']} images from {result['generated']}",
             f"- generated sha256: `{result['generated_sha256']}`", f"- created: {result['created']}", "",
             f"![samples]({grid_name})", ""]
    for table in result["tables"]:
        parts += [f"## {_table_title(table)}", "", f"Reference: {table['reference']}.", ""]
        if table["protocol"] == TUN_COMPAT:
            parts += [f"**{TUN_NOTE}**", ""]
        elif table["network"].startswith("medfed-clf/"):
            parts += ["Domain-classifier scores depend on this classifier; never compare them with Inception "
                      "numbers from papers.", ""]
        parts += [_md_table(SCORE_HEADER, score_rows(table["scores"])), ""]
    audit = result.get("memorization")
    if audit:
        parts += ["## Memorization audit", "",
                  f"**{'PASSED' if audit['passed'] else 'FAILED'}**: {audit['near_copy_count']} of "
                  f"{audit['num_generated']} generated images ({audit['near_copy_fraction']:.2%}) are near-copies "
                  f"(nearest / second-nearest training-image distance < {audit['near_copy_threshold']:.3f}); "
                  f"allowed: {audit['max_near_copy_fraction']:.2%}. Reference: {audit['reference_source']}.", "",
                  _md_table(["pixel space", "min", "p05", "median"],
                            [[k, _fmt(v["min"]), _fmt(v["p05"]), _fmt(v["median"])]
                             for k, v in audit["pixel"].items()]), "",
                  "![closest pairs](closest_pairs.png)", ""]
    records = result.get("federated") or []
    if records:
        header, rows = site_rows(records[-1])
        parts += [f"## Per-site scores (federated, round {records[-1]['round']})", "",
                  "Each site scored the global model's samples against its own test images and sent numbers only. "
                  "These statistics are computed on private data outside the DP guarantee. Weighted means are "
                  "example-weighted means of per-site scores, not pooled scores.", "", _md_table(header, rows), ""]
        if plot_link:
            parts += [f"![per-site scores by round]({plot_link})", ""]
    return "\n".join(parts) + "\n"


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def html_report(result: dict[str, Any], grid_name: str, plot_link: str | None = None) -> str:
    esc = html.escape
    parts = [f"<h1>Evaluation of {esc(Path(result['run']).name)}</h1>",
             f"<p>{result['num_generated']} generated images from {esc(result['generated'])}<br>"
             f"sha256 <code>{esc(result['generated_sha256'])}</code></p>",
             f'<img src="{esc(grid_name)}" alt="generated samples" class="grid">']
    for table in result["tables"]:
        parts += [f"<h2>{esc(_table_title(table).replace('`', ''))}</h2>",
                  f"<p>Reference: {esc(table['reference'])}</p>"]
        if table["protocol"] == TUN_COMPAT:
            parts.append(f'<p class="warn">{esc(TUN_NOTE)}</p>')
        parts.append(_html_table(SCORE_HEADER, score_rows(table["scores"])))
    audit = result.get("memorization")
    if audit:
        verdict = "PASSED" if audit["passed"] else "FAILED"
        parts += [f"<h2>Memorization audit: {verdict}</h2>",
                  f"<p>{audit['near_copy_count']} of {audit['num_generated']} generated images are near-copies "
                  f"(ratio &lt; {audit['near_copy_threshold']:.3f}); allowed fraction "
                  f"{audit['max_near_copy_fraction']:.2%}.</p>",
                  '<img src="closest_pairs.png" alt="closest generated/training pairs" class="sheet">']
    records = result.get("federated") or []
    if records:
        header, rows = site_rows(records[-1])
        parts += [f"<h2>Per-site scores (round {records[-1]['round']})</h2>",
                  "<p>Numbers computed at each site on its own images, outside the DP guarantee.</p>",
                  _html_table(header, rows)]
        if plot_link:
            parts.append(f'<img src="{esc(plot_link)}" alt="per-site scores by round">')
    style = ("body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}td:first-child{text-align:left}"
             ".warn{color:#a00;font-weight:bold}img.grid{image-rendering:pixelated;width:32em}img.sheet{max-width:100%}"
             "td:last-child{text-align:left}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>medfed evaluation</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>\n")
