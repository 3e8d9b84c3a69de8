import re

import pytest

from medfed.config import (
    CHOICES,
    DATASETS,
    OPTION_KEYS,
    PRESETS,
    RUN_CONFIG_FILE,
    RunConfig,
    build_config,
    describe_keys,
    from_dict,
    from_flat,
    parse_overrides,
    to_dict,
    to_flat,
    write_config_file,
)
from medfed.errors import ConfigError


def test_flat_round_trip_keeps_every_value():
    cfg = from_flat({"train.lr": "0.001", "federation.rounds": "7", "data.download": "true",
                     "model.preset": "micro", "federation.round-timeout": 30})
    assert cfg.train.lr == pytest.approx(1e-3)
    assert cfg.federation.rounds == 7 and cfg.data.download is True and cfg.model.preset == "micro"
    assert isinstance(cfg.federation.round_timeout, float)
    assert from_flat(to_flat(cfg)) == cfg
    assert from_dict(to_dict(cfg)) == cfg


@pytest.mark.parametrize("stored", ["epsilon", "v_prediction", None])
def test_a_stored_config_keeps_the_prediction_its_model_was_trained_for(stored):
    """New runs predict the velocity; a checkpoint's config written before ``diffusion.prediction`` existed
    describes a noise-predicting model and must be read as one, not as today's default."""
    nested = to_dict(from_flat({"diffusion.prediction": stored or "v_prediction"}))
    if stored is None:
        del nested["diffusion"]["prediction"]
    assert RunConfig().diffusion.prediction == "v_prediction"
    assert from_dict(nested).diffusion.prediction == (stored or "epsilon")


def test_flat_keys_use_sections_and_hyphens():
    keys = to_flat(RunConfig())
    assert "train.batch-size" in keys and "federation.local-epochs" in keys
    assert all(isinstance(v, (bool, int, float, str)) for v in keys.values())


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match="train.learning-rate"):
        from_flat({"train.learning-rate": 1})


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match="train.batch-size"):
        from_flat({"train.batch-size": "many"})


@pytest.mark.parametrize("key,value", [("train.batch-size", 0), ("federation.fraction-fit", 1.5),
                                       ("diffusion.sampler", "euler"), ("data.channels", 2)])
def test_out_of_range_values_are_rejected(key, value):
    with pytest.raises(ConfigError, match=key):
        from_flat({key: value})


def test_parse_overrides():
    assert parse_overrides(["train.lr=1e-4", " model.preset = tiny "]) == {"train.lr": "1e-4",
                                                                            "model.preset": "tiny"}
    with pytest.raises(ConfigError, match="not of the form"):
        parse_overrides(["train.lr"])


@pytest.mark.parametrize("flat,message", [
    ({"model.presett": "tiny"}, "did you mean model.preset?"),
    ({"train.batch_size": 8}, "did you mean train.batch-size?"),
    ({"lr": 0.1}, "did you mean train.lr?"),
    ({"model.preset": "tinny"}, "did you mean tiny?"),
    ({"data.dataset": "fashion_mnist"}, "did you mean fashion-mnist?"),
    ({"diffusion.schedule": "linear"}, "linear_beta"),
    ({"train.device": "cuda0"}, "auto, cpu, cuda, cuda:N"),
])
def test_unknown_keys_and_values_suggest_the_closest(flat, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as err:
        from_flat(flat)
    assert "medfed config --list" not in str(err.value)
    assert err.value.key == next(iter(flat))


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:1"])
def test_valid_devices_are_accepted(device):
    assert from_flat({"train.device": device}).train.device == device


@pytest.mark.parametrize("flat,key", [
    ({"federation.num-sites": 1}, "federation.num-sites"),
    ({"federation.num-sites": 2}, "federation.num-sites"),
    ({"federation.num-sites": 5, "federation.min-sites": 2}, "federation.min-sites"),
])
def test_secure_aggregation_needs_three_sites_per_round(flat, key):
    with pytest.raises(ConfigError, match=re.escape(f"at least 3 sites per round ({key} = ")):
        from_flat(flat)
    assert from_flat({**flat, "secagg.enabled": False}).secagg.enabled is False


def test_secure_aggregation_sums_must_fit_the_modulus():
    with pytest.raises(ConfigError, match="secagg.quantization-range.*federation.num-sites.*2\\*\\*32"):
        from_flat({"federation.num-sites": 70, "secagg.quantization-range": 2**26})
    assert from_flat({"federation.num-sites": 63, "secagg.quantization-range": 2**26}).federation.num_sites == 63
    with pytest.raises(ConfigError, match=re.escape("[2, 2**26]")):
        from_flat({"secagg.quantization-range": 2**26 + 1})


def test_non_finite_numbers_are_rejected():
    with pytest.raises(ConfigError, match="train.lr.*finite"):
        from_flat({"train.lr": "nan"})


def test_preset_and_dataset_names_match_their_implementations():
    from medfed.datasets.loading import DATASETS as LOADED
    from medfed.datasets.sources import SPLITS
    from medfed.models.unet import PRESETS as BUILT

    assert PRESETS == tuple(BUILT)
    assert set(DATASETS) == set(LOADED)
    assert CHOICES["data.split"] == SPLITS


def test_every_key_has_a_description_and_choice_keys_list_their_values():
    infos = {i.key: i for i in describe_keys()}
    assert set(infos) == set(to_flat(RunConfig()))
    assert not [k for k, i in infos.items() if not i.description], "add a docstring under the field"
    assert infos["model.preset"].allowed == "one of " + ", ".join(PRESETS)
    assert "must be > 0" in infos["train.lr"].allowed and infos["train.lr"].kind == "a number"
    assert "Learning rate" in infos["train.lr"].description or "learning rate" in infos["train.lr"].description


def test_run_toml_round_trip(tmp_path):
    cfg = from_flat({"train.lr": 3e-4, "federation.rounds": 7, "data.dataset": "npz", "data.path": "/x/y.npz",
                     "privacy.delta": 1e-6, "secagg.enabled": False, "federation.num-sites": 2,
                     "evaluation.near-copy-threshold": 1 / 3, "output.name": 'quote"d'})
    path = write_config_file(cfg, tmp_path / RUN_CONFIG_FILE)
    assert "[train]" in path.read_text() and "batch-size = 64" in path.read_text()
    assert build_config(config_file=path) == cfg


def test_config_file_forms_and_layering(tmp_path):
    flat = tmp_path / "flat.toml"
    flat.write_text('"train.lr" = 0.5\nfederation.rounds = 9\n[model]\npreset = "micro"\n[train]\nbatch_size = 16\n')
    cfg = build_config(config_file=flat)
    assert (cfg.train.lr, cfg.federation.rounds, cfg.model.preset, cfg.train.batch_size) == (0.5, 9, "micro", 16)
    cfg = build_config({"--rounds": 3, "--lr": None}, ["model.preset=nano"], flat)
    assert (cfg.federation.rounds, cfg.train.lr, cfg.model.preset) == (3, 0.5, "nano")


@pytest.mark.parametrize("text,message", [
    ('"train.lr" = -1\n', "flat.toml: config key 'train.lr' must be > 0"),
    ('[model]\npresett = "tiny"\n', "did you mean model.preset?"),
    ("train.lr = \n", "not a readable TOML file"),
    ("[a.b.c]\nx = 1\n", "is a table"),
])
def test_config_file_errors_name_the_file(tmp_path, text, message):
    path = tmp_path / "flat.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(message)) as err:
        build_config(config_file=path)
    assert str(path) in str(err.value)


def test_build_config_names_the_option_or_set_item():
    with pytest.raises(ConfigError, match=re.escape("option --batch-size 0: config key 'train.batch-size'")):
        build_config({"--batch-size": 0})
    with pytest.raises(ConfigError, match=re.escape("--set train.lr=-2: config key 'train.lr'")):
        build_config({}, ["train.lr=-2"])
    with pytest.raises(ConfigError, match=re.escape("option --sites 1: secure aggregation")):
        build_config({"--sites": 1})
    assert set(OPTION_KEYS.values()) <= set(to_flat(RunConfig()))


def test_every_run_folder_keeps_a_run_toml_that_config_reads_back(tmp_path):
    from medfed.runs import open_run

    cfg = build_config({"--out": str(tmp_path), "--name": "r1", "--rounds": 4, "--preset": "micro"},
                       ["privacy.target-epsilon=3.5"])
    run = open_run(cfg)
    again = build_config(config_file=run.root / RUN_CONFIG_FILE)
    assert again == cfg
    assert build_config({"--name": "r2"}, config_file=run.root / RUN_CONFIG_FILE).output.name == "r2"


@pytest.mark.parametrize("flat", [{"secagg.reconstruction-threshold": 4},
                                  {"secagg.reconstruction-threshold": 1},
                                  {"federation.num-sites": 5, "secagg.num-shares": 3,
                                   "secagg.reconstruction-threshold": 4}])
def test_reconstruction_threshold_must_fit_the_neighbourhood(flat):
    with pytest.raises(ConfigError, match="secagg.reconstruction-threshold"):
        from_flat(flat)
    assert from_flat({**flat, "secagg.reconstruction-threshold": 2}).secagg.reconstruction_threshold == 2
