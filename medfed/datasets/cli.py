"""``medfed data``: look at a site's images before it joins a federation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="A site's own data: check a folder of DICOM, NIfTI, PNG/JPEG or .npz files.",
                  no_args_is_help=True)


@app.command()
def inspect(
    path: Annotated[Path, typer.Argument(help="A folder (searched recursively) or a single file.")],
    json_output: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Counts per format, image shapes, intensity ranges, DICOM modalities and series, unreadable files with
    reasons. Prints no DICOM header field that can identify a patient (names, IDs, dates, UIDs, institution)."""
    import sys

    from medfed.errors import DatasetError

    if not path.exists():  # before the readers (and torch) load
        raise DatasetError(f"{path}: path to inspect does not exist" + (" (a dangling symbolic link)"
                                                                        if path.is_symlink() else ""))
    from medfed.datasets.inspect import inspect_path, render_text, usable_images

    report = inspect_path(path, show_progress=not json_output and sys.stderr.isatty())
    typer.echo(json.dumps(report, indent=2) if json_output else render_text(report))
    if not usable_images(report):
        problems = len(report["unreadable"]) + len(report["not-images"]) + len(report["skipped"])
        why = f"{problems} unreadable or skipped path(s) listed above" if problems else "no image file there"
        raise DatasetError(f"{path}: no usable image found ({report['files']} file(s) read, {why})")
