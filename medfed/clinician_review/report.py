"""What the ratings show: realism by source, the visual Turing test, inter-rater agreement, per class.

:func:`build_report` returns a JSON-ready dict whose ``methods`` section states how each number was computed;
:func:`write_report` writes ``report.json``, ``report.html`` (self-contained: plots embedded) and the plots as PNGs.
"""

from __future__ import annotations

import base64
import html
import itertools
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats as scipy_stats

from medfed.clinician_review.ratings import Rating, RatingsTable
from medfed.clinician_review.stats import (
    TuringTest,
    cohen_kappa,
    fleiss_kappa,
    kappa_strength,
    t_interval,
)
from medfed.clinician_review.study import (
    CALLS,
    POSITIVE_CLASS,
    QUESTIONS,
    SOURCES,
    ReviewError,
    UnblindingKey,
    write_json,
)

LIKERT = sorted(QUESTIONS["realism"]["scale"])

METHODS = {
    "realism": "Per source, each image's realism is the mean of its raters' scores (1-5); the source mean is the mean "
               "of those image means, with a two-sided Student t interval over images (n_images - 1 degrees of "
               "freedom), so images, not ratings, are the sampling unit. Per-rater means use a t interval over that "
               "rater's scores. Real and synthetic image means are compared with a two-sided Mann-Whitney U test.",
    "usefulness": "As realism, over the ratings that gave a diagnostic-usefulness score.",
    "turing_test": "The positive class is 'synthetic': sensitivity = synthetic images called synthetic / synthetic "
                   "images rated; specificity = real images called real / real images rated; accuracy = correct "
                   "calls / all calls. Intervals are Wilson score intervals. 'pooled' counts every rating as one "
                   "trial, which ignores that ratings of one image are correlated (its intervals are too narrow "
                   "when raters agree); 'mean_over_raters' averages the per-rater values.",
    "agreement": "Over the images rated by every rater. Two raters: Cohen's kappa; the real/synthetic call "
                 "unweighted, realism with quadratic weights (ordinal scale) and also unweighted. Three or more "
                 "raters: Fleiss' kappa (unweighted: categories treated as nominal) for the call and for realism, "
                 "plus Cohen's kappa for every pair of raters. Strength words follow Landis and Koch (1977). A kappa "
                 "is null when every rating falls in one category (chance agreement is 1).",
    "per_class": "Images whose class label is known (from the unblinding key): realism and pooled Turing-test "
                 "numbers per class and source, computed as above.",
}


def _source_summary(ratings: list[Rating], truth: dict[str, str], field: str, level: float) -> dict[str, Any]:
    by_source: dict[str, Any] = {}
    for source in SOURCES:
        scores = [(r.image_id, r.rater_id, getattr(r, field)) for r in ratings
                  if truth[r.image_id] == source and getattr(r, field) is not None]
        if not scores:
            continue
        per_image: dict[str, list[int]] = defaultdict(list)
        per_rater: dict[str, list[int]] = defaultdict(list)
        for image_id, rater_id, score in scores:
            per_image[image_id].append(score)
            per_rater[rater_id].append(score)
        image_means = [float(np.mean(v)) for v in per_image.values()]
        values = [s for _, _, s in scores]
        by_source[source] = {
            "mean": t_interval(image_means, level).to_dict(),
            "num_images": len(per_image),
            "num_ratings": len(values),
            "distribution": {str(v): values.count(v) for v in LIKERT},
            "per_rater": {rater: t_interval(v, level).to_dict() for rater, v in sorted(per_rater.items())},
            "image_means": dict(zip(per_image, image_means)),
        }
    if "real" in by_source and "synthetic" in by_source:
        real = list(by_source["real"]["image_means"].values())
        synthetic = list(by_source["synthetic"]["image_means"].values())
        test = scipy_stats.mannwhitneyu(real, synthetic, alternative="two-sided")
        by_source["real_vs_synthetic"] = {"test": "Mann-Whitney U, two-sided, on image means",
                                          "u": float(test.statistic), "p_value": float(test.pvalue)}
    return by_source


def _turing(ratings: list[Rating], truth: dict[str, str], level: float) -> dict[str, Any]:
    def test_of(subset: list[Rating]) -> TuringTest:
        return TuringTest.from_calls([truth[r.image_id] == POSITIVE_CLASS for r in subset],
                                     [r.call == POSITIVE_CLASS for r in subset])

    raters = sorted({r.rater_id for r in ratings})
    per_rater = {rater: test_of([r for r in ratings if r.rater_id == rater]).summary(level) for rater in raters}
    means = {}
    for metric in ("accuracy", "sensitivity", "specificity"):
        values = [s[metric]["value"] for s in per_rater.values() if s[metric]["value"] is not None]
        means[metric] = float(np.mean(values)) if values else None
    return {"positive_class": POSITIVE_CLASS, "per_rater": per_rater, "pooled": test_of(ratings).summary(level),
            "mean_over_raters": means}


def _cohen_pair(a: list[Rating], b: list[Rating]) -> dict[str, Any]:
    call = cohen_kappa([r.call for r in a], [r.call for r in b], CALLS)
    realism_q = cohen_kappa([r.realism for r in a], [r.realism for r in b], LIKERT, weights="quadratic")
    realism_u = cohen_kappa([r.realism for r in a], [r.realism for r in b], LIKERT)
    return {"call": {"kappa": call, "weights": "none", "strength": kappa_strength(call)},
            "realism": {"kappa": realism_q, "weights": "quadratic", "strength": kappa_strength(realism_q),
                        "kappa_unweighted": realism_u}}


def _agreement(ratings: list[Rating]) -> dict[str, Any]:
    raters = sorted({r.rater_id for r in ratings})
    if len(raters) < 2:
        return {"method": None, "reason": "inter-rater agreement needs at least two raters", "raters": raters}
    cell = {(r.rater_id, r.image_id): r for r in ratings}
    items = sorted(i for i in {r.image_id for r in ratings} if all((rater, i) in cell for rater in raters))
    out: dict[str, Any] = {"raters": raters, "num_images": len(items)}
    if not items:
        return {**out, "method": None, "reason": "no image was rated by every rater"}
    columns = {rater: [cell[(rater, i)] for i in items] for rater in raters}
    if len(raters) == 2:
        return {**out, "method": "cohen", **_cohen_pair(columns[raters[0]], columns[raters[1]])}
    call_counts = np.array([[sum(cell[(rater, i)].call == c for rater in raters) for c in CALLS] for i in items])
    realism_counts = np.array([[sum(cell[(rater, i)].realism == v for rater in raters) for v in LIKERT] for i in items])
    call, realism = fleiss_kappa(call_counts), fleiss_kappa(realism_counts)
    pairwise = [{"raters": [a, b], **_cohen_pair(columns[a], columns[b])} for a, b in itertools.combinations(raters, 2)]
    return {**out, "method": "fleiss",
            "call": {"kappa": call, "weights": "none", "strength": kappa_strength(call)},
            "realism": {"kappa": realism, "weights": "none (nominal)", "strength": kappa_strength(realism)},
            "pairwise_cohen": pairwise}


def build_report(table: RatingsTable, key: UnblindingKey, level: float = 0.95) -> dict[str, Any]:
    """Every statistic of the study, as a JSON-ready dict (see :data:`METHODS` for how each is computed).

    Raises:
        ReviewError: the ratings and the key belong to different studies or manifests, or a rated image is not
            in the key.
    """
    if not 0 < level < 1:
        raise ReviewError(f"--level must be between 0 and 1 (got {level})")
    if table.study_id != key.study_id:
        raise ReviewError(f"the ratings are for study '{table.study_id}' but the key is for study '{key.study_id}'")
    if table.manifest_sha256 != key.manifest_sha256:
        raise ReviewError(f"the ratings were imported against another manifest than the one this key was written "
                          f"with (study {key.study_id}); import them with the study's manifest.json")
    entries = key.by_id()
    missing = sorted({r.image_id for r in table.ratings} - set(entries))
    if missing:
        raise ReviewError(f"image {missing[0]} was rated but is not in the unblinding key")
    truth = {i: e.source for i, e in entries.items()}
    ratings = list(table.ratings)
    report: dict[str, Any] = {
        "kind": "medfed-review-report", "version": 1, "study_id": key.study_id, "confidence_level": level,
        "raters": table.raters, "num_ratings": len(ratings),
        "num_images": {s: sum(e.source == s for e in key.entries) for s in SOURCES},
        "num_rated_images": len({r.image_id for r in ratings}),
        "realism": _source_summary(ratings, truth, "realism", level),
        "usefulness": _source_summary(ratings, truth, "usefulness", level),
        "turing_test": _turing(ratings, truth, level),
        "agreement": _agreement(ratings),
        "methods": METHODS,
    }
    labels = sorted({e.label for e in key.entries if e.label is not None})
    per_class = {}
    for label in labels:
        subset = [r for r in ratings if entries[r.image_id].label == label]
        if subset:
            per_class[str(label)] = {"realism": _source_summary(subset, truth, "realism", level),
                                     "turing_test": {"pooled": _turing(subset, truth, level)["pooled"]}}
    report["per_class"] = per_class
    return report


def _plots(report: dict[str, Any], folder: Path) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    realism = {s: v for s, v in report["realism"].items() if s in SOURCES}

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    names = list(realism)
    means = [realism[s]["mean"]["value"] for s in names]
    errors = np.array([[m - (realism[s]["mean"]["low"] if realism[s]["mean"]["low"] is not None else m)
                        for s, m in zip(names, means)],
                       [(realism[s]["mean"]["high"] if realism[s]["mean"]["high"] is not None else m) - m
                        for s, m in zip(names, means)]])
    colors = {"real": "#4c78a8", "synthetic": "#f58518"}
    left.bar(names, means, yerr=errors, capsize=6, color=[colors[s] for s in names])
    left.set_ylim(1, 5)
    left.set_ylabel("mean realism (1-5)")
    left.set_title(f"Realism by source ({report['confidence_level']:.0%} t interval over images)")
    width = 0.8 / max(len(names), 1)
    for k, s in enumerate(names):
        counts = np.array([realism[s]["distribution"][str(v)] for v in LIKERT], dtype=float)
        right.bar(np.array(LIKERT) + (k - (len(names) - 1) / 2) * width, counts / counts.sum(), width, label=s,
                  color=colors[s])
    right.set_xticks(LIKERT)
    right.set_xlabel("realism score")
    right.set_ylabel("share of ratings")
    right.set_title("Realism scores")
    right.legend()
    fig.tight_layout()
    paths["realism"] = folder / "realism.png"
    fig.savefig(paths["realism"], dpi=110)
    plt.close(fig)

    per_rater = report["turing_test"]["per_rater"]
    metrics = ("accuracy", "sensitivity", "specificity")
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(per_rater) + 3), 4))
    width = 0.8 / len(metrics)
    for k, metric in enumerate(metrics):
        xs, ys, err = [], [], [[], []]
        for j, summary in enumerate(per_rater.values()):
            e = summary[metric]
            if e["value"] is None:
                continue
            xs.append(j + (k - 1) * width)
            ys.append(e["value"])
            err[0].append(e["value"] - e["low"])
            err[1].append(e["high"] - e["value"])
        ax.bar(xs, ys, width, yerr=err, capsize=3, label=metric)
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=1, label="chance (balanced set)")
    ax.set_xticks(range(len(per_rater)))
    ax.set_xticklabels(list(per_rater))
    ax.set_ylim(0, 1.02)
    ax.set_title("Visual Turing test per rater (positive class: synthetic; Wilson intervals)")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=4)
    fig.tight_layout()
    paths["turing"] = folder / "turing.png"
    fig.savefig(paths["turing"], dpi=110)
    plt.close(fig)
    return paths


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3f}"
    return html.escape(str(value))


def _estimate(e: dict[str, Any]) -> str:
    if e["value"] is None:
        return "n/a"
    if e["low"] is None:
        return f"{e['value']:.3f} (n={e['n']})"
    return f"{e['value']:.3f} [{e['low']:.3f}, {e['high']:.3f}] (n={e['n']})"


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def render_html(report: dict[str, Any], plots: dict[str, Path]) -> str:
    """A self-contained HTML page of the report (plots embedded as data URIs)."""
    level = f"{report['confidence_level']:.0%}"
    parts = [f"<h1>Reader study {html.escape(report['study_id'])}</h1>",
             f"<p>{len(report['raters'])} raters ({', '.join(map(html.escape, report['raters']))}), "
             f"{report['num_ratings']} ratings of {report['num_rated_images']} images "
             f"({report['num_images']['synthetic']} synthetic, {report['num_images']['real']} real in the study).</p>"]
    for name, title in (("realism", "Realism"), ("usefulness", "Diagnostic usefulness")):
        rows = [[s, _estimate(v["mean"]), str(v["num_images"]), str(v["num_ratings"])]
                for s, v in report[name].items() if s in SOURCES]
        header = ["source", f"mean [{level} CI]", "images", "ratings"]
        parts.append(f"<h2>{title} by source</h2>" + _table(header, rows))
        if "real_vs_synthetic" in report[name]:
            t = report[name]["real_vs_synthetic"]
            parts.append(f"<p>{html.escape(t['test'])}: U = {t['u']:.1f}, p = {t['p_value']:.3g}</p>")
    if "realism" in plots:
        parts.append(_img(plots["realism"]))
    tt = report["turing_test"]
    rows = [[html.escape(rater), _estimate(s["accuracy"]), _estimate(s["sensitivity"]), _estimate(s["specificity"])]
            for rater, s in tt["per_rater"].items()]
    rows.append(["<em>pooled</em>", _estimate(tt["pooled"]["accuracy"]), _estimate(tt["pooled"]["sensitivity"]),
                 _estimate(tt["pooled"]["specificity"])])
    m = tt["mean_over_raters"]
    rows.append(["<em>mean over raters</em>", _fmt(m["accuracy"]), _fmt(m["sensitivity"]), _fmt(m["specificity"])])
    parts.append("<h2>Visual Turing test (positive class: synthetic)</h2>"
                 + _table(["rater", "accuracy", "sensitivity", "specificity"], rows))
    if "turing" in plots:
        parts.append(_img(plots["turing"]))
    ag = report["agreement"]
    parts.append("<h2>Inter-rater agreement</h2>")
    if ag["method"] is None:
        parts.append(f"<p>{html.escape(ag['reason'])}</p>")
    else:
        label = "Cohen's kappa" if ag["method"] == "cohen" else "Fleiss' kappa"
        rows = [[q, _fmt(ag[q]["kappa"]), html.escape(ag[q]["weights"]), _fmt(ag[q]["strength"])]
                for q in ("call", "realism")]
        parts.append(f"<p>{label} over the {ag['num_images']} images rated by every rater.</p>"
                     + _table(["question", "kappa", "weights", "strength"], rows))
        if ag.get("pairwise_cohen"):
            rows = [[html.escape(" / ".join(p["raters"])), _fmt(p["call"]["kappa"]), _fmt(p["realism"]["kappa"])]
                    for p in ag["pairwise_cohen"]]
            parts.append("<h3>Pairwise Cohen's kappa</h3>"
                         + _table(["raters", "call (unweighted)", "realism (quadratic)"], rows))
    if report["per_class"]:
        rows = []
        for label, c in report["per_class"].items():
            for s, v in c["realism"].items():
                if s in SOURCES:
                    rows.append([html.escape(label), s, _estimate(v["mean"]), str(v["num_images"])])
        parts.append("<h2>Per class</h2>" + _table(["class", "source", f"realism [{level} CI]", "images"], rows))
        rows = [[html.escape(label), _estimate(c["turing_test"]["pooled"]["accuracy"]),
                 _estimate(c["turing_test"]["pooled"]["sensitivity"]),
                 _estimate(c["turing_test"]["pooled"]["specificity"])] for label, c in report["per_class"].items()]
        parts.append(_table(["class", "accuracy (pooled)", "sensitivity", "specificity"], rows))
    parts.append("<h2>Methods</h2><dl>" + "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>"
                                                 for k, v in report["methods"].items()) + "</dl>")
    style = ("body{font-family:system-ui,sans-serif;max-width:62rem;margin:1.5rem auto;padding:0 1rem;color:#1d2330}"
             "table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #ccd;padding:.25rem .6rem;"
             "text-align:left}th{background:#eef}img{max-width:100%}dd{margin-bottom:.6rem}")
    return (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Reader study "
            f"{html.escape(report['study_id'])}</title><style>{style}</style></head><body>{''.join(parts)}</body></html>")


def _img(path: Path) -> str:
    return f'<p><img alt="{path.stem}" src="data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}"></p>'


def write_report(report: dict[str, Any], out: str | Path) -> dict[str, Path]:
    """Write ``report.json``, ``report.html`` and ``plots/*.png`` under ``out``; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plots = _plots(report, out / "plots") if any(s in report["realism"] for s in SOURCES) else {}
    json_path = write_json(out / "report.json", report)
    html_path = out / "report.html"
    html_path.write_text(render_html(report, plots), encoding="utf-8")
    return {"json": json_path, "html": html_path, **plots}


def summary_lines(report: dict[str, Any]) -> list[str]:
    """A few lines for the terminal."""
    lines = []
    for source, v in report["realism"].items():
        if source in SOURCES:
            lines.append(f"realism {source}: {_estimate(v['mean'])}")
    pooled = report["turing_test"]["pooled"]
    lines.append(f"Turing test (pooled, positive = synthetic): accuracy {_estimate(pooled['accuracy'])}, "
                 f"sensitivity {_estimate(pooled['sensitivity'])}, specificity {_estimate(pooled['specificity'])}")
    ag = report["agreement"]
    if ag["method"]:
        lines.append(f"agreement ({ag['method']}): call kappa {_fmt(ag['call']['kappa'])}, realism kappa "
                     f"{_fmt(ag['realism']['kappa'])} ({ag['realism']['weights']})")
    return lines
