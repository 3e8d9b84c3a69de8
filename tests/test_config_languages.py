"""The four keys written in a small language (data.site-paths, data.ct-window, data.nifti-slices,
privacy.site-cap-epsilon): parsed once, when the config is built, into typed values; the string stays the stored
form."""

import dataclasses
import re

import pytest

from medfed.config import (
    CT_WINDOWS,
    SYNTAX,
    DataConfig,
    PrivacyConfig,
    RunConfig,
    SitePath,
    SliceRange,
    build_config,
    config_toml,
    describe_keys,
    from_dict,
    from_flat,
    to_dict,
    to_flat,
)
from medfed.errors import ConfigError


def test_site_paths_parse_into_one_entry_per_site():
    cfg = from_flat({"data.site-paths": " folder:/data/png ; dicom : /data/pacs-export;;nifti:C:/research ;"})
    assert cfg.data.site_entries == (SitePath("folder", "/data/png"), SitePath("dicom", "/data/pacs-export"),
                                     SitePath("nifti", "C:/research"))  # only the first ':' separates
    fmt, path = cfg.data.site_entries[1]
    assert (fmt, path) == ("dicom", "/data/pacs-export") and cfg.data.site_entries[2].format == "nifti"
    assert RunConfig().data.site_entries == () and DataConfig(site_paths=" ; ").site_entries == ()


def test_site_caps_parse_into_one_value_or_one_per_site():
    assert RunConfig().privacy.site_caps == (10.0,)
    assert from_flat({"privacy.site-cap-epsilon": "12"}).privacy.site_caps == (12.0,)
    assert from_flat({"privacy.site-cap-epsilon": " 100, 100,1e2 ,3.5,"}).privacy.site_caps == (100, 100, 100, 3.5)
    assert from_flat({"privacy.site-cap-epsilon": 4}).privacy.site_caps == (4.0,)  # a TOML number is text too


def test_ct_window_parses_into_level_and_width_in_hounsfield_units():
    assert RunConfig().data.window == CT_WINDOWS["soft-tissue"] == (40.0, 400.0)
    assert from_flat({"data.ct-window": "lung"}).data.window == (-600.0, 1500.0)
    assert DataConfig(ct_window=" Brain ").window == (40.0, 80.0)
    assert from_flat({"data.ct-window": "-50, 350.5"}).data.window == (-50.0, 350.5)


@pytest.mark.parametrize("text,count,kept", [
    ("", 7, range(7)),
    (":", 7, range(7)),
    ("2:5", 10, range(2, 5)),
    ("10:-10", 50, range(10, 40)),
    ("-3:", 10, range(7, 10)),
    ("40:120", 100, range(40, 100)),  # past the end: clipped, as a Python slice
    ("0.25:0.75", 100, range(25, 75)),
    ("0.2:0.8", 7, range(1, 6)),  # round(1.4) = 1, round(5.6) = 6
    (".5:", 10, range(5, 10)),
    ("-0.2:", 10, range(8, 10)),
    ("0:1", 10, range(0, 1)),  # whole numbers are indices
    ("0:1.0", 10, range(0, 10)),  # a decimal point makes fractions
])
def test_nifti_slices_parse_into_a_slice_range(text, count, kept):
    slices = from_flat({"data.nifti-slices": text}).data.slices
    assert isinstance(slices, SliceRange)
    assert slices.indices(count) == kept
    assert slices.indices(0) == range(0)


def test_parsed_once_when_built_and_the_string_stays_the_stored_form(tmp_path):
    texts = {"data.site-paths": "npz:/a.npz;npz:/b.npz", "data.ct-window": "40,400", "data.nifti-slices": "0.2:0.8",
             "privacy.site-cap-epsilon": "8,9,10"}
    cfg = from_flat(texts)
    parsed = {"site_entries", "window", "slices"}
    assert parsed <= set(vars(cfg.data)) and "site_caps" in vars(cfg.privacy)  # cached at construction
    assert cfg.data.window is cfg.data.window and cfg.privacy.site_caps is cfg.privacy.site_caps
    flat = to_flat(cfg)
    assert {k: flat[k] for k in texts} == texts  # Flower's run config and --set keep the text
    assert set(to_dict(cfg)["data"]) == {f.name for f in dataclasses.fields(DataConfig)}  # no parsed companion
    assert from_flat(flat) == cfg and from_dict(to_dict(cfg)) == cfg
    toml = config_toml(cfg)
    assert 'ct-window = "40,400"' in toml and 'site-cap-epsilon = "8,9,10"' in toml
    (tmp_path / "run.toml").write_text(toml)
    again = build_config(config_file=tmp_path / "run.toml")
    assert again == cfg and again.data.slices == cfg.data.slices and again.privacy.site_caps == (8.0, 9.0, 10.0)
    # a replaced section is parsed again from its new text
    assert dataclasses.replace(cfg.data, ct_window="bone").window == CT_WINDOWS["bone"]


BAD = [
    ("data.site-paths", "/data/png", "entry '/data/png' is not format:path"),
    ("data.site-paths", "folder:/a;dicom", "entry 'dicom' is not format:path"),
    ("data.site-paths", "npz:", "entry 'npz:' is not format:path"),
    ("data.site-paths", "dicm:/data/pacs", "format 'dicm' is not one of"),
    ("privacy.site-cap-epsilon", "", "is empty"),
    ("privacy.site-cap-epsilon", " , ", "is empty"),
    ("privacy.site-cap-epsilon", "10;5", "'10;5' is not a number or comma-separated numbers"),
    ("privacy.site-cap-epsilon", "10,ten", "'10,ten' is not a number"),
    ("privacy.site-cap-epsilon", "10,0", "finite epsilon > 0 (got '10,0')"),
    ("privacy.site-cap-epsilon", "-1", "finite epsilon > 0"),
    ("privacy.site-cap-epsilon", "inf", "finite epsilon > 0"),
    ("data.ct-window", "kidney", "'kidney' is neither a preset"),
    ("data.ct-window", "40,-5", "'40,-5' is neither a preset"),
    ("data.ct-window", "40,0", "with width > 0"),
    ("data.ct-window", "40", "'40' is neither a preset"),
    ("data.ct-window", "nan,400", "'nan,400' is neither"),
    ("data.ct-window", "", "'' is neither"),
    ("data.nifti-slices", "middle", "'middle' is not start:stop"),
    ("data.nifti-slices", "40", "'40' is not start:stop"),
    ("data.nifti-slices", "a:3", "'a' in 'a:3' is not a number"),
    ("data.nifti-slices", "1.2.3:", "'1.2.3' in '1.2.3:' is not a number"),
    ("data.nifti-slices", "1e2:", "'1e2' in '1e2:' is not a number"),
    ("data.nifti-slices", "10.:20", "fractions of the axis and must be in [-1, 1]"),
    ("data.nifti-slices", "0.2:1.5", "must be in [-1, 1]"),
]


@pytest.mark.parametrize("key,text,message", BAD)
def test_a_bad_value_fails_when_the_config_is_built_naming_the_key_and_text(key, text, message):
    with pytest.raises(ConfigError, match=re.escape(f"config key '{key}'")) as err:
        from_flat({key: text})
    assert err.value.key == key and message in str(err.value)
    section, name = key.split(".")
    with pytest.raises(ConfigError, match=re.escape(message)):  # any way of building the section
        {"data": DataConfig, "privacy": PrivacyConfig}[section](**{name.replace("-", "_"): text})
    with pytest.raises(ConfigError, match=re.escape(f"--set {key}={text.strip()}: config key '{key}'")):
        build_config({}, [f"{key}={text}"])


def test_misspelt_names_get_a_suggestion():
    with pytest.raises(ConfigError, match=r"'lungs' is neither .*\(did you mean lung\?\)"):
        from_flat({"data.ct-window": "lungs"})
    with pytest.raises(ConfigError, match=r"format 'nifty' .*\(did you mean nifti\?\)"):
        from_flat({"data.site-paths": "nifty:/data/research"})


def test_medfed_config_shows_each_syntax():
    allowed = {i.key: i.allowed for i in describe_keys()}
    assert {k: allowed[k] for k in SYNTAX} == SYNTAX
    assert "soft-tissue" in allowed["data.ct-window"] and "0.2:0.8" in allowed["data.nifti-slices"]


def test_a_simulation_needs_an_entry_for_every_site():
    from medfed.launch.simulation import check_site_lists

    check_site_lists(from_flat({"data.site-paths": "npz:/a;npz:/b;npz:/c", "privacy.site-cap-epsilon": "1,2,3"}))
    check_site_lists(from_flat({"privacy.site-cap-epsilon": "5"}))
    with pytest.raises(ConfigError, match=re.escape("'data.site-paths' lists 2 sites, but federation.num-sites is 3")):
        check_site_lists(from_flat({"data.site-paths": "npz:/a;npz:/b"}))
    with pytest.raises(ConfigError, match=re.escape("'privacy.site-cap-epsilon' lists 2 caps")):
        check_site_lists(from_flat({"privacy.site-cap-epsilon": "1,2"}))
    check_site_lists(from_flat({"privacy.site-cap-epsilon": "1,2", "privacy.enabled": False}))  # caps unused
