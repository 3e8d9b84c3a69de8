"""``medfed review``: blinded export, site approval, rating import and the agreement report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

app = typer.Typer(help="Clinician review: blinded image sets, the offline rating page, ratings import and the "
                       "reader-study report.", no_args_is_help=True)
console = Console()


@app.command()
def export(
    out: Annotated[Path, typer.Option(help="New (or empty) folder for the study: for-raters/ and coordinator/.")],
    checkpoint: Annotated[Optional[Path], typer.Option(help="Sample the generated images from this "
                                                       "checkpoint.")] = None,
    num: Annotated[int, typer.Option(help="Generated images to sample (with --checkpoint).")] = 50,
    generated: Annotated[Optional[Path], typer.Option(help="Or: a folder of generated PNGs (as `medfed sample` "
                                                      "writes; grid.png is skipped).")] = None,
    sampler: Annotated[Optional[str], typer.Option(help="ddpm or ddim (default: the checkpoint's).")] = None,
    steps: Annotated[Optional[int], typer.Option(help="DDIM steps (default: the checkpoint's).")] = None,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    batch_size: Annotated[Optional[int], typer.Option(help="Images denoised together (default: as "
                                                      "`medfed sample` picks).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    num_real: Annotated[int, typer.Option(help="Real images to mix in (needs the site's approval).")] = 0,
    real_data: Annotated[Optional[str], typer.Option(help="The site's real images: a file or folder.")] = None,
    real_format: Annotated[str, typer.Option(help="Dataset format of --real-data (data.dataset names).")] = "folder",
    real_split: Annotated[str, typer.Option(help="Split of --real-data where it has splits.")] = "test",
    state_dir: Annotated[Optional[Path], typer.Option(help="The site's state folder (its privacy ledger records "
                                                      "the approval).")] = None,
    audit: Annotated[Optional[Path], typer.Option(help="Memorization audit JSON of these generated images.")] = None,
    study_id: Annotated[Optional[str], typer.Option(help="Study id (default: random).")] = None,
    dicom: Annotated[bool, typer.Option("--dicom/--no-dicom", help="Also write DICOM Secondary Capture files.")] = True,
) -> None:
    """Write a blinded reader study: PNGs, DICOMs, manifest, CSV form, offline rating page, and the key."""
    from medfed.clinician_review.approval import authorize_real_export
    from medfed.clinician_review.export import export_study, read_generated_folder, sample_generated
    from medfed.clinician_review.study import ReviewError
    from medfed.config import DataConfig
    from medfed.datasets import load_dataset

    if (checkpoint is None) == (generated is None):
        raise ReviewError("give exactly one of --checkpoint (sample new images) or --generated (a folder of PNGs)")
    if num_real and not real_data:
        raise ReviewError("--num-real needs --real-data: the site's real images")
    images = (sample_generated(checkpoint, num, sampler=sampler, steps=steps, seed=seed, batch_size=batch_size,
                               device=device) if checkpoint else read_generated_folder(generated))  # type: ignore[arg-type]
    approval = real = None
    if num_real:
        # The gate runs before a single real image is read.
        approval = authorize_real_export(state_dir, audit, images.images, num_real)
        c, h, _ = images.images.shape[1:]
        real = load_dataset(DataConfig(dataset=real_format, path=str(real_data), split=real_split, image_size=h,
                                       channels=c))
    result = export_study(out, images, real=real, num_real=num_real, approval=approval, study_id=study_id, dicom=dicom)
    console.print(f"study {result.study_id}: {result.num_generated} generated + {result.num_real} real images")
    console.print(f"for raters:      {result.manifest.parent}  (rating page: {result.page.name}, "
                  f"form: {result.form.name})")
    console.print(f"coordinator key: {result.key}  (keep it from the raters)")


@app.command()
def approve(
    state_dir: Annotated[Path, typer.Option(help="The site's state folder (holds its privacy ledger).")],
    audit: Annotated[Path, typer.Option(help="The memorization audit JSON the site has read.")],
    by: Annotated[str, typer.Option(help="Name of the person approving for the site.")],
    max_real: Annotated[Optional[int], typer.Option(help="Most real images allowed to leave (default: no "
                                                    "cap).")] = None,
    note: Annotated[str, typer.Option(help="Free text recorded with the approval.")] = "",
) -> None:
    """Record in the site's ledger its approval to let real images leave for a reader study."""
    from medfed.clinician_review.approval import approve_real_export

    entry = approve_real_export(state_dir, audit, by, max_real, note)
    cap = "no cap on the count" if max_real is None else f"at most {max_real} images"
    console.print(f"approval recorded as ledger entry {entry.index} ({cap}; audit sha256 "
                  f"{entry.data['audit_sha256'][:12]}...)")


@app.command()
def revoke(
    state_dir: Annotated[Path, typer.Option(help="The site's state folder (holds its privacy ledger).")],
    by: Annotated[str, typer.Option(help="Name of the person revoking for the site.")],
    note: Annotated[str, typer.Option(help="Free text recorded with the revocation.")] = "",
) -> None:
    """Withdraw the site's approval: later exports with its real images are refused."""
    from medfed.clinician_review.approval import revoke_real_export

    entry = revoke_real_export(state_dir, by, note)
    console.print(f"approval revoked (ledger entry {entry.index})")


@app.command("import")
def import_(
    files: Annotated[list[Path], typer.Argument(help="Ratings files: the rating page's .json or filled .csv forms.")],
    manifest: Annotated[Path, typer.Option(help="The study's manifest.json (from for-raters/).")],
    out: Annotated[Path, typer.Option(help="Where to write the validated ratings table (JSON).")],
) -> None:
    """Validate raters' files against the manifest and combine them into one ratings table."""
    from medfed.clinician_review.ratings import describe, import_ratings, write_ratings_table
    from medfed.clinician_review.study import read_manifest

    study = read_manifest(manifest)
    table = import_ratings(list(files), study)
    write_ratings_table(table, out)
    for line in describe(table, len(study.images)):
        console.print(line, highlight=False)
    console.print(f"wrote {len(table.ratings)} ratings of {len(table.raters)} raters to {out}")


@app.command()
def report(
    ratings: Annotated[Path, typer.Option(help="The ratings table written by `medfed review import`.")],
    key: Annotated[Path, typer.Option(help="The study's unblinding key (coordinator/unblinding-key.json).")],
    out: Annotated[Path, typer.Option(help="Folder for report.json, report.html and plots/.")],
    level: Annotated[float, typer.Option(help="Confidence level of the intervals.")] = 0.95,
) -> None:
    """Realism by source, the visual Turing test, inter-rater agreement and per-class results (JSON + HTML)."""
    from medfed.clinician_review.ratings import read_ratings_table
    from medfed.clinician_review.report import build_report, summary_lines, write_report
    from medfed.clinician_review.study import read_key

    result = build_report(read_ratings_table(ratings), read_key(key), level=level)
    paths = write_report(result, out)
    for line in summary_lines(result):
        console.print(line, highlight=False)
    console.print(f"report: {paths['html']} and {paths['json']}")
