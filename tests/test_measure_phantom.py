"""`paraspinal-node measure` against the phantom's truth: voxel-exact in every geometry."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import phantom as ph
import pytest

from node.cli.main import main


def measure_json(ct: Path, seg: Path, out: Path) -> dict:
    assert main(["measure", str(ct), "--seg", str(seg), "--out", str(out)]) == 0
    return json.loads((out / "measurements.json").read_text())


def expected_for(truth: dict, layout: ph.DicomLayout, n_slices: int) -> dict:
    """Slices are loaded along the slice normal, so a normal pointing down reverses k."""
    return truth if layout.normal_z > 0 else ph.mirror_slabs(truth, n_slices)


@pytest.mark.parametrize("layout", sorted(ph.LAYOUTS))
def test_every_dicom_geometry_gives_the_truth(layout, phantom, phantom_truth, phantom_bone_truth, phantom_dicom,
                                             phantom_masks, tmp_path):
    series = phantom_dicom(layout)
    result = measure_json(series.folder, phantom_masks("folder", "RAS"), tmp_path)
    expected = expected_for(phantom_truth, ph.LAYOUTS[layout], phantom.shape[0])
    assert ph.mismatches(result, expected) == []
    assert ph.vertebra_mismatches(result, phantom_bone_truth) == []
    assert result["source"]["series_instance_uid"] == series.series_uid
    assert result["method"]["vertebral_body_source"] == "vertebrae_body"


@pytest.mark.parametrize("orientation", ["RAS", "LPS", "PIR"])
def test_multilabel_masks_in_any_orientation_give_the_truth(orientation, phantom_truth, phantom_bone_truth, phantom_dicom,
                                                           phantom_masks, tmp_path):
    result = measure_json(phantom_dicom("axial").folder, phantom_masks("multilabel", orientation), tmp_path)
    assert ph.mismatches(result, phantom_truth) == []
    assert ph.vertebra_mismatches(result, phantom_bone_truth) == []


def test_signed_storage_and_nifti_ct_give_the_truth(phantom, phantom_truth, phantom_dicom, phantom_masks, tmp_path):
    signed = measure_json(phantom_dicom("axial", storage="signed").folder, phantom_masks(), tmp_path / "signed")
    assert ph.mismatches(signed, phantom_truth) == []
    nifti = ph.write_nifti_ct(phantom, tmp_path / "ct.nii.gz", orientation="LAS")
    from_nifti = measure_json(nifti, phantom_masks("multilabel", "RAS"), tmp_path / "nifti")
    assert ph.mismatches(from_nifti, phantom_truth, rel=1e-5, slabs=False) == []
    assert ph.vertebra_mismatches(from_nifti, ph.bone_truth(phantom), rel=1e-5) == []


def test_anisotropic_spacing_gives_the_truth(tmp_path):
    odd = ph.make_phantom(spacing=(3.0, 0.7, 1.1), seed=3)
    series = ph.write_dicom_series(odd, tmp_path / "ct", ph.LAYOUTS["transposed"])
    masks = ph.write_masks(odd, tmp_path / "masks", "folder", "LPS")
    result = measure_json(series.folder, masks, tmp_path / "out")
    assert ph.mismatches(result, ph.mirror_slabs(ph.truth(odd), odd.shape[0])) == []
    assert ph.vertebra_mismatches(result, ph.bone_truth(odd)) == []


def test_field_of_view_through_t1_is_partial_with_numbers(truncated_phantom, tmp_path):
    series = ph.write_dicom_series(truncated_phantom, tmp_path / "ct", ph.LAYOUTS["flipped_feet_first_shuffled"])
    masks = ph.write_masks(truncated_phantom, tmp_path / "masks")
    result = measure_json(series.folder, masks, tmp_path / "out")
    expected = ph.truth(truncated_phantom)
    assert ph.mismatches(result, expected) == []
    assert ph.vertebra_mismatches(result, ph.bone_truth(truncated_phantom)) == []
    t1 = result["levels"][0]
    assert t1["status"] == "partial" and t1["combined"]["voxels"] > 0
    assert [lv["status"] for lv in result["levels"][1:]] == ["complete"] * 9


def test_without_vertebrae_body_the_whole_vertebra_is_used(phantom, phantom_dicom, phantom_masks, tmp_path):
    masks = phantom_masks("folder", "RAS", include_body=False)
    result = measure_json(phantom_dicom("axial").folder, masks, tmp_path)
    assert result["method"]["vertebral_body_source"] == "whole_vertebra"
    assert ph.mismatches(result, ph.truth(phantom, body_source="whole_vertebra")) == []
    assert ph.vertebra_mismatches(result, ph.bone_truth(phantom, body_source="whole_vertebra")) == []
    assert "slab_overlap" in {f["code"] for f in result["qc"]}


def test_csv_has_a_row_per_level_and_the_total(phantom_truth, phantom_dicom, phantom_masks, tmp_path):
    measure_json(phantom_dicom("axial").folder, phantom_masks(), tmp_path)
    lines = (tmp_path / "measurements.csv").read_text().splitlines()
    header = lines[0].split(",")
    assert header[:6] == ["level", "status", "voxels", "volume_cm3", "median_hu", "mean_hu"]
    rows = [line.split(",") for line in lines[1:]]
    assert [row[0] for row in rows] == [f"T{n}" for n in range(1, 11)] + ["T1-T10", "T11", "T12", "L1"]
    assert float(rows[10][header.index("median_hu")]) == phantom_truth["total"]["combined"]["median_hu"]


def test_refusal_is_one_line_and_a_nonzero_exit(tmp_path):
    (tmp_path / "notes.txt").write_text("not dicom")
    done = subprocess.run(
        [sys.executable, "-m", "node.cli.main", "measure", str(tmp_path), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode != 0
    assert done.stderr.strip().count("\n") == 0 and "no DICOM files" in done.stderr
    assert not (tmp_path / "out" / "measurements.json").exists()


def test_masks_on_another_grid_are_resampled_by_position(phantom, phantom_dicom, phantom_masks, tmp_path):
    import SimpleITK as sitk

    from node.pipeline.ct_load import load_ct
    from node.pipeline.seg_load import load_segmentation

    fine = sitk.ReadImage(str(phantom_masks("multilabel", "RAS")))
    coarse = sitk.Resample(fine, [n // 2 for n in fine.GetSize()], sitk.Transform(), sitk.sitkNearestNeighbor,
                           fine.GetOrigin(), [s * 2 for s in fine.GetSpacing()], fine.GetDirection())
    sitk.WriteImage(coarse, str(tmp_path / "coarse.nii.gz"))
    labels = load_segmentation(tmp_path / "coarse.nii.gz", load_ct(phantom_dicom("axial").folder)).labels
    assert labels.shape == phantom.shape
    assert np.mean(labels == phantom.labels) > 0.97


def test_masks_of_another_field_of_view_are_refused(phantom, phantom_dicom, tmp_path):
    other = ph.write_masks(phantom.crop(k=slice(0, 60)), tmp_path / "masks")
    assert main(["measure", str(phantom_dicom("axial").folder), "--seg", str(other), "--out", str(tmp_path / "out")]) == 2


def test_dicom_flag_writes_the_three_result_objects_in_the_source_study(phantom_dicom, phantom_masks, tmp_path):
    import pydicom

    series = phantom_dicom("rotated")
    args = ["measure", str(series.folder), "--seg", str(phantom_masks()), "--out", str(tmp_path), "--dicom"]
    assert main(args) == 0
    objects = {name: pydicom.dcmread(tmp_path / f"{name}.dcm") for name in ("seg", "sr", "keyimage")}
    assert {ds.Modality for ds in objects.values()} == {"SEG", "SR", "OT"}
    assert {ds.StudyInstanceUID for ds in objects.values()} == {series.study_uid}
    assert len({ds.SeriesInstanceUID for ds in objects.values()} | {series.series_uid}) == 4


def test_dicom_results_of_a_series_with_blank_uids_are_refused_in_one_line(tmp_path, capsys, real_ct):
    import SimpleITK as sitk

    from node.pipeline.ct_load import load_ct

    real = real_ct
    ct = load_ct(real)
    sitk.WriteImage(ct.to_sitk(np.zeros(ct.shape, np.uint8)), str(tmp_path / "seg.nii.gz"))
    assert main(["measure", str(real), "--seg", str(tmp_path / "seg.nii.gz"), "--out", str(tmp_path / "out"), "--dicom"]) == 2
    error = capsys.readouterr().err.strip()
    assert "blank StudyInstanceUID" in error and "\n" not in error
    result = json.loads((tmp_path / "out" / "measurements.json").read_text())
    assert {lv["status"] for lv in result["levels"]} == {"absent"}


def test_results_section_of_the_config_reaches_the_objects(phantom_dicom, phantom_masks, tmp_path):
    import pydicom
    from pydicom.uid import JPEG2000Lossless

    config = tmp_path / "node.toml"
    config.write_text('[results]\nsr_series_number = 42\nseg_series_description = "Rückenmuskel"\njpeg2000 = true\n',
                      encoding="utf-8")
    out = tmp_path / "out"
    args = ["measure", str(phantom_dicom("axial").folder), "--seg", str(phantom_masks()), "--out", str(out),
            "--dicom", "--config", str(config)]
    assert main(args) == 0
    seg, sr = pydicom.dcmread(out / "seg.dcm"), pydicom.dcmread(out / "sr.dcm")
    assert sr.SeriesNumber == 42
    assert seg.SeriesDescription == "Rückenmuskel" and seg.file_meta.TransferSyntaxUID == JPEG2000Lossless


def test_dicom_results_of_nifti_input_are_refused_after_the_reports(phantom, phantom_masks, tmp_path, capsys):
    nifti = ph.write_nifti_ct(phantom, tmp_path / "ct.nii.gz")
    args = ["measure", str(nifti), "--seg", str(phantom_masks("multilabel")), "--out", str(tmp_path / "out"), "--dicom"]
    assert main(args) == 2
    assert "give a DICOM folder" in capsys.readouterr().err
    assert (tmp_path / "out" / "measurements.json").exists()
