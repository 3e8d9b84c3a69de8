"""A real Flower simulation whose three sites read their own PNG, DICOM and NIfTI folders.

One run serves both acceptance tests: it trains one global model, and no DICOM header value reaches anything a
site sends or anything written to the run's shared outputs. The DICOM site also holds a planted file whose pixel
data cannot be decoded and whose decoder error quotes a header value: the site leaves it out (``data.on-error =
skip``) and logs why, so the search fails if the reader's header redaction is switched off.
"""

import logging
from pathlib import Path

import pytest

from conftest import small_run_config
from flower_apps import app_files
from medical_files import copy_nifti, find_leaks, write_planted_dicoms, write_pngs, write_undecodable_dicom
from medfed.config import DataConfig
from medfed.datasets import load_dataset
from medfed.federation.policy import simulated_node
from medfed.launch.simulation import run_simulation
from medfed.federation.site import load_site, site_data_entry

pytestmark = pytest.mark.slow  # starts a Flower simulation


@pytest.fixture(scope="module")
def three_format_run(tmp_path_factory, breastmnist):
    data = tmp_path_factory.mktemp("hospitals")
    write_pngs(data / "png", breastmnist, 16)
    secrets = write_planted_dicoms(data / "dicom", {"CT_small.dcm": 4, "MR_small.dcm": 4, "nibabel:0.dcm": 2})
    secrets = sorted({*secrets, *write_undecodable_dicom(data / "dicom")})
    copy_nifti(data / "nifti", "anatomical.nii")
    folders = {"folder": data / "png", "dicom": data / "dicom", "nifti": data / "nifti"}
    cfg = small_run_config(tmp_path_factory.mktemp("runs"), "three-formats", **{
        "data.site-paths": ";".join(f"{fmt}:{path}" for fmt, path in folders.items()),
        "data.image-size": 32, "data.channels": 1, "federation.num-sites": 3, "federation.rounds": 1,
        "train.batch-size": 8, "data.on-error": "skip"})
    run = run_simulation(cfg, clientapp="medfed_test_apps.wire:app", extra_files=app_files("wire"),
                         show_progress=False)
    sizes = [len(load_dataset(DataConfig(dataset=fmt, path=str(path), image_size=32, channels=1, on_error="skip")))
             for fmt, path in folders.items()]
    return run, secrets, sizes, Path(cfg.output.dir) / f"{cfg.output.name}-sent", cfg


def test_three_sites_with_three_formats_train_one_global_model(three_format_run):
    run, _, sizes, _, _ = three_format_run
    assert (run.checkpoints / "round_0001.pt").exists() and run.latest_checkpoint.exists()
    (round_1,) = run.rounds()
    assert round_1.participants == ["site-0", "site-1", "site-2"] and round_1.aggregated
    assert [round_1.weights[f"site-{i}"] for i in range(3)] == sizes  # each site read its own folder
    assert sizes[1] == 10 and all(n > 0 for n in sizes)


def test_no_dicom_header_value_leaves_the_site(three_format_run, caplog):
    run, secrets, _, sent, cfg = three_format_run
    replies = sorted(sent.glob("*.pb"))
    # what each site sent, byte for byte: its example count, then the four SecAgg+ stages of round 1
    per_site = [len(list(sent.glob(f"*-site{i}-*.pb"))) for i in range(3)]
    assert per_site == [5, 5, 5]
    outputs = [p for p in run.root.rglob("*") if p.is_file()]
    assert any(p.suffix == ".log" and p.stat().st_size for p in outputs)  # Flower's logs were searched too
    assert find_leaks(replies + outputs, secrets) == []
    dicom_files = sorted(Path(site_data_entry(cfg.data, 1)[1]).iterdir())
    assert find_leaks(dicom_files[:1], secrets)  # the search does find the planted values where they are
    with caplog.at_level(logging.WARNING, logger="medfed"):
        site = load_site(cfg, simulated_node(cfg, 1, 3))
    assert "private_syntax.dcm: cannot decode the pixel data" in caplog.text  # the site logs why it left it out
    assert [s for s in secrets if s in site.name or s in site.data.name or s in caplog.text] == []
