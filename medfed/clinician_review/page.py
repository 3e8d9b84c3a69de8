"""The offline rating page: one self-contained HTML file with every image embedded as a ``data:`` URI.

The page (``rating_page.html`` in this package) needs no server and makes no request: its Content Security Policy
allows only inline script and style and ``data:`` images. A rater enters a rater id, rates one image at a time,
can close the browser and resume (progress lives in ``localStorage`` under ``medfed-review:<study id>``), and
saves a ratings file (JSON, kind ``medfed-review-ratings``) that ``medfed review import`` reads.
"""

from __future__ import annotations

import base64
import json
from importlib.resources import files
from pathlib import Path

from medfed.clinician_review.study import QUESTIONS, Manifest

PLACEHOLDER = "__STUDY_JSON__"


def render_rating_page(manifest: Manifest, png_by_id: dict[str, bytes]) -> str:
    """The page's HTML for ``manifest``; ``png_by_id`` holds each image's PNG file bytes."""
    study = {
        "study_id": manifest.study_id,
        "questions": QUESTIONS,
        "images": [{"id": image_id, "src": "data:image/png;base64," + base64.b64encode(png_by_id[image_id]).decode()}
                   for image_id in manifest.image_ids],
    }
    # Inside <script>, "</" could close the element early; "<\/" is the same JSON string.
    payload = json.dumps(study, separators=(",", ":")).replace("</", "<\\/")
    template = files("medfed.clinician_review").joinpath("rating_page.html").read_text(encoding="utf-8")
    return template.replace(PLACEHOLDER, payload)


def write_rating_page(manifest: Manifest, png_by_id: dict[str, bytes], path: str | Path) -> Path:
    path = Path(path)
    path.write_text(render_rating_page(manifest, png_by_id), encoding="utf-8")
    return path
