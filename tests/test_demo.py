"""``medfed demo``: its configs, the held-out test set no site and no public run sees, the class grid, the verdict,
and (slow) the whole demo at a tiny size through real Flower, DP-SGD and SecAgg+."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torchvision.io import read_image

from medfed.datasets import load_dataset
from medfed.demo import (DEMO, DemoSettings, class_grid, demo_configs, held_out_split, image_digests, run_demo,
                         verdict)


def test_demo_configs_are_class_conditional_private_and_start_from_the_public_model(tmp_path):
    from medfed.federation.policy import check_simulation

    public, private = demo_configs(str(tmp_path), "demo", "cpu")
    for cfg in (public, private):
        assert cfg.model.num_classes == 10 and cfg.model.preset == "micro"
        assert cfg.diffusion.sampler == "ddim" and cfg.diffusion.guidance == DEMO.guidance == 0.0  # see DemoSettings
        assert cfg.diffusion.prediction == "v_prediction"  # the default; without guidance the conditional model alone
        assert cfg.train.label_dropout > 0  # the null class stays trained: guidance remains available
    assert (public.data.dataset, public.data.split) == ("embedded-mnist", "test")
    assert (private.data.dataset, private.data.split, private.data.limit) == ("embedded-mnist", "train", 3500)
    assert private.privacy.enabled and private.secagg.enabled
    assert private.privacy.target_epsilon == 10.0 and private.privacy.site_cap_epsilon == "12"
    assert private.federation.init_checkpoint == str(
        tmp_path.resolve() / "demo" / "public-pretraining" / "checkpoints" / "latest.pt")
    assert private.privacy.site_state_root == str(tmp_path.resolve() / "demo" / "site-state")
    check_simulation(private)  # the simulated sites' policy accepts the run (DP, SecAgg+, 3 sites)


def test_held_out_digits_are_in_no_site_and_not_public(tmp_path):
    """The TSTR/FID test set: the 1,000 train digits the three simulated sites do not receive (as the sites load
    their shards), none of them a public pretraining digit, every class present; the same on every call."""
    from medfed.federation.policy import simulated_node
    from medfed.federation.site import load_site

    public, private = demo_configs(str(tmp_path), "demo", "cpu")
    held = held_out_split(private, public)
    assert len(held) == 4500 - DEMO.private_images == 1000
    assert torch.bincount(held.labels, minlength=10).min() >= 80  # a seeded draw: every digit well represented
    held_ids = set(image_digests(held))
    assert len(held_ids) == len(held)

    site_ids: set[bytes] = set()
    for i in range(private.federation.num_sites):
        site = load_site(private, simulated_node(private, i, private.federation.num_sites))
        ids = set(image_digests(site.data))
        assert not ids & held_ids, f"site {i} holds held-out test digits"
        site_ids |= ids
    assert len(site_ids) == DEMO.private_images
    everything = set(image_digests(load_dataset(dataclasses.replace(private.data, limit=0))))
    assert site_ids | held_ids == everything  # nothing of the train split is lost or invented
    assert not held_ids & set(image_digests(load_dataset(public.data)))
    assert torch.equal(held_out_split(private).images, held.images)  # fixed: seeded by train.seed


def test_held_out_split_refuses_when_the_sites_hold_everything(tmp_path):
    from medfed.errors import MedfedError

    _, private = demo_configs(str(tmp_path), "demo", "cpu", DemoSettings(private_images=0))  # 0: all 4,500
    with pytest.raises(MedfedError, match="nothing is left to test on"):
        held_out_split(private)


def test_class_grid_has_one_row_per_digit(tmp_path):
    labels = torch.arange(30) % 10  # sample_labelled's order: every class in turn
    images = (labels.float() / 9 * 2 - 1)[:, None, None, None].expand(30, 1, 28, 28).clone()
    grid = read_image(str(class_grid(images, labels, 4, tmp_path / "grid.png")))  # 3 of each class, 1 blank
    pad, side = 2, 28
    assert grid.shape[1:] == (pad + 10 * (side + pad), pad + 4 * (side + pad))
    for c in range(10):
        top = pad + c * (side + pad)
        row = [grid[0, top + 10, pad + j * (side + pad) + 10].item() for j in range(4)]
        assert row[:3] == [round(c / 9 * 255)] * 3 and row[3] == 0, (c, row)


def test_verdict_says_plainly_whether_the_private_phase_helped():
    before = {"tstr_accuracy": 0.80, "fid": 20.0}
    improved, text = verdict(before, {"tstr_accuracy": 0.86, "fid": 15.0}, 1000)
    assert improved and text.startswith("The private federated phase improved") and "+6.0 points" in text
    improved, text = verdict(before, {"tstr_accuracy": 0.81, "fid": 15.0}, 1000)  # within 2 standard errors
    assert not improved and "did NOT measurably improve" in text
    improved, text = verdict(before, {"tstr_accuracy": 0.90, "fid": 25.0}, 1000)  # FID worse
    assert not improved and "did NOT clearly improve" in text


@pytest.mark.slow  # a Flower simulation with DP-SGD and SecAgg+, plus training
def test_demo_end_to_end_at_a_tiny_size(tmp_path, capsys):
    tiny = DemoSettings(pretrain_steps=4, rounds=1, batch_size=64, num_samples=40, sample_steps=2,
                        classifier_epochs=1, grid_columns=3)
    run = run_demo(out=str(tmp_path), name="demo", device="cpu", settings=tiny)
    out = capsys.readouterr().out
    root = tmp_path.resolve() / "demo"
    result = json.loads((root / "demo-evaluation.json").read_text())
    assert result["test_set"]["num_images"] == 1000
    assert result["feature_network"]["name"].startswith("medfed-clf/embedded-mnist-public/")
    for row in (result["before"], result["after"]):
        assert row["num_samples"] == 40 and 0 <= row["tstr_accuracy"] <= 1 and row["fid"] is not None
        assert row["tstr"]["test"]["num_images"] == 1000
        assert read_image(row["grid"]).shape[1:] == (2 + 10 * 30, 2 + 3 * 30)
    assert result["after"]["checkpoint"] == str(run.latest_checkpoint)
    assert sorted(result["epsilon"]) == ["site-0", "site-1", "site-2"]
    assert all(0 < e <= 12 for e in result["epsilon"].values())
    assert result["verdict"] in out.replace("\n", " ") or result["verdict"][:40] in out
    assert ("did NOT" in result["verdict"]) != result["improved"]
    assert "TSTR accuracy" in out and "FID" in out and str(root / "class-grid.png") in out
    assert (root / "public-pretraining" / "checkpoints" / "latest.pt").is_file()
    assert (run.root / "privacy-report").is_dir()
