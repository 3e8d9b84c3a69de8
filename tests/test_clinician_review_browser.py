"""The offline rating page in a real headless Chromium (Debian's /usr/bin/chromium driven by Playwright):
open it from a file URL, rate images, reload, close the browser and resume, save the ratings file, import it.

Chromium comes from Debian (`apt-get install -y chromium`; .ci/run installs it). Playwright's pip wheel brings
its driver; it is pointed at that executable and never downloads a browser. Under CI a missing browser fails
the test; on a developer machine without one it is skipped.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from medfed.checkpoint import Checkpoint, save_checkpoint
from medfed.cli import app
from medfed.clinician_review.export import export_study, sample_generated
from medfed.clinician_review.ratings import read_ratings_table
from medfed.config import from_flat
from medfed.models import build_unet

pytestmark = pytest.mark.slow  # drives a real headless Chromium

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
NUM_IMAGES = 4
FIELDS = ("realism", "call", "confidence", "usefulness", "comment")


def require_browser() -> None:
    missing = []
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("the playwright package (pip install -e '.[test]')")
    if not Path(CHROMIUM).is_file():
        missing.append("Debian's chromium (apt-get install -y chromium)")
    if missing:
        message = "the rating-page browser test needs " + " and ".join(missing)
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A small study sampled by medfed's generator from a real (untrained micro) checkpoint."""
    tmp = tmp_path_factory.mktemp("browser-study")
    cfg = from_flat({"model.preset": "micro", "diffusion.sample-steps": 2})
    torch.manual_seed(0)
    model = build_unet("micro", 1)
    checkpoint = save_checkpoint(Checkpoint(model=model.state_dict(), config=cfg, image_shape=(1, 28, 28), step=0),
                                 tmp / "untrained.pt")
    generated = sample_generated(checkpoint, NUM_IMAGES, steps=2, device="cpu")
    return export_study(tmp / "export", generated, study_id="browser-study", dicom=False, show_progress=False)


def launch(playwright, profile: Path):
    return playwright.chromium.launch_persistent_context(
        str(profile), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS, accept_downloads=True)


def open_page(context, url: str, requests: list[str]):
    page = context.pages[0] if context.pages else context.new_page()
    page.on("request", lambda request: requests.append(request.url))
    errors: list[str] = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    page.goto(url)
    assert not errors, errors
    return page


def rate_current(page, realism: int, call: str, confidence: int, usefulness: int | None, comment: str) -> str:
    image_id = page.text_content("#image-id")
    page.check(f"#q-realism-{realism}")
    page.check(f"#q-call-{call}")
    page.check(f"#q-confidence-{confidence}")
    if usefulness is not None:
        page.check(f"#q-usefulness-{usefulness}")
    page.fill("#q-comment", comment)
    page.click("#next-button")
    return image_id


def test_rate_reload_resume_save_and_import_in_headless_chromium(study, tmp_path):
    require_browser()
    from playwright.sync_api import sync_playwright

    url = study.page.resolve().as_uri()
    profile = tmp_path / "chromium-profile"
    requests: list[str] = []
    answers: dict[str, dict] = {}
    plan = [(5, "real", 4, 3, "crisp"), (2, "synthetic", 5, None, ""), (4, "real", 2, 1, "unsure, noisy"),
            (1, "synthetic", 3, 2, "")]

    with sync_playwright() as playwright:
        context = launch(playwright, profile)
        page = open_page(context, url, requests)
        page.fill("#rater-id", "dr-browser")
        page.click("#start-button")
        assert page.evaluate("document.getElementById('image').naturalWidth") == 28  # the data: image rendered
        answers[rate_current(page, *plan[0])] = dict(zip(FIELDS, plan[0]))
        # A reload keeps the rating.
        page.reload()
        page.click("#start-button")
        assert page.text_content("#progress") == f"1 of {NUM_IMAGES} rated"
        answers[rate_current(page, *plan[1])] = dict(zip(FIELDS, plan[1]))
        # Required answers are enforced.
        page.click("#next-button")
        assert "Please answer: realism, call, confidence" in page.text_content("#status")
        context.close()

        # Later: a new browser session with the same profile resumes where the rater stopped.
        context = launch(playwright, profile)
        page = open_page(context, url, requests)
        assert page.input_value("#rater-id") == "dr-browser"
        assert f"2 of {NUM_IMAGES} rated" in page.text_content("#start-status")
        page.click("#start-button")
        assert page.text_content("#progress") == f"2 of {NUM_IMAGES} rated"
        assert page.text_content("#image-id") not in answers
        page.click("#prev-button")
        shown = page.text_content("#image-id")
        assert shown in answers  # the previous image in this rater's order was rated: its answers are restored
        assert page.is_checked(f"#q-realism-{answers[shown]['realism']}")
        assert page.is_checked(f"#q-call-{answers[shown]['call']}")
        assert page.input_value("#q-comment") == answers[shown]["comment"]
        page.click("#unrated-button")
        for step in plan[2:]:
            answers[rate_current(page, *step)] = dict(zip(FIELDS, step))
        assert page.text_content("#progress") == f"{NUM_IMAGES} of {NUM_IMAGES} rated"
        assert "All 4 images rated" in page.text_content("#status")

        with page.expect_download() as download_info:
            page.click("#download-button")
        download = download_info.value
        assert download.suggested_filename == "ratings-browser-study-dr-browser.json"
        saved = tmp_path / download.suggested_filename
        download.save_as(saved)
        context.close()

    # The page made no request beyond its own file and its embedded data.
    assert requests and all(u.startswith(("file:", "data:", "blob:")) for u in requests), requests

    payload = json.loads(saved.read_text())
    assert payload["rater_id"] == "dr-browser" and payload["study_id"] == "browser-study"
    table_path = tmp_path / "ratings.json"
    result = CliRunner().invoke(app, ["review", "import", str(saved), "--manifest", str(study.manifest),
                                      "--out", str(table_path)])
    assert result.exit_code == 0, result.output
    table = read_ratings_table(table_path)
    assert len(table.ratings) == NUM_IMAGES
    for rating in table.ratings:
        assert rating.rater_id == "dr-browser"
        assert {f: getattr(rating, f) for f in FIELDS} == answers[rating.image_id]
