import pytest

from medfed.config import RunConfig, from_dict, from_flat, parse_overrides, to_dict, to_flat
from medfed.errors import ConfigError


def test_flat_round_trip_keeps_every_value():
    cfg = from_flat({"train.lr": "0.001", "federation.rounds": "7", "data.download": "true",
                     "model.preset": "micro", "federation.round-timeout": 30})
    assert cfg.train.lr == pytest.approx(1e-3)
    assert cfg.federation.rounds == 7 and cfg.data.download is True and cfg.model.preset == "micro"
    assert isinstance(cfg.federation.round_timeout, float)
    assert from_flat(to_flat(cfg)) == cfg
    assert from_dict(to_dict(cfg)) == cfg


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
