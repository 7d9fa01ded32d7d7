"""Loading CT series: decoders, slice ordering, and one-line refusals of what cannot be measured."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import phantom as ph
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.uid import JPEG2000Lossless

from node.pipeline.ct import InputError
from node.pipeline.ct_load import load_ct


@pytest.fixture(scope="module")
def small() -> ph.Phantom:
    return ph.make_phantom().crop(k=slice(40, 52))


@pytest.fixture()
def series(small, tmp_path) -> ph.DicomSeries:
    return ph.write_dicom_series(small, tmp_path / "ct", ph.LAYOUTS["shuffled"])


def refusal(folder: Path) -> str:
    with pytest.raises(InputError) as caught:
        load_ct(folder)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_real_jpeg2000_series_decodes_like_gdcm(real_ct):
    ct = load_ct(real_ct)
    assert ct.shape == (20, 512, 512)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(real_ct)))
    image = reader.Execute()
    reference = sitk.GetArrayFromImage(image)
    if image.GetDirection()[8] < 0:  # GDCM stacked head first; the loader stacks along the normal
        reference = reference[::-1]
    assert np.array_equal(ct.hu, reference)
    assert ct.hu.min() == -1024 and ct.spacing[0] == pytest.approx(2.0)
    assert ct.study_uid is None  # this anonymised series carries blank UIDs


def test_slices_are_sorted_by_position_not_by_instance_number(small, series):
    ct = load_ct(series.folder)
    assert np.array_equal(ct.hu, small.hu)
    assert ct.superior_sign == 1
    assert [str(ds.SOPInstanceUID) for ds in ct.datasets] == series.sop_instance_uids


@pytest.mark.parametrize("tool,options,lossless", [
    ("dcmcjpeg", ["+e1"], True),
    ("dcmcjpeg", ["+el"], True),
    ("dcmcjpls", [], True),
    ("dcmcrle", [], True),
    ("dcmcjpeg", ["+ee"], False),
    ("dcmcjpeg", ["+eb"], False),
])
def test_compressed_transfer_syntaxes_decode(tool, options, lossless, small, series, tmp_path):
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} (dcmtk) not installed")
    out = tmp_path / "compressed"
    out.mkdir()
    for path in series.paths:
        subprocess.run([tool, *options, str(path), str(out / path.name)], check=True, capture_output=True)
    ct = load_ct(out)
    if lossless:
        assert np.array_equal(ct.hu, small.hu)
    else:
        assert ct.shape == small.shape and np.median(np.abs(ct.hu.astype(float) - small.hu)) < 60


def test_jpeg2000_written_by_pydicom_decodes_losslessly(small, series, tmp_path):
    out = tmp_path / "j2k"
    out.mkdir()
    for path in series.paths:
        ds = pydicom.dcmread(path)
        ds.compress(JPEG2000Lossless)
        ds.save_as(out / path.name)
    assert np.array_equal(load_ct(out).hu, small.hu)


def test_mixed_series_is_refused(small, series, tmp_path):
    ph.write_dicom_series(small, series.folder / "other", ph.LAYOUTS["axial"])
    assert "mixed series" in refusal(series.folder)


def test_missing_pixel_data_is_refused(series):
    ds = pydicom.dcmread(series.paths[3])
    del ds.PixelData
    ds.save_as(series.paths[3])
    assert "no pixel data" in refusal(series.folder)


def test_a_missing_slice_is_named(series, small):
    series.paths[5].unlink()
    message = refusal(series.folder)
    assert "non-uniform slice spacing" in message and f"{2 * small.spacing[0]:.2f} mm" in message


def test_localizer_is_refused(series):
    ds = pydicom.dcmread(series.paths[0])
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.save_as(series.paths[0])
    assert "localizer" in refusal(series.folder)


def test_non_ct_is_refused(series):
    for path in series.paths:
        ds = pydicom.dcmread(path)
        ds.Modality = "MR"
        ds.save_as(path)
    assert "not a CT series" in refusal(series.folder)


def test_gantry_tilt_is_refused_not_resampled(series):
    for path in series.paths:
        ds = pydicom.dcmread(path)
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + 0.2 * z, z]  # 11° tilt in the sagittal plane
        ds.save_as(path)
    message = refusal(series.folder)
    assert "gantry tilt" in message and "refused" in message


def test_non_axial_series_is_refused(series):
    for path in series.paths:
        ds = pydicom.dcmread(path)
        ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
        ds.save_as(path)
    assert "not an axial series" in refusal(series.folder)


def test_empty_folder_and_missing_path_are_refused(tmp_path):
    assert "no DICOM files" in refusal(tmp_path)
    assert "does not exist" in refusal(tmp_path / "nowhere")


def test_rescale_slope_is_applied(small, tmp_path):
    doubled = ph.write_dicom_series(small, tmp_path / "ct", ph.LAYOUTS["axial"], storage="signed", rescale_slope=0.5)
    ct = load_ct(doubled.folder)
    assert ct.hu.dtype == np.float32 and np.array_equal(ct.hu, small.hu.astype(np.float32))


def test_a_tilt_under_half_a_degree_that_breaks_the_straight_stack_is_refused(tmp_path):
    long = ph.write_dicom_series(ph.make_phantom().crop(k=slice(0, 80)), tmp_path / "ct")
    z0 = float(pydicom.dcmread(long.paths[0]).ImagePositionPatient[2])
    for path in long.paths:
        ds = pydicom.dcmread(path)
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + 0.007 * (z - z0), z]  # 0.4°: 1.4 mm over 200 mm
        ds.save_as(path)
    message = refusal(long.folder)
    assert "gantry tilt of 0.4°" in message and "drift 1.4 mm" in message


@pytest.mark.parametrize("keyword,value", [("ImagePositionPatient", [0.0, 0.0]), ("Rows", None)])
def test_broken_geometry_is_refused_in_one_line(keyword, value, series):
    ds = pydicom.dcmread(series.paths[2])
    if value is None:
        delattr(ds, keyword)
    else:
        setattr(ds, keyword, value)
    ds.save_as(series.paths[2])
    assert f"valid {keyword}" in refusal(series.folder)


def test_truncated_pixel_data_is_refused_as_damaged(series):
    ds = pydicom.dcmread(series.paths[4])
    ds.PixelData = ds.PixelData[:1000]
    ds.save_as(series.paths[4])
    message = refusal(series.folder)
    assert "cannot decode pixel data" in message and "damaged or truncated" in message


def test_an_unwritable_output_folder_is_one_line(phantom_dicom, phantom_masks, tmp_path, capsys):
    from node.cli.main import main

    blocker = tmp_path / "file"
    blocker.write_text("x")
    args = ["measure", str(phantom_dicom("axial").folder), "--seg", str(phantom_masks()), "--out", str(blocker / "out")]
    assert main(args) == 2
    assert capsys.readouterr().err.count("\n") == 1
