"""The three studies at toy size (real data, real Flower runs with DP-SGD and SecAgg+), and their helpers.

Toy settings keep every site smaller than a batch (sample rate 1), which keeps the privacy accountant fast.
"""

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from medfed.cli import app
from medfed.config import RunConfig, to_flat
from medfed.errors import ConfigError
from medfed.privacy.ledger import site_ledger
from medfed.studies import clients, lightweight, personalization
from medfed.studies.clients import ClientsOptions, local_steps, run_clients_study
from medfed.studies.personalization import PersonalizationOptions, deal_like, run_personalization_study
from medfed.studies.settings import StudySetup, check_setup, options_record, run_config, study_base, with_given


def toy_setup(data: Path, limit: int = 64, **fields) -> StudySetup:
    base = study_base(str(data), limit=limit, rounds=1)
    base = dataclasses.replace(base, train=dataclasses.replace(base.train, batch_size=64, device="cpu"))
    return StudySetup(base, **{"num_samples": 16, "sample_steps": 2, "classifier_epochs": 1, **fields})


def numbers_in(obj, path="$"):
    """Every number in a JSON tree, with its path."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from numbers_in(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from numbers_in(v, f"{path}[{i}]")
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield path, obj


def check_report(folder: Path, plot: str) -> dict:
    """study.json is complete and every number in it finite; report.md's tables have no empty cell; the plot."""
    payload = json.loads((folder / "study.json").read_text())
    assert payload["complete"] is True
    for key in ("command", "created", "machine", "options", "feature_network", "wall_s", "cpu_s"):
        assert key in payload, key
    assert payload["machine"]["cpu_count"] >= 1 and "load_average_1m" in payload["machine"]
    assert payload["wall_s"] > 0 and payload["cpu_s"] > 0
    for where, value in numbers_in(payload):
        assert math.isfinite(value), f"{where} = {value}"
    report = (folder / "report.md").read_text()
    assert "Incomplete" not in report and payload["feature_network"]["name"] in report
    table_rows = [line for line in report.splitlines() if line.startswith("| ")]
    assert table_rows
    for line in table_rows:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        assert all(cells) and "nan" not in [c.lower() for c in cells], f"empty or NaN cell in {line}"
    assert (folder / plot).stat().st_size > 5_000 and f"]({plot})" in report
    return payload


@pytest.fixture(scope="module")
def clients_study(tmp_path_factory, breastmnist):
    options = ClientsOptions(toy_setup(breastmnist), site_counts=(3,), partitions=("dirichlet",),
                             private=(True, False))
    return run_clients_study(options, out=tmp_path_factory.mktemp("study") / "clients", show_progress=False)


@pytest.mark.slow  # Flower simulations
def test_clients_study_reports_fid_and_epsilon_per_setting(clients_study):
    payload = check_report(clients_study, "clients.png")
    network = payload["feature_network"]
    assert network["name"].startswith("medfed-clf/breastmnist/") and network["sha256"].startswith(
        network["name"].rsplit("/", 1)[1])
    assert 0.5 < network["test_accuracy"] <= 1 and Path(network["file"]).is_file()
    dp, plain = payload["results"]
    assert dp["privacy"].startswith("DP-SGD") and plain["privacy"] == "NOT PRIVATE"
    for r in (dp, plain):
        assert r["rounds_completed"] == 1 and r["feature_network"] == network["name"]
        assert r["scores"]["fid"] > 0 and r["scores"]["kid"] is not None
        assert r["scores"]["num-generated"] == 16 and r["scores"]["num-real"] == 156
        assert r["site_images"]["total"] == 64 and r["site_images"]["min"] < r["site_images"]["max"]
        assert r["compute"] == {"rounds": 1, "local_epochs": 1, "batch_size": 64, "image_passes": 64,
                                "local_steps": 3}  # three sites of fewer than 64 images: one batch each
        assert Path(r["sample_grid"]).is_file()
    eps = dp["epsilon"]
    assert 0 < eps["min"] <= eps["max"] <= 10 and eps["max"] == pytest.approx(8, abs=0.1)
    assert eps["ledgers_match_reports"] and eps["ledger_steps"] == 3 and eps["refusals"] == []  # 1 step x 3 sites
    assert plain["epsilon"] is None
    # the ledgers are the sites' own, hash-chained files
    for state in Path(clients_study, "site-state").iterdir():
        assert site_ledger(state).verify() == 1
    report = (clients_study / "report.md").read_text()
    assert "| 3 | dirichlet (b=0.5) | DP-SGD |" in report and "| NOT PRIVATE |" in report


@pytest.fixture(scope="module")
def personalization_study(tmp_path_factory, breastmnist, clients_study):
    classifier = clients_study / "feature-classifier.pt"  # the same hash-checked network, not retrained
    options = PersonalizationOptions(toy_setup(breastmnist, limit=96, feature_network=str(classifier)), sites=3,
                                     finetune_epochs=1, finetune_epsilon=2.0)
    return run_personalization_study(options, out=tmp_path_factory.mktemp("study") / "personalization",
                                     show_progress=False)


@pytest.mark.slow  # Flower simulations
def test_personalization_charges_each_sites_own_ledger(personalization_study):
    payload = check_report(personalization_study, "personalization.png")
    assert [s["site"] for s in payload["sites"]] == ["site-0", "site-1", "site-2"]
    assert sum(s["train_images"] for s in payload["sites"]) == 96
    assert sum(s["test_images"] for s in payload["sites"]) <= 156
    for s in payload["sites"]:
        models = s["models"]
        assert set(models) == {"global", "personalized", "local-only"}
        for m in models.values():
            assert m["scores"]["fid"] > 0 and m["scores"]["num-real"] == s["test_images"]
        after_fl, after_tuning = models["global"]["ledger"], models["personalized"]["ledger"]
        assert after_tuning["state_dir"] == after_fl["state_dir"]  # the site's own ledger
        assert after_tuning["rounds"] == after_fl["rounds"] + 1
        assert after_fl["epsilon"] < after_tuning["epsilon"] <= 10
        assert models["personalized"]["training"]["epsilon"] == pytest.approx(after_tuning["epsilon"])
        alone = models["local-only"]["ledger"]
        assert alone["state_dir"] != after_fl["state_dir"] and alone["epsilon"] == pytest.approx(8, abs=0.1)
        entries = site_ledger(after_tuning["state_dir"]).entries()
        assert entries[-1].data["run_name"] == "federated-personalization"
        tuned = torch.load(models["personalized"]["checkpoint"], weights_only=True)
        assert tuned["extra"]["site"] == s["site"] and tuned["extra"]["kind"] == "personalized"
        # the site's test images follow its own class mix (up to rounding down per class)
        for label, share in s["train_class_mix"].items():
            assert abs(s["test_class_mix"].get(label, 0.0) - share) < 0.15


@pytest.mark.slow  # Flower simulations
def test_lightweight_study_through_the_cli(tmp_path, breastmnist, clients_study):
    out = tmp_path / "lightweight"
    result = CliRunner().invoke(app, [
        "study", "lightweight", "--data-path", str(breastmnist), "--presets", "pico", "--steps", "2,1",
        "--limit", "64", "--rounds", "1", "--batch-size", "64", "--num-samples", "16", "--edge-images", "2",
        "--feature-network", str(clients_study / "feature-classifier.pt"), "--device", "cpu", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "study folder:" in result.output
    payload = check_report(out, "lightweight.png")
    (preset,) = payload["presets"]
    assert preset["preset"] == "pico" and preset["parameters"] == 18_253
    exported = Path(preset["export"]["file"])
    assert exported.stat().st_size == preset["export"]["bytes"]
    assert preset["export"]["max_abs_difference_vs_eager"] < 1e-5
    edge = torch.jit.load(str(exported))
    assert edge(torch.zeros(3, 1, 28, 28), torch.tensor([0, 10, 999])).shape == (3, 1, 28, 28)
    ledgers = list((out / "site-state" / "pico").iterdir())  # each preset's runs have their own ledgers
    assert len(ledgers) == 3 and all(site_ledger(d).verify() == 1 for d in ledgers)
    assert preset["epsilon"] == pytest.approx(8, abs=0.1)
    one, batch = preset["fresh_process"]["one_image"], preset["fresh_process"]["batch"]
    assert one["images"] == 1 and batch["images"] == 16
    assert batch["peak_rss_mib"] >= one["rss_after_loading_mib"] >= one["rss_after_imports_mib"] > 0
    assert [r["steps"] for r in payload["results"]] == [2, 1]
    for r in payload["results"]:
        assert r["scores"]["fid"] > 0 and r["batch"]["ms_per_image"] > 0 and r["single"]["ms_per_image"] > 0
        assert r["batch"]["cuda_peak_mib"] is None and len(r["single"]["ms_each"]) == 2


def test_deal_like_gives_each_site_its_training_class_mix():
    train = [np.array([0] * 90 + [1] * 10), np.array([0] * 10 + [1] * 90)]
    test = np.array([0] * 50 + [1] * 50)
    shards = deal_like(test, train, seed=0)
    assert sorted(np.concatenate(shards).tolist()) == list(range(100))
    assert [(int((test[s] == 0).sum()), int((test[s] == 1).sum())) for s in shards] == [(45, 5), (5, 45)]
    # a test pool with other class priors than training: the scarcer class limits how many are dealt
    train = [np.array([0] * 9 + [1] * 91), np.array([0] * 40 + [1] * 60)]
    test = np.array([0] * 40 + [1] * 60)
    shards = deal_like(test, train, seed=0)
    assert [(int((test[s] == 0).sum()), int((test[s] == 1).sum())) for s in shards] == [(3, 36), (15, 23)]
    assert len(set(np.concatenate(shards).tolist())) == 77


def test_local_steps_round_each_sites_last_batch_up():
    shards = [np.arange(100), np.arange(10), np.arange(33)]
    assert local_steps(shards, batch_size=32, rounds=2, local_epochs=3) == 2 * 3 * (4 + 1 + 2)


def test_given_options_override_the_base_config_and_study_fields(breastmnist):
    options = with_given(ClientsOptions(toy_setup(breastmnist)), {"--limit": 10, "--rounds": None, "--lr": 1e-4},
                         ["train.lr=5e-4", "privacy.accountant=prv"], beta=0.1, num_samples=None, sample_steps=3)
    base = options.setup.base
    assert base.data.limit == 10 and base.federation.rounds == 1  # given, and not given
    assert base.train.lr == 5e-4 and base.privacy.accountant == "prv"  # --set comes last, as in build_config
    assert options.beta == 0.1 and options.setup.num_samples == 16 and options.setup.sample_steps == 3


def test_each_run_config_derives_from_the_base(breastmnist, tmp_path):
    """Typed fields of the base reach every run; each study sets only its own per-setting fields."""
    setup = StudySetup(dataclasses.replace(toy_setup(breastmnist).base, privacy=dataclasses.replace(
        RunConfig().privacy, accountant="prv", site_cap_epsilon="9")), sample_steps=7)
    cfg = run_config(setup, tmp_path, "a-run", (1, 28, 28))
    assert cfg.data.path == str(breastmnist.resolve()) and (cfg.data.channels, cfg.data.image_size) == (1, 28)
    assert cfg.data.limit == 64 and cfg.train.batch_size == 64 and cfg.federation.rounds == 1
    assert cfg.diffusion.sample_steps == 7 and cfg.diffusion.sampler == "ddim" and cfg.federation.sample_every == 0
    assert cfg.privacy.accountant == "prv" and cfg.privacy.site_caps == (9.0,)
    assert cfg.privacy.site_state_root == str(tmp_path / "site-state")
    assert (cfg.output.dir, cfg.output.name) == (str(tmp_path / "runs"), "a-run")

    plain = clients.setting_config(cfg, clients.Setting(5, "dirichlet", False), beta=0.3)
    assert (plain.federation.num_sites, plain.federation.partition, plain.federation.dirichlet_beta) == (
        5, "dirichlet", 0.3)
    assert not plain.privacy.enabled and not plain.policy.require_dp and plain.privacy.accountant == "prv"
    assert to_flat(dataclasses.replace(plain, federation=cfg.federation, privacy=cfg.privacy,
                                       policy=cfg.policy)) == to_flat(cfg)  # nothing else changed

    pico = lightweight.preset_config(cfg, "pico", 4)
    assert pico.model.preset == "pico" and pico.federation.num_sites == 4
    assert pico.privacy.site_state_root == str(tmp_path / "site-state" / "pico")  # each preset its own ledgers

    files = [tmp_path / f"site-{i}.npz" for i in range(3)]
    options = PersonalizationOptions(setup, sites=3)
    fed = personalization.federated_config(cfg, options, files)
    assert fed.data.path == "" and fed.data.limit == 0 and [e.path for e in fed.data.site_entries] == list(
        map(str, files))
    with pytest.raises(ConfigError, match="federation.num-sites"):  # every derived config is checked
        clients.setting_config(cfg, clients.Setting(2, "iid", True), beta=0.5)


def test_study_json_keeps_the_option_fields(breastmnist):
    """``options.setup`` in study.json names the options as before (reports and readers use them), with the whole
    base config beside them."""
    record = options_record(clients.full_options(str(breastmnist)))
    setup = record["setup"]
    assert {k: setup[k] for k in ("dataset", "limit", "image_size", "channels", "preset", "rounds", "local_epochs",
                                  "batch_size", "lr", "target_epsilon", "cap_epsilon", "feature_network",
                                  "classifier_epochs", "num_samples", "sample_steps", "seed", "device",
                                  "parallel_sites", "cpus_per_site")} == {
        "dataset": "npz", "limit": 0, "image_size": 0, "channels": 0, "preset": "tiny", "rounds": 20,
        "local_epochs": 1, "batch_size": 32, "lr": 2e-4, "target_epsilon": 8.0, "cap_epsilon": 10.0,
        "feature_network": "classifier", "classifier_epochs": 3, "num_samples": 1000, "sample_steps": 50, "seed": 0,
        "device": "auto", "parallel_sites": 4, "cpus_per_site": 4}
    assert setup["data_path"] == str(breastmnist) and setup["config"]["model.preset"] == "tiny"
    assert record["site_counts"] == (3, 5, 10, 20, 50) and json.loads(json.dumps(record))


def test_setup_checks_name_the_option(breastmnist):
    base = toy_setup(breastmnist).base
    with pytest.raises(ConfigError, match="^--limit must be >= 0"):
        check_setup(StudySetup(dataclasses.replace(base, data=dataclasses.replace(base.data, limit=-1))))
    with pytest.raises(ConfigError, match="^--num-samples must be >= 2"):
        check_setup(StudySetup(base, num_samples=1))


@pytest.mark.parametrize("args, message", [
    (["clients", "--sites", "2,5"], "--sites 2,5: every count must be >= 3"),
    (["clients", "--privacy", "maybe"], "--privacy 'maybe'"),
    (["clients", "--partitions", "iid,random"], "--partitions: random"),
    (["lightweight", "--presets", "huge"], "--presets: huge"),
    (["personalization", "--sites", "2"], "--sites 2: must be >= 3"),
    (["clients", "--epsilon", "12"], "--cap-epsilon (10) must be at least --epsilon (12)"),
    (["clients", "--limit", "-1"], "option --limit -1: config key 'data.limit' must be >= 0"),
    (["lightweight", "--lr", "-1"], "option --lr -1.0: config key 'train.lr' must be > 0"),
    (["personalization", "--set", "privacy.enabled=false"], "the personalization study charges DP fine-tuning"),
    (["clients", "--set", "federation.rounds=0"], "--set federation.rounds=0: config key 'federation.rounds'"),
])
def test_bad_options_fail_before_any_work(tmp_path, breastmnist, args, message):
    out = tmp_path / "study"
    result = CliRunner().invoke(app, ["study", *args, "--data-path", str(breastmnist), "--out", str(out)])
    assert isinstance(result.exception, ConfigError), result.output
    assert message in str(result.exception)
    assert not out.exists()


def test_a_folder_holding_a_study_is_refused(tmp_path, breastmnist):
    (tmp_path / "study.json").write_text("{}")
    result = CliRunner().invoke(app, ["study", "clients", "--data-path", str(breastmnist), "--out", str(tmp_path)])
    assert isinstance(result.exception, ConfigError) and "already holds a study" in str(result.exception)
