"""Bone, liver, spleen, contrast and the muscle fat grade, against the phantom's design.

Two `measure` runs are shared by most tests: the phantom as an unenhanced series ("Thorax nativ")
and as a contrast-enhanced one, both with the liver on and the bone flag at T8 (the phantom's
L1 is cut by the field of view, so an L1 flag could never be assessed on it).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import phantom as ph
import pydicom
import pytest
from pydicom.dataset import Dataset

from node.cli.main import main
from node.config import BiomarkersConfig, ConfigError, MeasureConfig, SegmenterConfig, load_config
from node.labels import LIVER, SPLEEN, VERTEBRA_LABEL, roi_subset
from node.pipeline.bone import VertebraResult, bone_flag
from node.pipeline.contrast import ContrastStatus, contrast_status
from node.pipeline.ct import CTVolume
from node.pipeline.ct_load import load_ct
from node.pipeline.flags import FlagState
from node.pipeline.liver import erode_mm
from node.pipeline.measure import fat_grade, measure
from node.pipeline.model.roi_pipeline import total_step
from node.pipeline.seg_load import PrecomputedSegmenter
from node.pipeline.segment import close_segmenter, make_segmenter
from node.pipeline.segmentation import Segmentation
from node.pipeline.stats import hu_stats
from node.screening import LevelStatus
from node.state.store import SeriesRecord
from node.state.worklist import columns, worklist_row

HU_TOLERANCE = 1.5
CONFIG = """[measure]
bone_flag_level = "T8"
bone_low_hu = 250
[biomarkers]
liver = true
liver_low_hu = 60
"""


@dataclass(frozen=True)
class Run:
    result: dict
    out: Path


def _measure(folder: Path, masks: Path, out: Path, config: Path, *extra: str) -> Run:
    assert main(["measure", str(folder), "--seg", str(masks), "--out", str(out), "--config", str(config), *extra]) == 0
    return Run(json.loads((out / "measurements.json").read_text()), out)


@pytest.fixture(scope="session")
def config_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("biomarkers-config") / "node.toml"
    path.write_text(CONFIG)
    return path


@pytest.fixture(scope="session")
def unenhanced(phantom_dicom, phantom_masks, config_file, tmp_path_factory) -> Run:
    series = phantom_dicom("flipped_feet_first_shuffled", series_description="Thorax nativ 1.0 B31f")
    return _measure(series.folder, phantom_masks(), tmp_path_factory.mktemp("unenhanced"), config_file, "--dicom")


@pytest.fixture(scope="session")
def enhanced(phantom_dicom, phantom_masks, config_file, tmp_path_factory) -> Run:
    series = phantom_dicom("axial", header={"ContrastBolusAgent": "Iomeprol 400", "ContrastBolusRoute": "IV"})
    return _measure(series.folder, phantom_masks("multilabel", "LPS"), tmp_path_factory.mktemp("enhanced"), config_file,
                    "--dicom")


@pytest.fixture(scope="session")
def liver_truth(phantom: ph.Phantom) -> dict:
    return ph.liver_truth(phantom)


def test_bone_is_the_truth_per_level_and_the_flag_holds_at_t8(unenhanced: Run, phantom_bone_truth) -> None:
    assert ph.vertebra_mismatches(unenhanced.result, phantom_bone_truth) == []
    medians = [v["trabecular"]["median_hu"] for v in unenhanced.result["vertebrae"]]
    assert len(set(medians)) == len(medians), "levels must differ so that a mix-up shows"
    assert unenhanced.result["contrast"] == {"enhanced": False, "source": "SeriesDescription",
                                             "detail": "Thorax nativ 1.0 B31f"}
    t8 = next(v for v in phantom_bone_truth if v["level"] == "T8")["trabecular"]["median_hu"]
    assert t8 <= 250
    assert unenhanced.result["bone_flag"] == {"state": "low", "rule": "T8 trabecular median ≤ 250 HU",
                                              "value_hu": t8, "threshold_hu": 250.0, "reason": None}


def test_l1_is_measured_and_partial_where_the_field_of_view_cuts_it(unenhanced: Run) -> None:
    l1 = unenhanced.result["vertebrae"][-1]
    assert l1["level"] == "L1" and l1["status"] == "partial" and l1["trabecular"]["voxels"] > 0
    assert l1["reasons"] == ["vertebra touches the first or last slice"]


def test_liver_is_within_1_5_hu_of_its_parenchyma_and_partial(unenhanced: Run, liver_truth: dict) -> None:
    liver = unenhanced.result["liver"]
    assert liver["status"] == liver_truth["status"] == "partial"
    assert "edge of the field of view" in liver["reasons"][0]
    assert liver["covered_volume_cm3"] == pytest.approx(liver_truth["covered_volume_cm3"], rel=1e-9)
    for key in ("median_hu", "mean_hu"):
        assert abs(liver["parenchyma"][key] - liver_truth["parenchyma"][key]) <= HU_TOLERANCE, key
        assert abs(liver["spleen"]["parenchyma"][key] - liver_truth["spleen"]["parenchyma"][key]) <= HU_TOLERANCE
    assert liver["spleen"]["status"] == "complete"
    assert abs(liver["liver_minus_spleen_hu"] - liver_truth["liver_minus_spleen_hu"]) <= HU_TOLERANCE
    assert liver["flag"]["state"] == "low" and liver["flag"]["threshold_hu"] == 60.0


@pytest.mark.parametrize("design", [{"spacing": (3.0, 0.7, 1.1), "seed": 3}, {"spacing": (1.25, 0.45, 0.45), "seed": 5}])
def test_liver_and_spleen_are_within_1_5_hu_on_other_grids(design: dict) -> None:
    """Erosion in millimetres and the parenchyma window hold on thick slices and on fine pixels alike."""
    other = ph.make_phantom(**design)
    ct = CTVolume(hu=other.hu, spacing=other.spacing, origin=np.array(other.origin), direction=np.eye(3))
    liver = measure(ct, Segmentation(other.labels, other.body == ph.BODY), MeasureConfig(), BiomarkersConfig(liver=True)).liver
    truth = ph.liver_truth(other)
    for got, want in ((liver, truth), (liver.spleen, truth["spleen"])):
        assert got.status == want["status"]
        assert got.covered_volume_cm3 == pytest.approx(want["covered_volume_cm3"], rel=1e-9)
        assert abs(got.parenchyma.median_hu - want["parenchyma"]["median_hu"]) <= HU_TOLERANCE
        assert abs(got.parenchyma.mean_hu - want["parenchyma"]["mean_hu"]) <= HU_TOLERANCE


def test_the_parenchyma_rule_is_what_brings_the_liver_within_tolerance(phantom: ph.Phantom, liver_truth: dict) -> None:
    """A plain median of the liver mask misses the truth: the phantom's vessels and rim are real traps."""
    plain = float(np.median(phantom.hu[phantom.labels == LIVER]))
    assert abs(plain - liver_truth["parenchyma"]["median_hu"]) > HU_TOLERANCE


def test_with_contrast_in_the_header_values_are_reported_and_no_flag_is_raised(enhanced: Run, unenhanced: Run,
                                                                              phantom_bone_truth) -> None:
    result = enhanced.result
    assert result["contrast"] == {"enhanced": True, "source": "ContrastBolusAgent", "detail": "Iomeprol 400 (IV)"}
    for flag in (result["bone_flag"], result["liver"]["flag"]):
        assert flag["state"] == "not_assessed" and "contrast-enhanced" in flag["reason"]
        assert flag["value_hu"] is not None
    assert ph.vertebra_mismatches(result, phantom_bone_truth) == []
    parenchyma, same = result["liver"]["parenchyma"], unenhanced.result["liver"]["parenchyma"]
    assert (parenchyma["voxels"], parenchyma["median_hu"]) == (same["voxels"], same["median_hu"])


def test_without_contrast_evidence_flags_are_not_assessed(phantom_dicom, phantom_masks, tmp_path) -> None:
    config = tmp_path / "node.toml"
    config.write_text('[measure]\nbone_flag_level = "T8"\n')
    result = _measure(phantom_dicom("axial").folder, phantom_masks(), tmp_path / "out", config).result
    assert result["contrast"]["enhanced"] is None
    assert result["bone_flag"]["state"] == "not_assessed" and "unknown" in result["bone_flag"]["reason"]
    assert result["liver"] is None, "the liver is off by default"


def test_csv_has_bone_columns_t11_to_l1_and_the_organs(unenhanced: Run, phantom_bone_truth) -> None:
    with (unenhanced.out / "measurements.csv").open() as handle:
        rows = {row["level"]: row for row in csv.DictReader(handle)}
    assert list(rows) == [f"T{n}" for n in range(1, 11)] + ["T1-T10", "T11", "T12", "L1", "liver", "spleen"]
    for truth in phantom_bone_truth:
        assert float(rows[truth["level"]]["bone_median_hu"]) == truth["trabecular"]["median_hu"]
        assert rows[truth["level"]]["bone_status"] == truth["status"]
    assert rows["T1-T10"]["bone_median_hu"] == "" and rows["T11"]["median_hu"] == ""
    liver = unenhanced.result["liver"]
    assert float(rows["liver"]["median_hu"]) == liver["parenchyma"]["median_hu"] and rows["liver"]["status"] == "partial"
    assert float(rows["spleen"]["median_hu"]) == liver["spleen"]["parenchyma"]["median_hu"]


def test_fat_grade_sits_beside_the_fat_fraction(unenhanced: Run, phantom_truth: dict) -> None:
    def grade(fraction: float) -> str:
        return "normal" if fraction < 0.10 else "moderate" if fraction <= 0.50 else "severe"

    found = set()
    for got, want in zip(unenhanced.result["levels"], phantom_truth["levels"]):
        for side in ("left", "right", "combined"):
            assert got[side]["fat_grade"] == grade(want[side]["fat_fraction"])
            found.add(got[side]["fat_grade"])
    assert found == {"normal", "moderate"}
    assert [fat_grade(f) for f in (None, 0.0999, 0.10, 0.50, 0.5001)] == [None, "normal", "moderate", "moderate", "severe"]


def test_worklist_rows_carry_bone_contrast_and_liver(unenhanced: Run, phantom_bone_truth) -> None:
    series = SeriesRecord("1.2", "1.1", "PID", "ACC", "20240102", "CT", "Thorax nativ", 124, "f", "/x")
    row = worklist_row(series, 7, unenhanced.result, 10.0)
    assert set(row) == set(columns())
    assert [row[f"{v['level']}_bone_hu"] for v in phantom_bone_truth] == [v["trabecular"]["median_hu"] for v in phantom_bone_truth]
    liver = unenhanced.result["liver"]
    assert (row["contrast"], row["bone_flag_level"], row["bone_flag"]) == ("unenhanced", "T8", "low")
    assert (row["liver_status"], row["liver_median_hu"], row["liver_flag"]) == ("partial", liver["parenchyma"]["median_hu"], "low")
    old = worklist_row(series, 7, {"levels": [], "total": {}}, 10.0)
    assert old["bone_flag"] is None and old["contrast"] is None and old["L1_bone_hu"] is None


def _sr_groups(path: Path) -> dict[str, dict]:
    """Each SR measurement group by tracking identifier: its numbers, codes and evaluations by concept meaning."""
    groups = {}
    for container in pydicom.dcmread(path).ContentSequence:
        for group in getattr(container, "ContentSequence", []):
            items: dict[str, list] = {}
            for item in getattr(group, "ContentSequence", []):
                name = item.ConceptNameCodeSequence[0].CodeMeaning
                if item.ValueType == "NUM":
                    derivation = [m.ConceptCodeSequence[0].CodeMeaning for m in getattr(item, "ContentSequence", [])]
                    items.setdefault(" ".join([name, *derivation]), []).append(float(item.MeasuredValueSequence[0].NumericValue))
                elif item.ValueType == "CODE":
                    items.setdefault(name, []).append(item.ConceptCodeSequence[0].CodeMeaning)
                elif item.ValueType == "TEXT":
                    items.setdefault(name, []).append(item.TextValue)
            if "Tracking Identifier" in items:
                groups[items["Tracking Identifier"][0]] = items
    return groups


def test_sr_has_a_rated_group_per_vertebra_and_for_liver_and_spleen(unenhanced: Run, phantom_bone_truth) -> None:
    groups = _sr_groups(unenhanced.out / "sr.dcm")
    for truth in phantom_bone_truth:
        group = groups[f"{truth['level']} vertebral body trabecular bone"]
        assert group["Finding"] == ["Vertebral body"] and group["Finding Site"] == [f"{truth['level']} vertebra"]
        assert group["Attenuation Coefficient Median"] == [truth["trabecular"]["median_hu"]]
        assert group["Analysis Quality Rating"] == [truth["status"].capitalize()]
    assert groups["T8 vertebral body trabecular bone"]["Screening flag"] == ["Low attenuation"]
    assert "Screening flag" not in groups["T7 vertebral body trabecular bone"]
    liver, spleen = groups["liver parenchyma"], groups["spleen parenchyma"]
    result = unenhanced.result["liver"]
    assert liver["Finding Site"] == ["Liver"] and liver["Analysis Quality Rating"] == ["Partial"]
    assert liver["Attenuation Coefficient Median"] == [result["parenchyma"]["median_hu"]]
    assert liver["Liver minus spleen attenuation"] == [result["liver_minus_spleen_hu"]]
    assert liver["Screening flag"] == ["Low attenuation"]
    assert spleen["Finding Site"] == ["Spleen"] and spleen["Analysis Quality Rating"] == ["Complete"]


def test_seg_holds_each_trabecular_mask_and_the_parenchyma_the_sr_measured(unenhanced: Run) -> None:
    seg = pydicom.dcmread(unenhanced.out / "seg.dcm")
    assert seg.SegmentsOverlap == "YES"
    numbers = {str(item.SegmentLabel): int(item.SegmentNumber) for item in seg.SegmentSequence}
    assert sorted(numbers.values()) == list(range(1, len(numbers) + 1))
    frame_segment = [int(f.SegmentIdentificationSequence[0].ReferencedSegmentNumber) for f in seg.PerFrameFunctionalGroupsSequence]
    per_frame = seg.pixel_array.reshape(len(frame_segment), -1).sum(axis=1)
    voxels = {number: 0 for number in numbers.values()}
    for number, count in zip(frame_segment, per_frame):
        voxels[number] += int(count)
    result = unenhanced.result
    for vertebra in result["vertebrae"]:
        assert voxels[numbers[f"{vertebra['level']} vertebral body trabecular bone"]] == vertebra["trabecular"]["voxels"]
    assert voxels[numbers["liver parenchyma"]] == result["liver"]["parenchyma"]["voxels"]
    assert voxels[numbers["spleen parenchyma"]] == result["liver"]["spleen"]["parenchyma"]["voxels"]
    sr = pydicom.dcmread(unenhanced.out / "sr.dcm")
    referenced = {}
    for group in sr.ContentSequence[-1].ContentSequence:
        items = {i.ConceptNameCodeSequence[0].CodeMeaning: i for i in group.ContentSequence}
        if "Referenced Segment" in items:
            segment = items["Referenced Segment"].ReferencedSOPSequence[0].ReferencedSegmentNumber
            referenced[items["Tracking Identifier"].TextValue] = int(segment)
    assert {label: referenced.get(label) for label in numbers if "trabecular" in label or "parenchyma" in label} == {
        label: number for label, number in numbers.items() if "trabecular" in label or "parenchyma" in label}


def _red_text_pixels(path: Path) -> int:
    """Pure red is only the colour of a raised flag's line on the key image (the level colours are not)."""
    pixels = pydicom.dcmread(path).pixel_array.astype(int)
    return int(((pixels[..., 0] > 250) & (pixels[..., 1] < 10) & (pixels[..., 2] < 10)).sum())


def test_key_image_shows_the_raised_bone_and_liver_flags_only_when_assessed(unenhanced: Run, enhanced: Run) -> None:
    assert unenhanced.result["bone_flag"]["state"] == unenhanced.result["liver"]["flag"]["state"] == "low"
    assert unenhanced.result["total"]["combined"]["median_hu"] >= 10, "the muscle flag is not raised"
    assert _red_text_pixels(unenhanced.out / "keyimage.dcm") > 100
    assert _red_text_pixels(enhanced.out / "keyimage.dcm") == 0


def test_precomputed_backend_reads_l1_liver_and_spleen(phantom: ph.Phantom, phantom_dicom, tmp_path) -> None:
    series = phantom_dicom("axial")
    ph.write_masks(phantom, tmp_path / series.series_uid)
    seg = PrecomputedSegmenter(SegmenterConfig(backend="precomputed", precomputed_dir=tmp_path)).segment(load_ct(series.folder))
    for label in (VERTEBRA_LABEL["L1"], LIVER, SPLEEN):
        assert (phantom.labels == label).any()
        assert np.array_equal(seg.labels == label, phantom.labels == label), label


def test_the_liver_option_adds_part_291_to_what_the_segmenters_run(tmp_path: Path) -> None:
    assert [model.task_id for model in total_step(False, roi_subset(False)).models] == [292, 294]
    assert [model.task_id for model in total_step(False, roi_subset(True)).models] == [291, 292, 294]
    assert {"vertebrae_L1", "liver", "spleen"} <= set(roi_subset(True)) and "liver" not in roi_subset(False)
    for engine in ("resident", "totalsegmentator"):
        segmenter = make_segmenter(SegmenterConfig(weights_dir=tmp_path, engine=engine), roi_subset(True))
        try:
            assert segmenter.roi_subset == roi_subset(True)
        finally:
            close_segmenter(segmenter)


def test_erosion_is_in_millimetres_per_axis_and_spares_the_field_of_view_edge() -> None:
    mask = np.zeros((20, 40, 40), bool)
    mask[4:16, 5:35, 5:35] = True
    eroded = erode_mm(mask, (2.5, 0.9, 0.9), 5.0)
    ks, rs, cs = (np.flatnonzero(eroded.any(axis=axes)) for axes in ((1, 2), (0, 2), (0, 1)))
    assert (ks[0], ks[-1]) == (6, 13), "2 slices of 2.5 mm off each end"
    assert (rs[0], rs[-1], cs[0], cs[-1]) == (10, 29, 10, 29), "5 voxels of 0.9 mm off each side"
    cut = erode_mm(mask[4:], (2.5, 0.9, 0.9), 5.0, open_faces=((False, True), (True, True), (True, True)))
    assert cut[0].any(), "the first slice is the field of view's edge, not the organ's"


@pytest.mark.parametrize(("attributes", "enhanced", "source"), [
    ({"ContrastBolusAgent": "OMNIPAQUE 350"}, True, "ContrastBolusAgent"),
    ({"ContrastBolusAgent": "NONE"}, False, "ContrastBolusAgent"),
    ({"ContrastBolusAgent": "Barium", "ContrastBolusRoute": "ORAL"}, False, "ContrastBolusRoute"),
    ({"ContrastBolusAgent": "", "SeriesDescription": "Thorax C+ 1.0"}, True, "SeriesDescription"),
    ({"ImageType": ["DERIVED", "PRIMARY", "AXIAL", "MAT_REMOVED"]}, True, "ImageType"),
    ({"SeriesDescription": "Chest non-contrast"}, False, "SeriesDescription"),
    ({"SeriesDescription": "LDCT lung screening"}, False, "SeriesDescription"),
    ({"SeriesDescription": "Thorax 1.0 B60f"}, None, "none"),
])
def test_contrast_rules(attributes: dict, enhanced: bool | None, source: str) -> None:
    header = Dataset()
    for keyword, value in attributes.items():
        setattr(header, keyword, value)
    found = contrast_status(header, MeasureConfig())
    assert (found.enhanced, found.source) == (enhanced, source)


def test_assume_unenhanced_is_a_site_choice_and_nifti_has_no_header() -> None:
    assert contrast_status(Dataset(), MeasureConfig(assume_unenhanced=True)).source == "configuration"
    assert contrast_status(None, MeasureConfig()).enhanced is None


def _vertebra(level: str, median: float, status: LevelStatus = LevelStatus.COMPLETE, mask: str = "vertebral_body") -> VertebraResult:
    return VertebraResult(level, status, [] if status is LevelStatus.COMPLETE else ["cut"], mask,
                          hu_stats(np.array([median]), 1.0))


def test_bone_flag_is_inclusive_and_needs_a_complete_body_mask_on_unenhanced_ct() -> None:
    unenhanced = ContrastStatus(False, "SeriesDescription", "nativ")
    params = MeasureConfig(bone_flag_level="L1", bone_low_hu=110.0)
    assert bone_flag([_vertebra("L1", 110.0)], params, unenhanced).state is FlagState.LOW
    assert bone_flag([_vertebra("L1", 110.5)], params, unenhanced).state is FlagState.NOT_LOW
    partial = bone_flag([_vertebra("L1", 90.0, LevelStatus.PARTIAL)], params, unenhanced)
    assert partial.state is FlagState.NOT_ASSESSED and partial.reason == "L1 is partial (cut)"
    whole = bone_flag([_vertebra("L1", 90.0, mask="whole_vertebra")], params, unenhanced)
    assert whole.state is FlagState.NOT_ASSESSED and "whole-vertebra" in whole.reason


def test_biomarker_options_are_checked(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    for text in ('[measure]\nbone_flag_level = "L6"\n', "[biomarkers]\nwindow_mad = 0\n",
                 '[measure]\ncontrast_description_enhanced = "("\n'):
        config.write_text(text)
        with pytest.raises(ConfigError):
            load_config(config, environ={})
    assert BiomarkersConfig().liver is False
