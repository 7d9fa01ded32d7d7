"""Lumbar levels L1–L5 on abdominal CT, chosen by protocol: voxel-exact against the abdominal phantom.

The abdominal phantom holds T10 (cut), T11..L4 and L5 cut by the bottom of the field of view.
Readers (dcmqi, highdicom, dicom3tools) read its results in test_readers.py ("abdomen").
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import phantom as ph
import pydicom
import pytest
from pydicom.dataset import Dataset
from totalsegmentator.map_to_binary import class_map_5_parts

from node.cli.main import main
from node.config import ConfigError, MeasureConfig, SelectionConfig, default_protocols, load_config
from node.ingest.series import selection_refusal, summarize_series
from node.ingest.spool import Receipt, StoreOutcome, summarize
from node.labels import AUTOCHTHON_LEFT, AUTOCHTHON_RIGHT, LUMBAR, ROI_SUBSET, VERTEBRA_LABEL
from node.pipeline.contrast import contrast_status
from node.pipeline.ct_load import load_ct
from node.pipeline.measure import measure
from node.pipeline.segmentation import Segmentation
from node.protocol import choose_protocol
from node.state.store import SeriesRecord
from node.state.worklist import columns, worklist_row

ABDOMEN_HEADER = {"BodyPartExamined": "ABDOMEN", "StudyDescription": "CT Abdomen nativ"}


@pytest.fixture(scope="module")
def abdomen() -> ph.Phantom:
    return ph.make_phantom(region="abdomen")


@pytest.fixture(scope="module")
def abdomen_masks(abdomen: ph.Phantom, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ph.write_masks(abdomen, tmp_path_factory.mktemp("abdomen-masks"))


def measure_json(ct: Path, seg: Path, out: Path) -> dict:
    assert main(["measure", str(ct), "--seg", str(seg), "--out", str(out)]) == 0
    return json.loads((out / "measurements.json").read_text())


def lumbar_truth(phantom: ph.Phantom, layout: ph.DicomLayout, levels=LUMBAR) -> dict:
    truth = ph.truth(phantom, levels=levels)
    return truth if layout.normal_z > 0 else ph.mirror_slabs(truth, phantom.shape[0])


@pytest.mark.parametrize("layout", ["flipped", "feet_first"])
def test_abdominal_ct_gives_l1_to_l5_muscle_and_bone_truth(layout, abdomen, abdomen_masks, tmp_path):
    series = ph.write_dicom_series(abdomen, tmp_path / "ct", ph.LAYOUTS[layout], header=ABDOMEN_HEADER)
    result = measure_json(series.folder, abdomen_masks, tmp_path / "out")
    expected = lumbar_truth(abdomen, ph.LAYOUTS[layout])
    assert [row["level"] for row in result["levels"]] == list(LUMBAR)
    assert [row["status"] for row in result["levels"]] == ["complete"] * 4 + ["partial"]
    assert ph.mismatches({**result, "total": result["lumbar_total"]}, expected) == []
    assert "total" not in result, "no T1-T10 total on abdominal CT"
    assert list(result)[:2] == ["levels", "lumbar_total"]
    assert ph.vertebra_mismatches(result, ph.bone_truth(abdomen)) == []
    assert [row["level"] for row in result["vertebrae"]] == ["T10", "T11", "T12", *LUMBAR]
    assert result["contrast"]["source"] == "StudyDescription" and result["contrast"]["enhanced"] is False
    assert result["bone_flag"]["state"] == "not_low", "L1 complete on unenhanced CT: the flag is assessed"


def test_fat_fraction_follows_the_lumbar_design(abdomen, abdomen_masks, tmp_path):
    """The designed share of fat voxels per level and side, so a lumbar level shift or side swap shows."""
    series = ph.write_dicom_series(abdomen, tmp_path / "ct", header=ABDOMEN_HEADER)
    result = measure_json(series.folder, abdomen_masks, tmp_path / "out")
    for row in result["levels"]:
        for side in ("left", "right"):
            assert row[side]["fat_fraction"] == pytest.approx(abdomen.fat_fraction[row["level"]][side], abs=0.002)


def test_csv_lists_lumbar_levels_their_total_and_bone_only_vertebrae(abdomen, abdomen_masks, tmp_path):
    series = ph.write_dicom_series(abdomen, tmp_path / "ct", header=ABDOMEN_HEADER)
    measure_json(series.folder, abdomen_masks, tmp_path / "out")
    rows = list(csv.DictReader(io.StringIO((tmp_path / "out" / "measurements.csv").read_text())))
    assert [row["level"] for row in rows] == [*LUMBAR, "L1-L5", "T10", "T11", "T12"]
    assert rows[5]["status"] == "partial" and rows[5]["bone_status"] == ""
    assert rows[0]["bone_status"] == "complete" and rows[6]["volume_cm3"] == ""


def test_the_lumbar_spine_in_the_field_of_view_chooses_the_levels_without_header_words(abdomen, abdomen_masks,
                                                                                     tmp_path):
    words = {"BodyPartExamined": "PARTIALBODY", "StudyDescription": "", "SeriesDescription": "Body 3.0"}
    series = ph.write_dicom_series(abdomen, tmp_path / "ct", header=words)
    result = measure_json(series.folder, abdomen_masks, tmp_path / "out")
    assert [row["level"] for row in result["levels"]] == list(LUMBAR)


def test_a_chest_ct_reports_complete_lumbar_levels_beside_t1_t10(abdomen, abdomen_masks, tmp_path):
    """Chest words on a series holding L1..L4 whole: T1..T10 as always, L1..L4 beside them, L5 (cut) not."""
    series = ph.write_dicom_series(abdomen, tmp_path / "ct", header={"BodyPartExamined": "CHEST"})
    result = measure_json(series.folder, abdomen_masks, tmp_path / "out")
    levels = [row["level"] for row in result["levels"]]
    assert levels == [f"T{n}" for n in range(1, 11)] + ["L1", "L2", "L3", "L4"]
    assert list(result)[:3] == ["levels", "total", "lumbar_total"]
    four = lumbar_truth(abdomen, ph.LAYOUTS["axial"], levels=LUMBAR[:4])
    assert ph.mismatches({**result, "total": result["lumbar_total"]}, four) == []
    assert ph.mismatches(result, ph.truth(abdomen), slabs=True) == []  # T10 partial, T1..T9 absent


def test_chest_ct_keeps_its_partial_l1_out_of_the_muscle_levels(phantom, phantom_dicom, phantom_masks, tmp_path):
    result = measure_json(phantom_dicom("axial").folder, phantom_masks("folder", "RAS"), tmp_path)
    assert [row["level"] for row in result["levels"]] == [f"T{n}" for n in range(1, 11)]
    assert "lumbar_total" not in result
    assert [row["level"] for row in result["vertebrae"]] == [*(f"T{n}" for n in range(1, 13)), "L1"]


def test_header_words_choose_the_protocol_body_part_first():
    protocols = default_protocols()

    def chosen(present=(), **words) -> str:
        header = Dataset()
        for keyword, value in words.items():
            setattr(header, keyword, value)
        return choose_protocol(header, set(present), protocols).protocol.name

    assert chosen(BodyPartExamined="LSPINE") == "abdomen"
    assert chosen(BodyPartExamined="CHESTABDPELVIS") == "chest"
    assert chosen(BodyPartExamined="ABDOMEN", SeriesDescription="Thorax-Abdomen") == "abdomen"
    assert chosen(StudyDescription="CT LWS nativ") == "abdomen"
    assert chosen(ProtocolName="Thorax routine") == "chest"
    assert chosen(("T12", "L1", "L2")) == "abdomen"
    assert chosen(("T9", "T10", "L1")) == "chest"
    assert chosen() == "chest", "nothing to go by: the first protocol"


@pytest.mark.parametrize(("description", "enhanced"), [
    ("CT Thorax nativ", False), ("TDM abdomen sans injection", False), ("TC addome senza mdc", False),
    ("TC abdomen sin contraste", False), ("TC abdomen con contraste", True), ("TDM avec injection", True),
])
def test_contrast_words_of_the_study_description_in_four_languages(description: str, enhanced: bool):
    header = Dataset()
    header.SeriesDescription = "Body 3.0"
    header.StudyDescription = description
    status = contrast_status(header, MeasureConfig())
    assert (status.enhanced, status.source) == (enhanced, "StudyDescription")


def test_series_description_decides_before_the_study_description():
    header = Dataset()
    header.SeriesDescription, header.StudyDescription = "Abdomen venous", "CT Abdomen nativ"
    assert contrast_status(header, MeasureConfig()).enhanced is True


def test_real_abdominal_ct_is_selected_decoded_and_measured_at_l1_to_l5(real_ct: Path):
    instances = [summarize(pydicom.dcmread(path, stop_before_pixels=True), path, Receipt("a", "SCU", 0.0),
                           StoreOutcome.NEW) for path in sorted(real_ct.iterdir())]
    assert selection_refusal(summarize_series(instances), SelectionConfig()) is None
    ct = load_ct(real_ct)
    labels = np.zeros(ct.shape, np.uint8)
    for i, level in enumerate(LUMBAR):  # five 4-slice bodies near the midline, muscle beside them
        labels[4 * i : 4 * i + 4, 300:320, 236:276] = VERTEBRA_LABEL[level]
    labels[:, 350:400, 260:300] = AUTOCHTHON_LEFT
    labels[:, 350:400, 212:252] = AUTOCHTHON_RIGHT
    result = measure(ct, Segmentation(labels, None, "2.18.0"), MeasureConfig())
    assert result.protocol.startswith("abdomen (field of view")
    assert [level.level for level in result.levels] == list(LUMBAR)
    assert [total.span.name for total in result.totals] == ["L1-L5"]
    for level in result.levels:
        assert level.combined.voxels == int(np.isin(labels[level.slab.first_slice : level.slab.last_slice + 1],
                                                    (AUTOCHTHON_LEFT, AUTOCHTHON_RIGHT)).sum())


def test_lumbar_vertebrae_and_autochthon_run_the_same_two_parts_as_thoracic():
    """roi_subset parity: TotalSegmentator 2.18 holds L1..L5 in part 292 and the whole autochthon in 294."""
    vertebrae = set(class_map_5_parts["class_map_part_vertebrae"].values())
    muscles = set(class_map_5_parts["class_map_part_muscles"].values())
    assert {f"vertebrae_{level}" for level in LUMBAR} <= vertebrae & set(ROI_SUBSET)
    assert {"autochthon_left", "autochthon_right"} <= muscles & set(ROI_SUBSET)
    assert set(ROI_SUBSET) <= vertebrae | muscles


def test_worklist_has_lumbar_columns_blank_for_chest_results():
    series = SeriesRecord("1.1", "9", "PID", "ACC", "20240105", "CT", "abdomen", 80, "f", "/x")
    level = {"status": "complete", "combined": {"median_hu": 31.0, "volume_cm3": 12.0}}
    result = {"levels": [{"level": name, **level} for name in LUMBAR],
              "lumbar_total": {"combined": {"median_hu": 30.0, "volume_cm3": 60.0}}}
    row = worklist_row(series, 1, result, 10.0)
    assert set(row) == set(columns())
    assert (row["L3_median_hu"], row["l1_l5_median_hu"], row["l1_l5_status"], row["l1_l5_levels"]) == (
        31.0, 30.0, "complete", "L1-L5")
    assert (row["t1_t10_status"], row["low_attenuation"]) == ("absent", None)
    chest = worklist_row(series, 2, {"levels": [], "total": {}}, 10.0)
    assert (chest["l1_l5_median_hu"], chest["l1_l5_status"]) == (None, "absent")


def test_protocols_are_configured_and_checked(tmp_path: Path):
    path = tmp_path / "node.toml"
    path.write_text('[[protocols]]\nname = "spine"\nbody_part = "(?i)spine"\nlevels = ["L1", "L2", "L3"]\n'
                    'bone_levels = ["T12", "L1"]\n')
    (protocol,) = load_config(path).protocols
    assert (protocol.name, protocol.levels, protocol.also_levels) == ("spine", ["L1", "L2", "L3"], [])
    for bad, message in (('levels = ["L6"]', "not a level"), ('levels = ["T11"]', "no totalled span"),
                         ('levels = ["L2", "L1"]', "cranial first")):
        path.write_text(f'[[protocols]]\nname = "x"\n{bad}\n')
        with pytest.raises(ConfigError, match=message):
            load_config(path)
