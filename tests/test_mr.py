"""Lumbar MR: Dixon pairing, fat per level and side against the phantom's exact truth, bad cases, and the outputs
read by code (dcmqi, highdicom, dciodvfy, dcentvfy)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import highdicom as hd
import mr_phantom as mp
import numpy as np
import pydicom
import pytest
from test_readers import DCENTVFY, DCIODVFY, TID1500READER, complaints, dcmqi_masks, dicom3tool, needs_dcmqi

from dicom_sr import codes
from node.config import Config
from node.ingest.dixon import DixonRole, dixon_role
from node.labels import AUTOCHTHON_LEFT, AUTOCHTHON_RIGHT, LUMBAR, VERTEBRA_LABEL
from node.pipeline.mr_load import load_mr
from node.run import PipelineResult, run_pipeline

SIDES = ("left", "right", "combined")
SIDE_LABEL = {"left": AUTOCHTHON_LEFT, "right": AUTOCHTHON_RIGHT}


@pytest.fixture(scope="module")
def mr() -> mp.MRPhantom:
    return mp.make_mr_phantom()


@pytest.fixture(scope="module")
def masks(mr: mp.MRPhantom, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return mp.write_masks(mr, tmp_path_factory.mktemp("mr-masks"))


def measured(study: Path, masks: Path, out: Path, dicom: bool = False) -> tuple[dict, PipelineResult]:
    result = run_pipeline(study, out, Config(), seg_path=masks, dicom=dicom)
    return json.loads((out / "measurements.json").read_text()), result


def qc_codes(data: dict) -> set[str]:
    return {item["code"] for item in data["qc"]}


@pytest.mark.parametrize(("image_type", "description", "role"), [
    (["DERIVED", "PRIMARY", "DIXON", "WATER"], "t1_vibe_dixon_tra_W", DixonRole.WATER),
    (["ORIGINAL", "PRIMARY", "F", "F"], "mDIXON F", DixonRole.FAT),
    (["DERIVED", "PRIMARY", "DIXON", "OutPhase"], "", DixonRole.OUT_PHASE),
    (["ORIGINAL", "PRIMARY", "M", "ND"], "t1_vibe_dixon_tra_opp", DixonRole.OUT_PHASE),
    ([], "FAT: Ax LAVA-Flex", DixonRole.FAT),
    (["ORIGINAL", "PRIMARY", "M", "ND"], "T2 TSE fat sat", DixonRole.NONE),
    (["ORIGINAL", "PRIMARY", "F"], "t2_tse", DixonRole.FAT),
    (["F", "W"], "t2_tse", DixonRole.NONE),  # W and F count only after ORIGINAL/DERIVED and PRIMARY
])
def test_dixon_role_from_image_type_then_description(image_type, description, role) -> None:
    assert dixon_role(image_type, description) is role


@pytest.mark.parametrize("vendor", mp.VENDORS)
def test_each_vendors_dixon_study_is_paired_and_measured_voxel_exact(vendor, mr, masks, tmp_path) -> None:
    study = mp.write_study(mr, tmp_path / "study", vendor, mixed=vendor == "ge")
    data, _ = measured(tmp_path / "study", masks, tmp_path / "out")
    assert data["source"]["series_instance_uid"] == study.uids["water"]
    assert data["source"]["fat_series_instance_uid"] == study.uids["fat"]
    want = mp.truth(mr)
    assert [level["level"] for level in data["levels"]] == list(LUMBAR)
    for level in data["levels"]:
        expected = want["levels"][level["level"]]
        assert level["status"] == "complete"
        assert [level["slab"]["first_slice"], level["slab"]["last_slice"]] == expected["slab"]
        for side in SIDES:
            for key, value in expected[side].items():
                assert level[side][key] == pytest.approx(value, rel=1e-12, abs=1e-12), (level["level"], side, key)
    for side in SIDES:
        for key, value in want["lumbar_total"][side].items():
            assert data["lumbar_total"][side][key] == pytest.approx(value, rel=1e-12, abs=1e-12), (side, key)
    assert qc_codes(data) == set()
    assert data["fat"]["dixon"] and data["fat"]["grade_metric"] == "fat_area_fraction"
    assert "not a proton-density fat fraction" in data["fat"]["caveat"]


def test_grade_is_right_at_every_bound_and_the_fat_signal_fraction_within_half_a_point(mr, masks, tmp_path) -> None:
    mp.write_study(mr, tmp_path / "study")
    data, _ = measured(tmp_path / "study", masks, tmp_path / "out")
    lean = [0.04, 0.16]  # designed voxel fractions: lean muscle, then fat streaks
    fat = [0.62, 0.95]
    for level in data["levels"]:
        for side in ("left", "right"):
            share = mp.DESIGN[level["level"]][side]
            stats = level[side]
            assert stats["fat_area_fraction"] == share
            assert stats["fat_grade"] == mp.GRADE[share], (level["level"], side, share)
            low = (1 - share) * lean[0] + share * fat[0]
            high = (1 - share) * lean[1] + share * fat[1]
            assert low - 0.005 <= stats["fat_signal_fraction"] <= high + 0.005
    csv = (tmp_path / "out" / "measurements.csv").read_text().splitlines()
    assert csv[0].startswith("level,status,voxels,volume_cm3,area_cm2,fat_signal_fraction")
    assert [row.split(",")[0] for row in csv[1:]] == [*LUMBAR, "L1-L5"]


def test_a_water_series_in_the_spool_finds_its_fat_partner_beside_it(mr, masks, tmp_path) -> None:
    study = mp.write_study(mr, tmp_path / "study", "philips")
    images = load_mr(study.series["water"])
    assert images.fat_series_uid == study.uids["fat"] and not images.notes
    assert np.array_equal(images.fat, mr.fat)


def test_swapped_fat_and_water_are_flagged(mr, masks, tmp_path) -> None:
    mp.write_study(mr, tmp_path / "study", swapped=True)
    data, _ = measured(tmp_path / "study", masks, tmp_path / "out")
    assert "fat_water_swap" in qc_codes(data)


def test_a_fat_series_on_another_grid_is_not_used(mr, masks, tmp_path) -> None:
    mp.write_study(mr, tmp_path / "study", shift_fat=True)
    data, _ = measured(tmp_path / "study", masks, tmp_path / "out")
    assert "dixon_geometry_mismatch" in qc_codes(data)
    assert data["fat"]["not_assessed_reason"].startswith("not assessed: no Dixon")
    level = data["levels"][0]
    assert level["combined"]["fat_signal_fraction"] is None and level["combined"]["fat_grade"] is None
    assert level["combined"]["voxels"] == mp.truth(mr)["levels"]["L1"]["combined"]["voxels"]


def test_a_missing_partner_and_a_t2_without_dixon_get_volume_and_area_only(mr, masks, tmp_path) -> None:
    mp.write_study(mr, tmp_path / "water-only", images=("water",))
    data, _ = measured(tmp_path / "water-only", masks, tmp_path / "out1")
    assert "dixon_partner_missing" in qc_codes(data)
    mp.write_study(mr, tmp_path / "t2", images=("t2",))
    data, result = measured(tmp_path / "t2", masks, tmp_path / "out2", dicom=True)
    want = mp.truth(mr)["levels"]["L3"]["left"]
    level = data["levels"][2]
    assert (level["left"]["voxels"], level["left"]["area_cm2"]) == (want["voxels"], pytest.approx(want["area_cm2"]))
    assert level["left"]["fat_grade"] is None and data["fat"]["not_assessed_reason"].startswith("not assessed: no Dixon")
    evaluations = [group for group in hd.sr.srread(result.files["sr"]).content.get_image_measurement_groups(
        finding_type=codes.DEEP_MUSCLE_OF_BACK)][0].get_qualitative_evaluations()
    assert codes.NOT_ASSESSED_NO_DIXON.value in {e.value.value for e in evaluations}


def test_a_sixth_lumbar_vertebra_is_flagged(tmp_path) -> None:
    sixth = mp.make_mr_phantom(sixth_lumbar=True)
    mp.write_study(sixth, tmp_path / "study", images=("water", "fat"))
    data, _ = measured(tmp_path / "study", mp.write_masks(sixth, tmp_path / "masks"), tmp_path / "out")
    assert "lumbosacral_transitional" in qc_codes(data)
    assert all(level["status"] == "complete" for level in data["levels"])


# ------------------------------------------------------------------ outputs read by code


@pytest.fixture(scope="module")
def outputs(mr, masks, tmp_path_factory) -> tuple[mp.MRStudy, PipelineResult]:
    folder = tmp_path_factory.mktemp("mr-outputs")
    study = mp.write_study(mr, folder / "study", "siemens", images=("water", "fat"))
    _, result = measured(folder / "study", masks, folder / "out", dicom=True)
    return study, result


@needs_dcmqi
def test_dcmqi_reads_every_level_and_side_voxel_exact(outputs, mr, tmp_path) -> None:
    study, result = outputs
    got = dcmqi_masks(result.files["seg"], tmp_path / "dcmqi", load_mr(study.series["water"]).image)
    for level in LUMBAR:
        on_slab = np.zeros(mr.shape[0], bool)
        on_slab[mr.slabs[level].start : mr.slabs[level].stop] = True
        for side in ("left", "right"):
            assert np.array_equal(got[("muscle", level, side)], on_slab[:, None, None] & (mr.labels == SIDE_LABEL[side]))
        assert np.array_equal(got[("vertebra", level)], mr.labels == VERTEBRA_LABEL[level])


def _percent_values(stats: dict) -> list[tuple[str, str | None, float]]:
    return [(codes.VOLUME.value, None, stats["volume_cm3"]), (codes.AREA.value, codes.MEAN.value, stats["area_cm2"]),
            (codes.FAT_FRACTION.value, codes.FAT_SIGNAL_RATIO.value, 100 * stats["fat_signal_fraction"]),
            (codes.FAT_FRACTION.value, codes.MEDIAN.value, 100 * stats["median_fat_fraction"]),
            (codes.FAT_FRACTION.value, codes.FAT_AREA_FRACTION.value, 100 * stats["fat_area_fraction"])]


@pytest.mark.skipif(not TID1500READER.exists(), reason="dcmqi missing: scripts/setup installs the test extras")
def test_tid1500reader_finds_fat_and_grade_of_every_level_and_side_by_codes(outputs, mr, tmp_path) -> None:
    _, result = outputs
    out = tmp_path / "sr.json"
    run = subprocess.run([str(TID1500READER), "--inputDICOM", str(result.files["sr"]), "--outputMetadata", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "Warning" not in run.stdout + run.stderr, run.stdout + run.stderr
    level_of = {codes.VERTEBRA[level].value: level for level in LUMBAR}
    side_of = {concept.value: side for side, concept in codes.LATERALITY.items()}
    want = mp.truth(mr)
    found = set()
    for group in json.loads(out.read_text())["Measurements"]:
        level, side = level_of.get(group["FindingSite"]["CodeValue"]), side_of[group["Laterality"]["CodeValue"]]
        stats = want["levels"][level][side] if level else want["lumbar_total"][side]
        values = [(m["quantity"]["CodeValue"], m.get("derivationModifier", {}).get("CodeValue"), float(m["value"]))
                  for m in group["measurementItems"]]
        assert [v[:2] for v in values] == [v[:2] for v in _percent_values(stats)]
        assert [v[2] for v in values] == pytest.approx([v[2] for v in _percent_values(stats)], rel=1e-9)
        assert all(m["units"]["CodeValue"] in ("cm3", "cm2", "%") for m in group["measurementItems"])
        grades = {e["conceptValue"]["CodeValue"] for e in group["qualitativeEvaluations"]
                  if e["conceptCode"]["CodeValue"] == codes.GOUTALLIER_GRADE.value}
        if side != "combined" and level:
            assert grades == {codes.GRADE[mp.GRADE[mp.DESIGN[level][side]]].value}, (level, side)
        found.add((level, side))
    assert found == {(level, side) for level in (*LUMBAR, None) for side in SIDES}


def test_highdicom_finds_each_level_and_side_with_its_segment_and_grade(outputs, mr) -> None:
    _, result = outputs
    report = hd.sr.srread(result.files["sr"]).content
    seg_uid = str(pydicom.dcmread(result.files["seg"], stop_before_pixels=True).SOPInstanceUID)
    for level in LUMBAR:
        groups = report.get_volumetric_roi_measurement_groups(finding_type=codes.DEEP_MUSCLE_OF_BACK,
                                                              finding_site=codes.VERTEBRA[level])
        assert len(groups) == 2, level
        for group in groups:
            side = {"7771000": "left", "24028007": "right"}[group.finding_sites[0].laterality.value]
            assert group.referenced_segment.referenced_sop_instance_uid == seg_uid
            fsf = next(m for m in group.get_measurements(name=codes.FAT_FRACTION)
                       if m.derivation is not None and m.derivation.value == codes.FAT_SIGNAL_RATIO.value)
            assert fsf.value == pytest.approx(100 * mp.truth(mr)["levels"][level][side]["fat_signal_fraction"])
            assert fsf.unit.value == "%"
            grade = [e.value.value for e in group.get_qualitative_evaluations(name=codes.GOUTALLIER_GRADE)]
            assert grade == [codes.GRADE[mp.GRADE[mp.DESIGN[level][side]]].value]


@pytest.mark.parametrize("build", sorted(DCIODVFY))
def test_dciodvfy_and_dcentvfy_are_clean_on_the_mr_outputs(outputs, build) -> None:
    study, result = outputs
    sources = sorted(study.series["water"].iterdir())
    for path in (result.files["seg"], result.files["sr"], result.files["keyimage"]):
        assert complaints(dicom3tool(DCIODVFY, build), path) == set(), (build, path.name)
    tool = dicom3tool(DCENTVFY, build)
    outputs_ = [result.files["seg"], result.files["sr"], result.files["keyimage"]]
    assert complaints(tool, *sources, *outputs_) - complaints(tool, *sources) == set()


@pytest.mark.parametrize("engine", ["resident", "totalsegmentator"])
def test_the_engines_refuse_mr_naming_the_precomputed_way(engine, tmp_path) -> None:
    from node.config import SegmenterConfig
    from node.pipeline.segment import SegmenterError, close_segmenter, make_segmenter

    mr = mp.make_mr_phantom()
    study = mp.write_study(mr, tmp_path / "study", images=("water",))
    segmenter = make_segmenter(SegmenterConfig(engine=engine, weights_dir=tmp_path))
    try:
        with pytest.raises(SegmenterError, match="precomputed"):
            segmenter.segment_mr(load_mr(study.series["water"]).image)
    finally:
        close_segmenter(segmenter)
