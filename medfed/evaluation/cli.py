"""``medfed evaluate``: scores and memorization audits. ``medfed evaluate RUN_DIR`` runs the ``report`` command."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Optional

import click
import typer
from rich.console import Console
from typer.core import TyperGroup

console = Console()


class ReportByDefault(TyperGroup):
    """A command group where ``medfed evaluate RUN_DIR ...`` means ``medfed evaluate report RUN_DIR ...``."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["report", *args]
        return super().parse_args(ctx, args)


app = typer.Typer(
    cls=ReportByDefault,
    help="Image-quality scores (FID, KID, precision/recall, IS) and memorization audits. "
         "`medfed evaluate RUN_DIR` evaluates a run's latest checkpoint.",
    no_args_is_help=True,
)

SetOption = Annotated[
    Optional[list[str]],
    typer.Option("--set", "-s", help="Override a config key of the run, e.g. --set evaluation.kid-subset-size=500."),
]
NetworkOption = Annotated[
    Optional[list[str]],
    typer.Option("--feature-network", "-f", help="inception, fid-helper or a classifier file from "
                 "`medfed evaluate train-features`; repeat for several (each gets its own table). Default: "
                 "evaluation.feature-network."),
]


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="A run folder written by `medfed train` or `medfed run`.")],
    checkpoint: Annotated[Optional[Path], typer.Option(help="Checkpoint to evaluate (default: the run's "
                                                       "checkpoints/latest.pt).")] = None,
    num_samples: Annotated[Optional[int], typer.Option(help="Images to generate (evaluation.num-samples).")] = None,
    feature_network: NetworkOption = None,
    protocol: Annotated[Optional[str], typer.Option(help="standard, or tun-compat to add Tun et al.'s non-standard "
                                                    "FID/IS (needs --feature-network inception).")] = None,
    generated: Annotated[Optional[Path], typer.Option(help="Score these generated images (PNG folder from `medfed "
                                                      "sample`, or .npz) instead of sampling.")] = None,
    real: Annotated[Optional[Path], typer.Option(help="Reference images (default: the run's dataset).")] = None,
    real_format: Annotated[str, typer.Option(help="Dataset format of --real (npz, idx, folder, ...).")] = "npz",
    real_split: Annotated[str, typer.Option(help="Split of the reference images: test (default) or train.")] = "test",
    memorization: Annotated[bool, typer.Option(help="Audit the samples against the run's training images.")] = True,
    sampler: Annotated[Optional[str], typer.Option(help="ddpm or ddim (default: the run's).")] = None,
    steps: Annotated[Optional[int], typer.Option(help="DDIM steps (default: the run's).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Sampling seed (default: the run's train.seed).")] = None,
    inception_weights: Annotated[Optional[Path], typer.Option(help="Local pt_inception-2015-12-05-6726825d.pth "
                                                              "(evaluation.inception-weights).")] = None,
    allow_download: Annotated[Optional[bool], typer.Option("--allow-download", help="Download the standard Inception "
                                                           "weights where the network allows.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    out: Annotated[Optional[Path], typer.Option(help="Output folder (default: <run>/evaluation/<checkpoint>-n<N>).")]
    = None,
    sets: SetOption = None,
) -> None:
    """Sample a run's checkpoint, score the samples and audit them; writes scores.json, memorization.json,
    report.md and report.html with sample grids and tables."""
    from medfed.config import parse_overrides
    from medfed.evaluation.report import ReportOptions, evaluate_run

    overrides: dict[str, object] = {k: v for k, v in {
        "evaluation.num-samples": num_samples, "evaluation.protocol": protocol,
        "evaluation.inception-weights": str(inception_weights) if inception_weights else None,
        "evaluation.allow-download": allow_download}.items() if v is not None}
    overrides.update(parse_overrides(sets or []))
    options = ReportOptions(checkpoint=str(checkpoint or ""), generated=str(generated or ""),
                            networks=tuple(feature_network or ()), overrides=overrides, real=str(real or ""),
                            real_format=real_format, real_split=real_split, memorization=memorization,
                            sampler=sampler, steps=steps, seed=seed, device=device, out=str(out or ""))
    folder = evaluate_run(run_dir, options)
    console.print((folder / "report.md").read_text(), highlight=False, markup=False)
    console.print(f"report: {folder / 'report.html'}")


@app.command("train-features")
def train_features(
    data_path: Annotated[str, typer.Option(help="Labelled real images (file or folder).")],
    out: Annotated[Path, typer.Option(help="Where to write the classifier (.pt).")],
    dataset: Annotated[str, typer.Option(help="Dataset format (npz, idx, folder, mnist, ...).")] = "npz",
    train_split: Annotated[str, typer.Option(help="Split to train on.")] = "train",
    test_split: Annotated[str, typer.Option(help="Split to measure test accuracy on.")] = "test",
    image_size: Annotated[int, typer.Option(help="Input side the classifier resizes to (0 = native).")] = 0,
    channels: Annotated[int, typer.Option(help="1 or 3 channels (0 = native).")] = 0,
    limit: Annotated[int, typer.Option(help="Use at most N training images (0 = all).")] = 0,
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = 5,
    batch_size: Annotated[int, typer.Option(help="Batch size.")] = 64,
    lr: Annotated[float, typer.Option(help="Learning rate (AdamW).")] = 1e-3,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
) -> None:
    """Train the domain-classifier feature network on labelled real images; prints its name and test accuracy."""
    from medfed.config import DataConfig
    from medfed.datasets import load_dataset
    from medfed.devices import resolve_device
    from medfed.evaluation.classifier import save_classifier, train_classifier

    base = DataConfig(dataset=dataset, path=data_path, image_size=image_size, channels=channels)
    train = load_dataset(dataclasses.replace(base, split=train_split, limit=limit), seed=seed)
    test = load_dataset(dataclasses.replace(base, split=test_split), seed=seed)
    network = train_classifier(train, test, dataset=data_path, epochs=epochs, batch_size=batch_size, lr=lr,
                               seed=seed, device=resolve_device(device))
    save_classifier(network, out)
    console.print(f"{network.name}: test accuracy {network.info['test_accuracy']:.4f} on {len(test)} images "
                  f"({test.name}); trained on {len(train)} images\nwritten to {out}", highlight=False)


@app.command("memorization")
def memorization_command(
    generated: Annotated[Path, typer.Option(help="Generated images: PNG folder from `medfed sample`, or .npz.")],
    reference: Annotated[str, typer.Option(help="The training images they may copy (file or folder).")],
    reference_format: Annotated[str, typer.Option(help="Dataset format of --reference.")] = "npz",
    reference_split: Annotated[str, typer.Option(help="Split of --reference.")] = "train",
    feature_network: Annotated[str, typer.Option(help="inception, fid-helper, a classifier file, or none "
                                                 "(feature distances are reported, not used for the verdict).")]
    = "none",
    threshold: Annotated[float, typer.Option(help="Near-copy ratio threshold (nearest / second-nearest "
                                             "distance).")] = 1 / 3,
    max_fraction: Annotated[float, typer.Option(help="The audit passes with at most this fraction of "
                                                "near-copies.")] = 0.0,
    out: Annotated[Optional[Path], typer.Option(help="Audit JSON (default: <generated>/memorization.json).")] = None,
    sheet: Annotated[Optional[Path], typer.Option(help="Closest-pairs PNG (default: beside the JSON). It shows "
                                                  "training images: keep it where they may be seen.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
) -> None:
    """Audit generated images for near-copies of training images; writes the audit JSON and a closest-pairs sheet.
    Exits with status 1 when the audit fails."""
    from medfed.config import DataConfig
    from medfed.datasets import load_dataset
    from medfed.devices import resolve_device
    from medfed.errors import ConfigError
    from medfed.evaluation.features import load_feature_network
    from medfed.evaluation.memorization import audit_memorization, write_audit
    from medfed.evaluation.report import load_generated

    if not 0 < threshold < 1:
        raise ConfigError(f"--threshold {threshold}: must be in (0, 1)")
    if not 0 <= max_fraction <= 1:
        raise ConfigError(f"--max-fraction {max_fraction}: must be in [0, 1]")
    gen = load_generated(generated)
    c, h, _ = gen.image_shape
    ref = load_dataset(DataConfig(dataset=reference_format, path=reference, split=reference_split, channels=c,
                                  image_size=h))
    network = None if feature_network == "none" else load_feature_network(feature_network,
                                                                          device=resolve_device(device))
    out = out or (generated if generated.is_dir() else generated.parent) / "memorization.json"
    audit = audit_memorization(gen.images, ref.images, reference_source=f"{ref.name} ({len(ref)} images)",
                               network=network, threshold=threshold, max_fraction=max_fraction,
                               sheet_path=sheet or out.with_name(out.stem + "_closest_pairs.png"), show_progress=True)
    write_audit(audit, out)
    verdict = "PASSED" if audit["passed"] else "FAILED"
    console.print(f"memorization audit {verdict}: {audit['near_copy_count']} of {audit['num_generated']} generated "
                  f"images are near-copies (allowed fraction {max_fraction:g})\naudit: {out}\nsheet: "
                  f"{audit['closest_pairs_sheet']}", highlight=False)
    if not audit["passed"]:
        raise typer.Exit(1)


@app.command("utility")
def utility_command(
    generated: Annotated[Optional[Path], typer.Option(help="Labelled generated images: a .npz with images and "
                                                      "labels arrays, or a folder of PNGs (`medfed sample` layout) "
                                                      "with labels.csv (file,label).")] = None,
    checkpoint: Annotated[Optional[Path], typer.Option(help="Or a class-conditional checkpoint to sample, every "
                                                       "class equally often.")] = None,
    num: Annotated[int, typer.Option(help="Images to sample from --checkpoint.")] = 1000,
    guidance: Annotated[Optional[float], typer.Option(help="Guidance scale (default: the checkpoint's).")] = None,
    sampler: Annotated[Optional[str], typer.Option(help="ddpm or ddim (default: the checkpoint's).")] = None,
    steps: Annotated[Optional[int], typer.Option(help="DDIM steps (default: the checkpoint's).")] = None,
    real: Annotated[Optional[Path], typer.Option(help="Real labelled data with train and test splits (default: "
                                                 "the checkpoint's dataset).")] = None,
    real_format: Annotated[str, typer.Option(help="Dataset format of --real (npz, idx, mnist, fashion-mnist, "
                                             "folder, ...).")] = "npz",
    test_split: Annotated[str, typer.Option(help="Real split to test on.")] = "test",
    baseline: Annotated[bool, typer.Option(help="Also train on as many real training images.")] = True,
    seed: Annotated[int, typer.Option(help="Classifier (and sampling) seed.")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    out: Annotated[Optional[Path], typer.Option(help="Report JSON (default: <generated>/utility.json, or "
                                                "<run>/evaluation/utility-<checkpoint>-n<N>.json).")] = None,
) -> None:
    """Train-on-synthetic, test-on-real: train one fixed small CNN on labelled generated images and test it on
    the real test split (accuracy, balanced accuracy, AUC for two classes), beside the same CNN trained on as
    many real training images. Writes a JSON report and prints one line."""
    from medfed.evaluation.utility import UtilityOptions, evaluate_utility, summary_line

    options = UtilityOptions(generated=str(generated or ""), checkpoint=str(checkpoint or ""), num=num,
                             guidance=guidance, sampler=sampler, steps=steps, real=str(real or ""),
                             real_format=real_format, test_split=test_split, baseline=baseline, seed=seed,
                             device=device, out=str(out or ""))
    report, path = evaluate_utility(options)
    console.print(f"{summary_line(report)}\nreport: {path}", highlight=False)
