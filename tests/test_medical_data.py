"""Hospital data at a site: real DICOM, NIfTI, PNG/JPEG and MedMNIST files through the MONAI loaders."""

import json
import logging
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from medical_files import (NIBABEL_DATA, PLANTED, copy_nifti, find_leaks, pydicom_file, write_planted_dicoms,
                           write_pngs)
from medfed.config import DataConfig, RunConfig, from_flat
from medfed.contracts import NodeConfig, SitePolicy
from medfed.datasets import load_dataset
from medfed.datasets.medical import read_site_folder
from medfed.errors import ConfigError, DatasetError


def check_images(ds, n, shape):
    assert len(ds) == n
    assert tuple(ds.images.shape[1:]) == shape and ds.images.dtype == torch.float32
    assert ds.labels.dtype == torch.int64 and len(ds.labels) == n
    assert ds.images.min() >= -1 and ds.images.max() <= 1
    assert (ds.images.amax(dim=(1, 2, 3)) - ds.images.amin(dim=(1, 2, 3))).min() > 0.5  # every image has content


# --- DICOM -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,frames", [
    ("CT_small.dcm", 1), ("MR_small.dcm", 1), ("MR_small_RLE.dcm", 1), ("MR_small_bigendian.dcm", 1),
    ("examples_overlay.dcm", 1),        # MR, 300x484 uint16
    ("JPEG2000.dcm", 1),                # NM, JPEG 2000 (Pillow's decoder)
    ("examples_palette.dcm", 1),        # US, palette colour
    ("examples_ybr_color.dcm", 30),     # US, multi-frame YBR JPEG
    ("SC_rgb_rle_2frame.dcm", 2),       # multi-frame RGB, RLE
])
def test_pydicom_files_give_configured_size_in_unit_range(name, frames):
    ds = load_dataset(DataConfig(dataset="dicom", path=str(pydicom_file(name)), image_size=32, channels=1))
    check_images(ds, frames, (1, 32, 32))
    assert (ds.labels == -1).all()


def test_nibabel_dicoms_form_one_series(tmp_path):
    for n in ("0.dcm", "1.dcm"):
        shutil.copy(NIBABEL_DATA / n, tmp_path / n)
    check_images(load_dataset(DataConfig(dataset="dicom", path=str(tmp_path), image_size=64, channels=3)), 2,
                 (3, 64, 64))


def test_ct_is_rescaled_to_hounsfield_and_windowed_pixel_for_pixel():
    import pydicom

    path = pydicom_file("CT_small.dcm")
    raw = pydicom.dcmread(path)
    hu = raw.pixel_array.astype(np.float64) * float(raw.RescaleSlope) + float(raw.RescaleIntercept)
    for window, (level, width) in {"40,400": (40, 400), "lung": (-600, 1500)}.items():
        ds = load_dataset(DataConfig(dataset="dicom", path=str(path), ct_window=window))
        expected = np.clip((hu - (level - width / 2)) / width * 2 - 1, -1, 1)
        np.testing.assert_allclose(ds.images[0, 0].numpy(), expected, atol=1e-5)  # also: not transposed


def test_non_square_mr_keeps_rows_and_columns_and_uses_percentiles():
    import pydicom

    path = pydicom_file("examples_overlay.dcm")
    pixels = pydicom.dcmread(path).pixel_array.astype(np.float64)
    ds = load_dataset(DataConfig(dataset="dicom", path=str(path), percentile_low=1, percentile_high=99))
    assert ds.image_shape == (1, 300, 484)
    low, high = np.percentile(pixels, [1, 99])
    np.testing.assert_allclose(ds.images[0, 0].numpy(), np.clip((pixels - low) / (high - low) * 2 - 1, -1, 1),
                               atol=1e-5)
    padded = load_dataset(DataConfig(dataset="dicom", path=str(path), image_size=64))
    assert padded.image_shape == (1, 64, 64)
    assert torch.allclose(padded.images[0, 0, :8], torch.tensor(-1.0))  # padded to a square with background


def test_percentiles_are_taken_per_series_not_per_file(tmp_path):
    import pydicom

    source = pydicom.dcmread(pydicom_file("MR_small.dcm"))
    half = (source.pixel_array // 2).astype(source.pixel_array.dtype).tobytes()
    for i, (name, series, pixels) in enumerate([("a_full", "1.2.3.4.1", None), ("a_half", "1.2.3.4.1", half),
                                                ("b_half", "1.2.3.4.2", half)]):
        ds = pydicom.dcmread(pydicom_file("MR_small.dcm"))
        ds.SeriesInstanceUID, ds.SOPInstanceUID = series, f"{series}.{i}"
        if pixels is not None:
            ds.PixelData = pixels
        ds.save_as(tmp_path / f"{name}.dcm")
    a_full, a_half, b_half = load_dataset(DataConfig(dataset="dicom", path=str(tmp_path))).images[:, 0]
    alone = load_dataset(DataConfig(dataset="dicom", path=str(pydicom_file("MR_small.dcm")))).images[0, 0]
    assert float(a_half.mean()) < float(a_full.mean()) - 0.3  # same series: the halved image stays darker
    assert torch.allclose(b_half, alone, atol=0.02)  # alone in its series: full contrast, like the original


def test_monochrome1_is_inverted_so_bright_means_dense(tmp_path):
    import pydicom

    ds = pydicom.dcmread(pydicom_file("MR_small.dcm"))
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(tmp_path / "mono1.dcm")
    mono1 = load_dataset(DataConfig(dataset="dicom", path=str(tmp_path / "mono1.dcm"))).images
    mono2 = load_dataset(DataConfig(dataset="dicom", path=str(pydicom_file("MR_small.dcm")))).images
    torch.testing.assert_close(mono1, -mono2)


def test_error_reasons_are_scrubbed_of_header_values(tmp_path):
    import pydicom

    from medfed.datasets.dicom import code_string, header_strings, redact

    write_planted_dicoms(tmp_path, {"CT_small.dcm": 1})
    ds = pydicom.dcmread(tmp_path / "CT_small_000.dcm")
    message = f"bad value '{ds.PatientName}' in {ds.SOPInstanceUID} dated {ds.StudyDate}"
    scrubbed = redact(message, header_strings(ds))
    assert scrubbed == "bad value '<header value>' in <header value> dated <header value>"
    assert code_string("CT") == "CT" and code_string(str(ds.PatientName)) == "?"


def test_dicom_objects_without_images_are_left_out_not_errors(tmp_path):
    shutil.copy(pydicom_file("CT_small.dcm"), tmp_path / "ct.dcm")
    shutil.copy(pydicom_file("rtdose.dcm"), tmp_path / "dose.dcm")
    folder = read_site_folder(DataConfig(dataset="dicom", path=str(tmp_path)), "dicom")
    assert len(folder.dataset) == 1 and not folder.skipped
    assert [i.file.name for i in folder.ignored] == ["dose.dcm"] and "RTDOSE" in folder.ignored[0].reason


def test_dicom_labels_from_csv_with_fixed_class_order(tmp_path):
    write_planted_dicoms(tmp_path / "site", {"CT_small.dcm": 2, "MR_small.dcm": 2})
    (tmp_path / "site" / "labels.csv").write_text(
        "file,label\nCT_small_000.dcm,ct\nCT_small_001.dcm,ct\nMR_small_000.dcm,mr\nunknown.dcm,ct\n")
    ds = load_dataset(DataConfig(dataset="dicom", path=str(tmp_path / "site"), image_size=32,
                                 labels_csv="labels.csv", classes="mr,ct"))
    assert ds.labels.tolist() == [1, 1, 0, -1]  # sorted files; the CSV is not read as data; one file unlabelled


# --- NIfTI -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,extra,slices", [
    ("anatomical.nii", {}, None),                       # 3D, LAS
    ("example4d.nii.gz", {"nifti_volume": 1}, None),    # 4D: second volume
    ("example_nifti2.nii.gz", {"nifti_axis": 1}, None),  # NIfTI-2, coronal
    ("anatomical.nii", {"nifti_min_foreground": 0.0}, 25),
    ("anatomical.nii", {"nifti_min_foreground": 0.0, "nifti_axis": 0}, 33),
])
def test_nibabel_volumes_slice_to_configured_size(name, extra, slices):
    ds = load_dataset(DataConfig(dataset="nifti", path=str(NIBABEL_DATA / name), image_size=24, **extra))
    check_images(ds, slices or len(ds), (1, 24, 24))
    assert len(ds) >= 5


def test_mni152_template_axial_slices_with_range_and_empty_slice_filter(tmp_path):
    from nilearn.datasets import load_mni152_template

    template = load_mni152_template()
    nib.save(template, tmp_path / "mni152.nii.gz")
    path = str(tmp_path / "mni152.nii.gz")
    z = template.shape[2]
    every = load_dataset(DataConfig(dataset="nifti", path=path, image_size=48, nifti_min_foreground=0.0))
    assert len(every) == z and every.image_shape == (1, 48, 48)
    middle = load_dataset(DataConfig(dataset="nifti", path=path, image_size=48, nifti_slices="0.25:0.75"))
    check_images(middle, round(0.75 * z) - round(0.25 * z), (1, 48, 48))
    filtered = load_dataset(DataConfig(dataset="nifti", path=path, image_size=48, nifti_min_foreground=0.1))
    assert 0 < len(filtered) < z
    assert ((filtered.images > -0.9).float().mean(dim=(1, 2, 3)) >= 0.09).all()
    indexed = load_dataset(DataConfig(dataset="nifti", path=path, image_size=48, nifti_slices="10:-10",
                                      nifti_min_foreground=0.0))
    assert len(indexed) == z - 20


def test_nifti_slices_are_reoriented_and_never_transposed(shared_data, tmp_path):
    image = np.load(shared_data / "medmnist" / "breastmnist.npz")["train_images"][0][:20, :].astype(np.float32)
    ras = np.repeat(np.flipud(image).T[:, :, None], 3, axis=2)  # (X=28, Y=20, Z=3): display row 0 = anterior
    nib.save(nib.Nifti1Image(ras, np.eye(4)), tmp_path / "ras.nii.gz")
    lps_affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    nib.save(nib.Nifti1Image(np.ascontiguousarray(ras[::-1, ::-1, :]), lps_affine), tmp_path / "lps.nii.gz")
    expected = (image - image.min()) / (image.max() - image.min()) * 2 - 1
    for name in ("ras.nii.gz", "lps.nii.gz"):
        ds = load_dataset(DataConfig(dataset="nifti", path=str(tmp_path / name), intensity="percentile",
                                     percentile_low=0, percentile_high=100, nifti_min_foreground=0.0))
        assert ds.image_shape == (1, 20, 28)
        for k in range(3):
            np.testing.assert_allclose(ds.images[k, 0].numpy(), expected, atol=1e-5)


def test_nifti_in_hounsfield_units_can_use_the_ct_window(tmp_path):
    hu = np.linspace(-1000, 1000, 16 * 16 * 2, dtype=np.float32).reshape(16, 16, 2)
    nib.save(nib.Nifti1Image(hu, np.eye(4)), tmp_path / "ct.nii.gz")
    ds = load_dataset(DataConfig(dataset="nifti", path=str(tmp_path / "ct.nii.gz"), intensity="window",
                                 ct_window="0,200", nifti_min_foreground=0.0))
    values = ds.images.flatten()
    assert values.min() == -1 and values.max() == 1
    inside = (values > -1) & (values < 1)
    assert 0 < inside.float().mean() < 0.2  # only -100..100 HU of -1000..1000 is inside the window


# --- PNG/JPEG, MedNIST-style folders, MedMNIST --------------------------------------------------------------------

def test_png_pixels_come_through_unchanged_and_untransposed(shared_data, tmp_path):
    from PIL import Image

    image = np.load(shared_data / "medmnist" / "breastmnist.npz")["train_images"][3][:20, :]
    Image.fromarray(image).save(tmp_path / "crop.png")
    ds = load_dataset(DataConfig(dataset="folder", path=str(tmp_path)))
    assert ds.image_shape == (1, 20, 28)
    torch.testing.assert_close(ds.images[0, 0], torch.from_numpy(image).float() / 127.5 - 1)


def test_mednist_style_class_folders_of_jpegs(breastmnist, pneumoniamnist, tmp_path):
    from PIL import Image

    for cls, npz in (("BreastUS", breastmnist), ("ChestXR", pneumoniamnist)):
        for i, image in enumerate(np.load(npz)["train_images"][:6]):
            (tmp_path / cls).mkdir(exist_ok=True)
            Image.fromarray(image).resize((64, 64)).save(tmp_path / cls / f"{i:06d}.jpeg", quality=95)
    ds = load_dataset(DataConfig(dataset="folder", path=str(tmp_path), image_size=32, channels=1))
    check_images(ds, 12, (1, 32, 32))
    assert ds.labels.tolist() == [0] * 6 + [1] * 6
    swapped = load_dataset(DataConfig(dataset="folder", path=str(tmp_path), classes="ChestXR,BreastUS"))
    assert swapped.labels.tolist() == [1] * 6 + [0] * 6


@pytest.mark.parametrize("fixture", ["breastmnist", "pneumoniamnist"])
def test_medmnist_archives_resize_to_configured_size(fixture, request):
    ds = load_dataset(DataConfig(dataset="npz", path=str(request.getfixturevalue(fixture)), split="val",
                                 image_size=64, limit=50))
    check_images(ds, 50, (1, 64, 64))
    assert set(ds.labels.tolist()) == {0, 1}


def test_medmnist_layouts_of_other_subsets_and_sizes(breastmnist, tmp_path):
    real = np.load(breastmnist)["train_images"][:8]
    big = np.asarray(torch.nn.functional.interpolate(torch.from_numpy(real)[:, None].float(), size=(64, 64)))
    rgb = np.repeat(big[:, 0, :, :, None], 3, axis=3).astype(np.uint8)  # PathMNIST-like (N, 64, 64, 3)
    np.savez(tmp_path / "path_64.npz", train_images=rgb, train_labels=np.arange(8)[:, None] % 9)
    multi = (np.arange(8 * 14).reshape(8, 14) % 2).astype(np.uint8)  # ChestMNIST-like multi-label
    np.savez(tmp_path / "chest.npz", train_images=real, train_labels=multi)
    np.savez(tmp_path / "organ3d.npz", train_images=np.zeros((2, 28, 28, 28), np.uint8), train_labels=np.zeros(2))
    rgb_ds = load_dataset(DataConfig(dataset="npz", path=str(tmp_path / "path_64.npz"), image_size=32))
    check_images(rgb_ds, 8, (3, 32, 32))
    assert rgb_ds.labels.tolist() == list(range(8))
    assert (load_dataset(DataConfig(dataset="npz", path=str(tmp_path / "chest.npz"))).labels == -1).all()
    with pytest.raises(DatasetError, match=r"organ3d\.npz.*volumes"):
        load_dataset(DataConfig(dataset="npz", path=str(tmp_path / "organ3d.npz")))


# --- bad input: a clear message naming the file, with a policy ----------------------------------------------------

def bad_folder(tmp_path, case, breastmnist):
    """A site folder with good files and one bad file; returns (folder, format, bad file name, good images)."""
    folder = tmp_path / case
    if case == "truncated-dicom":
        write_planted_dicoms(folder, {"MR_small.dcm": 2})
        data = (folder / "MR_small_001.dcm").read_bytes()
        (folder / "MR_small_001.dcm").write_bytes(data[: len(data) // 2])
        return folder, "dicom", "MR_small_001.dcm", 1
    if case == "non-image-file":
        write_pngs(folder, breastmnist, 3)
        (folder / "notes.txt").write_text("scanner export log\n")
        return folder, "folder", "notes.txt", 3
    if case == "fake-png":
        write_pngs(folder, breastmnist, 3)
        (folder / "scan.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
        return folder, "folder", "scan.png", 3
    if case == "nifti-nan":
        copy_nifti(folder, "anatomical.nii")
        volume = np.ones((8, 8, 4), np.float32)
        volume[2, 3, 1] = np.nan
        nib.save(nib.Nifti1Image(volume, np.eye(4)), folder / "with_nan.nii.gz")
        return folder, "nifti", "with_nan.nii.gz", None
    if case == "mixed-sizes":
        write_pngs(folder, breastmnist, 3)
        from PIL import Image

        Image.fromarray(np.load(breastmnist)["train_images"][5][:20, :20]).save(folder / "odd.png")
        return folder, "folder", "odd.png", 3
    raise AssertionError(case)


CASES = ["truncated-dicom", "non-image-file", "fake-png", "nifti-nan", "mixed-sizes"]


@pytest.mark.parametrize("case", CASES)
def test_bad_file_fails_with_a_message_naming_it(case, tmp_path, breastmnist):
    folder, fmt, bad, _ = bad_folder(tmp_path, case, breastmnist)
    with pytest.raises(DatasetError, match=rf"{bad}: .*data\.on-error=skip") as caught:
        load_dataset(DataConfig(dataset=fmt, path=str(folder), on_error="fail"))
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("case", CASES)
def test_bad_file_is_skipped_and_reported(case, tmp_path, breastmnist, caplog):
    folder, fmt, bad, good = bad_folder(tmp_path, case, breastmnist)
    cfg = DataConfig(dataset=fmt, path=str(folder), on_error="skip")
    with caplog.at_level(logging.WARNING, logger="medfed.datasets.medical"):
        ds = load_dataset(cfg)
    assert good is None or len(ds) == good
    assert ds.images.min() >= -1 and ds.images.max() <= 1
    assert bad in caplog.text and "left out 1 bad file" in caplog.text
    assert [s.file.name for s in read_site_folder(cfg, fmt).skipped] == [bad]


def test_mixed_sizes_load_when_a_size_is_set(tmp_path, breastmnist):
    folder, fmt, _, _ = bad_folder(tmp_path, "mixed-sizes", breastmnist)
    check_images(load_dataset(DataConfig(dataset=fmt, path=str(folder), image_size=28)), 4, (1, 28, 28))


@pytest.mark.parametrize("policy", ["fail", "skip"])
@pytest.mark.parametrize("fmt", ["folder", "dicom", "nifti"])
def test_empty_folder_is_always_an_error(fmt, policy, tmp_path):
    with pytest.raises(DatasetError, match=rf"{tmp_path}: empty folder"):
        load_dataset(DataConfig(dataset=fmt, path=str(tmp_path), on_error=policy))


def test_folder_with_only_bad_files_is_an_error_even_when_skipping(tmp_path):
    (tmp_path / "a.dcm").write_bytes(b"garbage" * 100)
    with pytest.raises(DatasetError, match=r"no usable DICOM image.*a\.dcm: not a DICOM file"):
        load_dataset(DataConfig(dataset="dicom", path=str(tmp_path), on_error="skip"))


def test_new_data_settings_are_validated():
    assert from_flat({"data.ct-window": "lung", "data.nifti-slices": "0.2:0.8"}).data.ct_window == "lung"
    for key, value in [("data.on-error", "ignore"), ("data.intensity", "minmax"), ("data.ct-window", "40,-5"),
                       ("data.nifti-slices", "middle"), ("data.nifti-axis", "3"), ("data.percentile-low", "99.9"),
                       ("data.nifti-min-foreground", "1.5"), ("data.labels", "csv")]:
        with pytest.raises(ConfigError, match=key):
            from_flat({key: value})
    with pytest.raises(ConfigError, match="data.ct-window.*kidney"):
        load_dataset(DataConfig(dataset="dicom", path=str(pydicom_file("CT_small.dcm")), ct_window="kidney"))


# --- caching, sites, inspect, privacy ------------------------------------------------------------------------------

def test_persistent_cache_gives_identical_images_and_holds_no_header_values(tmp_path):
    secrets = write_planted_dicoms(tmp_path / "site", {"CT_small.dcm": 2, "MR_small.dcm": 2})
    cfg = DataConfig(dataset="dicom", path=str(tmp_path / "site"), image_size=32, cache_dir=str(tmp_path / "cache"))
    first, second = load_dataset(cfg), load_dataset(cfg)
    cached = list((tmp_path / "cache").iterdir())
    assert len(cached) == 4
    torch.testing.assert_close(first.images, second.images)
    assert find_leaks(cached, secrets) == []
    torch.testing.assert_close(load_dataset(DataConfig(dataset="dicom", path=cfg.path, image_size=32)).images,
                               first.images)


def test_deployment_and_simulation_sites_load_their_own_format(tmp_path, breastmnist):
    from medfed.federation.policy import simulated_node
    from medfed.federation.site import load_site

    write_pngs(tmp_path / "png", breastmnist, 4)
    secrets = write_planted_dicoms(tmp_path / "dcm", {"MR_small.dcm": 3})
    copy_nifti(tmp_path / "nii", "anatomical.nii")
    cfg = from_flat({"data.image-size": 32, "data.channels": 1, "data.site-paths":
                     f"folder:{tmp_path / 'png'};dicom:{tmp_path / 'dcm'};nifti:{tmp_path / 'nii'}"})
    sizes = []
    for pid in range(3):
        site = load_site(cfg, simulated_node(cfg, pid, 3))
        sizes.append(len(site.data))
        assert site.data.image_shape == (1, 32, 32)
    assert sizes[:2] == [4, 3] and sizes[2] > 5
    site = load_site(cfg, NodeConfig(data_path=str(tmp_path / "dcm"), data_format="dicom", site_name="hospital-b",
                                     state_dir=str(tmp_path / "state"), cap_epsilon=10.0,
                                     policy=SitePolicy(delta=1e-5, dataset_size=3)))
    assert len(site.data) == 3 and site.name == "hospital-b"
    assert not [s for s in secrets if s in site.data.name or s in site.name]


def test_a_bad_site_folder_fails_while_loading_not_while_training(tmp_path):
    from medfed.federation.site import load_site

    write_planted_dicoms(tmp_path / "dcm", {"MR_small.dcm": 2})
    (tmp_path / "dcm" / "MR_small_001.dcm").write_bytes(b"DICM" * 10)
    cfg = RunConfig(data=DataConfig(image_size=32, channels=1))
    node = NodeConfig(data_path=str(tmp_path / "dcm"), data_format="dicom", state_dir=str(tmp_path / "state"),
                      cap_epsilon=10.0, policy=SitePolicy(delta=1e-5, dataset_size=2))
    with pytest.raises(DatasetError, match="MR_small_001.dcm"):
        load_site(cfg, node)
    skipping = from_flat({"data.image-size": 32, "data.channels": 1, "data.on-error": "skip"})
    assert len(load_site(skipping, node).data) == 1


def test_inspect_reports_formats_and_problems_without_header_values(tmp_path, breastmnist):
    from medfed.cli import app

    secrets = write_planted_dicoms(tmp_path / "site" / "dicom", {"CT_small.dcm": 2, "MR_small.dcm": 3})
    shutil.copy(pydicom_file("examples_ybr_color.dcm"), tmp_path / "site" / "dicom" / "us_cine")  # no suffix
    data = (tmp_path / "site" / "dicom" / "MR_small_002.dcm").read_bytes()
    (tmp_path / "site" / "dicom" / "MR_small_002.dcm").write_bytes(data[:1000])
    shutil.copy(pydicom_file("rtdose.dcm"), tmp_path / "site" / "dicom" / "dose.dcm")
    copy_nifti(tmp_path / "site" / "nifti", "example4d.nii.gz")
    volume = np.ones((8, 8, 4), np.float32)
    volume[0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / "site" / "nifti" / "nan.nii.gz")
    write_pngs(tmp_path / "site" / "png", breastmnist, 2)
    shutil.copy(breastmnist, tmp_path / "site" / "breastmnist.npz")
    (tmp_path / "site" / "README.txt").write_text("export notes")

    runner = CliRunner()
    result = runner.invoke(app, ["data", "inspect", str(tmp_path / "site"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    dicom = report["formats"]["dicom"]
    assert dicom["files"] == 5 and dicom["series"] == 3 and dicom["images"] == 4 + 30
    assert dicom["modality"] == {"CT": 2, "MR": 2, "US": 1}
    assert dicom["range"][0] < -800  # Hounsfield units of CT air
    assert report["formats"]["nifti"]["volumes"] == {"128x96x24x2": 1}
    assert report["formats"]["picture"]["files"] == 2 and report["formats"]["picture"]["bit-depth"] == {"8": 2}
    assert report["formats"]["npz"]["images"] == 780
    assert {(u["file"], u["format"]) for u in report["unreadable"]} == {("dicom/MR_small_002.dcm", "dicom"),
                                                                        ("nifti/nan.nii.gz", "nifti")}
    assert "NaN" in next(u["reason"] for u in report["unreadable"] if u["format"] == "nifti")
    assert [n["file"] for n in report["not-images"]] == ["dicom/dose.dcm"]
    assert report["other-files"] == ["README.txt"]
    text = runner.invoke(app, ["data", "inspect", str(tmp_path / "site")])
    assert text.exit_code == 0 and "MR_small_002.dcm" in text.stdout and "series" in text.stdout
    for output in (result.stdout, text.stdout):
        assert [s for s in secrets + list(PLANTED.values()) if s in output] == []
