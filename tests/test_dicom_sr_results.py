"""The three result objects as a PACS gets them: valid, in the source study, carrying the numbers.

One phantom series is measured and encoded once per module; dciodvfy (dicom3tools) and dsrdump
(dcmtk) check the files, and the SR is read back with pydicom to compare with the measurement.
tests/test_readers.py reads the same objects with dcmqi and highdicom.
"""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import phantom as ph
import pydicom
import pytest

from dicom_sr.keyimage import render_key_image, screening_flag
from dicom_sr.options import EncodeOptions
from dicom_sr.results import write_results
from dicom_sr.seg import segment_map
from dicom_sr.sr import MEASUREMENTS, Window, side_stats, tracking_label
from dicom_sr.study import character_set
from node.config import MeasureConfig, ResultsConfig
from node.labels import MEASURED_LEVELS, SPINE_LEVELS
from node.pipeline.ct_load import load_ct
from node.pipeline.measure import measure
from node.pipeline.segmentation import Segmentation

OPTIONS = EncodeOptions(ResultsConfig(seg_series_number=301, sr_series_number=302, key_image_series_number=303,
                                      seg_series_description="SEG test", sr_series_description="SR test",
                                      key_image_series_description="Key test"))
ALL_VOXELS, LEAN_WINDOW = "ALLHU", "LEANHU"  # group-level Measurement Method codes
STATUS_CODE = {"complete": "255594003", "partial": "255609007", "absent": "121054"}
VERTEBRA_CODE = dict(zip(MEASURED_LEVELS, ("64864005", "53733008", "1626008", "73071006", "56401006", "45296009",
                                           "62487009", "11068009", "82687006", "7610001")))  # CID 7603


def measured(folder, phantom: ph.Phantom, series: ph.DicomSeries, in_plane: str):
    ct = load_ct(folder)
    canonical = {uid: k for k, uid in enumerate(series.sop_instance_uids)}
    order = [canonical[str(ds.SOPInstanceUID)] for ds in ct.datasets]
    labels = np.ascontiguousarray(ph.to_stored(phantom.labels[order], in_plane))
    body = np.ascontiguousarray(ph.to_stored(phantom.body[order], in_plane) == ph.BODY)
    seg = Segmentation(labels, body, "2.18.0")
    return ct, seg, measure(ct, seg, MeasureConfig())


@pytest.fixture(scope="module")
def small_phantom() -> ph.Phantom:
    """Coarse in-plane grid: the objects' content does not depend on resolution, the runtime does."""
    return ph.make_phantom(spacing=(2.5, 1.8, 1.8))


@pytest.fixture(scope="module")
def encoded(tmp_path_factory, small_phantom):
    folder = tmp_path_factory.mktemp("ct")
    series = ph.write_dicom_series(small_phantom, folder, ph.LAYOUTS["flipped_feet_first_shuffled"],
                                   patient_name="Müller^Jörg", specific_character_set="ISO_IR 100")
    ct, seg, result = measured(folder, small_phantom, series, "RA")
    files = write_results(ct, seg, result, tmp_path_factory.mktemp("out"), OPTIONS)
    return ct, seg, result, files


def dciodvfy_errors(path) -> list[str]:
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools not installed (apt-get install dicom3tools)")
def test_dciodvfy_finds_no_errors_in_any_object(encoded):
    _, _, _, files = encoded
    for path in (files.seg, files.sr, files.key_image):
        assert dciodvfy_errors(path) == [], path.name


@pytest.mark.skipif(shutil.which("dsrdump") is None, reason="dcmtk not installed (apt-get install dcmtk)")
def test_dsrdump_renders_the_report(encoded):
    _, _, _, files = encoded
    run = subprocess.run(["dsrdump", "+U8", str(files.sr)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "Imaging Measurement Report" in run.stdout
    assert '"T3 paraspinal muscle left"' in run.stdout
    assert '(24627-2,LN,"CT Chest")' in run.stdout
    assert "Müller^Jörg" in run.stdout


def test_all_objects_join_the_source_study_as_new_series(encoded):
    ct, _, _, files = encoded
    source = ct.datasets[0]
    objects = [pydicom.dcmread(p, stop_before_pixels=True) for p in (files.seg, files.sr, files.key_image)]
    for ds in objects:
        for keyword in ("StudyInstanceUID", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber",
                        "StudyDate", "StudyID"):
            assert ds[keyword].value == source[keyword].value, keyword
        assert (ds.SpecificCharacterSet, str(ds.PatientName)) == ("ISO_IR 100", "Müller^Jörg")
    for path in (files.seg, files.sr, files.key_image):
        assert "Müller^Jörg".encode("latin-1") in path.read_bytes()
    series = {str(ds.SeriesInstanceUID) for ds in objects} | {str(source.SeriesInstanceUID)}
    assert len(series) == 4
    assert [(ds.SeriesNumber, ds.SeriesDescription) for ds in objects] == [
        (301, "SEG test"), (302, "SR test"), (303, "Key test")]


def test_utf8_source_name_stays_utf8(tmp_path, small_phantom):
    cropped = small_phantom.crop(k=slice(40, 64))
    series = ph.write_dicom_series(cropped, tmp_path / "ct", patient_name="Müller^Jörg",
                                   specific_character_set="ISO_IR 192")
    ct, seg, result = measured(tmp_path / "ct", cropped, series, "LP")
    files = write_results(ct, seg, result, tmp_path / "out", EncodeOptions())
    for path in (files.seg, files.sr, files.key_image):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert (ds.SpecificCharacterSet, str(ds.PatientName)) == ("ISO_IR 192", "Müller^Jörg")
        assert "Müller^Jörg".encode() in path.read_bytes()


def test_character_set_switches_to_utf8_only_when_the_source_set_cannot_encode(encoded):
    ct, _, _, _ = encoded
    latin1 = ct.datasets[0]
    assert character_set(latin1, ["Paraspinal"]) == "ISO_IR 100"
    assert character_set(latin1, ["Rückenmuskel"]) == "ISO_IR 100"
    assert character_set(latin1, ["Łódź"]) == "ISO_IR 192"
    ascii_source = pydicom.Dataset()
    ascii_source.PatientName = "Müller^Jörg"
    assert character_set(ascii_source, ["Paraspinal"]) == "ISO_IR 192"


def read_groups(path) -> dict[str, dict]:
    """Tracking identifier -> rows [(concept, derivation, value)], the group's codes, method and segment."""
    sr = pydicom.dcmread(path)
    (imaging,) = [item for item in sr.ContentSequence if item.ConceptNameCodeSequence[0].CodeValue == "126010"]
    groups = {}
    for group in imaging.ContentSequence:
        name = next(i.TextValue for i in group.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "112039")
        rows = []
        for item in group.ContentSequence:
            if item.ValueType != "NUM":
                continue
            modifiers = {m.ConceptNameCodeSequence[0].CodeValue: m.ConceptCodeSequence[0].CodeValue
                         for m in item.get("ContentSequence", [])}
            assert "370129005" not in modifiers, "the Measurement Method belongs to the group"
            rows.append((item.ConceptNameCodeSequence[0].CodeValue, modifiers.get("121401"),
                         float(item.MeasuredValueSequence[0].FloatingPointValue)))
        codes = [(i.ConceptNameCodeSequence[0].CodeValue, i.ConceptCodeSequence[0].CodeValue)
                 for i in group.ContentSequence if i.ValueType == "CODE"]
        segment = [i for i in group.ContentSequence if i.ValueType == "IMAGE"]
        groups[name] = {"rows": rows, "codes": codes, "method": dict(codes).get("370129005"),
                        "segment": segment[0] if segment else None}
    return groups


def expected_names(window: Window) -> list[str]:
    return ([tracking_label(level, side, window) for level in MEASURED_LEVELS for side in ("left", "right")]
            + [tracking_label(level, "combined", window) for level in MEASURED_LEVELS]
            + [tracking_label(None, side, window) for side in ("left", "right", "combined")])


def test_sr_carries_every_number_of_the_result_in_the_same_rows_everywhere(encoded):
    _, _, result, files = encoded
    groups = read_groups(files.sr)
    muscle = expected_names(Window.ALL) + expected_names(Window.LEAN)
    assert list(groups)[: len(muscle)] == muscle
    assert list(groups)[len(muscle):] == [f"{level} vertebral body trabecular bone" for level in SPINE_LEVELS]
    for window, method in ((Window.ALL, ALL_VOXELS), (Window.LEAN, LEAN_WINDOW)):
        names = expected_names(window)
        assert {groups[name]["method"] for name in names} == {method}
        layouts = {tuple(row[:2] for row in groups[name]["rows"]) for name in names}
        assert len(layouts) == 1, "every group of a window has the same measurements in the same order"
        for level in result.levels:
            for side in ("left", "right", "combined"):
                got = [row[2] for row in groups[tracking_label(level.level, side, window)]["rows"]]
                assert got == [spec.value(window.stats(side_stats(level, side))) for spec in MEASUREMENTS[window]]
        for side in ("left", "right", "combined"):
            assert [row[2] for row in groups[tracking_label(None, side, window)]["rows"]] == [
                spec.value(window.stats(side_stats(result.total, side))) for spec in MEASUREMENTS[window]]


def test_sr_groups_reference_their_seg_segment_and_carry_status_and_qc(encoded):
    _, _, result, files = encoded
    seg = pydicom.dcmread(files.seg, stop_before_pixels=True)
    groups = read_groups(files.sr)
    for number, (level, side) in enumerate(((lv, s) for lv in MEASURED_LEVELS for s in ("left", "right")), start=1):
        reference = groups[tracking_label(level, side)]["segment"].ReferencedSOPSequence[0]
        assert reference.ReferencedSOPInstanceUID == seg.SOPInstanceUID
        assert reference.ReferencedSegmentNumber == number
        assert seg.SegmentSequence[number - 1].SegmentLabel == f"{level} paraspinal muscle {side}"
    for level in result.levels:
        for side in ("left", "right", "combined"):
            for window in Window:
                assert ("111693", STATUS_CODE[level.status]) in groups[tracking_label(level.level, side, window)]["codes"]
    qc = [code for name, code in groups[tracking_label(None, "combined")]["codes"] if name == "111050"]
    assert qc == [item.code[:16] for item in result.qc]


def test_absent_level_has_no_measurements_and_the_totals_say_what_they_miss(tmp_path, small_phantom):
    """A field of view without T1 makes T1 absent: its groups keep only the rating "Absent", and the
    totals are rated partial and name the nine levels they include."""
    cropped = small_phantom.crop(k=slice(0, 60))
    series = ph.write_dicom_series(cropped, tmp_path / "ct")
    ct, seg, result = measured(tmp_path / "ct", cropped, series, "LP")
    assert result.levels[0].status == "absent" and result.levels[-1].status == "complete"
    present = [lv.level for lv in result.levels if lv.status != "absent"]
    files = write_results(ct, seg, result, tmp_path / "out", EncodeOptions())
    groups = read_groups(files.sr)
    for side in ("left", "right", "combined"):
        for window in Window:
            group = groups[tracking_label("T1", side, window)]
            assert group["rows"] == [] and ("111693", STATUS_CODE["absent"]) in group["codes"]
            total = groups[tracking_label(None, side, window)]
            assert ("111693", STATUS_CODE["partial"]) in total["codes"]
            included = [code for name, code in total["codes"] if name == "INCLEVEL"]
            assert included == [VERTEBRA_CODE[level] for level in present]


def test_key_image_is_a_derived_colour_capture_with_burned_in_text(encoded):
    ct, _, _, files = encoded
    ds = pydicom.dcmread(files.key_image)
    assert (ds.SOPClassUID, ds.PhotometricInterpretation, ds.SamplesPerPixel) == (
        "1.2.840.10008.5.1.4.1.1.7", "RGB", 3)
    assert ds.BurnedInAnnotation == "YES"
    assert "DERIVED" in ds.ImageType and "not for diagnosis" in ds.ImageComments
    assert ds.pixel_array.shape[2] == 3 and ds.pixel_array.std() > 0


def test_complete_totals_are_not_marked_incomplete(encoded):
    """The screening line under the table is orange when T1-T10 is incomplete (tests/test_readers.py)."""
    _, _, result, files = encoded
    assert {level.status for level in result.levels} == {"complete"}
    image = pydicom.dcmread(files.key_image).pixel_array[680:, 620:].astype(int)
    orange = (image[..., 0] > 200) & (abs(image[..., 1] - 165) < 30) & (image[..., 2] < 60)
    assert int(orange.sum()) == 0


def test_screening_flag_follows_the_threshold_and_is_drawn_in_red(encoded):
    ct, seg, result, _ = encoded
    median = result.total.combined.median_hu
    assert screening_flag(result, median + 1) and not screening_flag(result, median)
    segments = segment_map(seg, result)
    red = [np.count_nonzero((image[..., 0] > 200) & (image[..., 1] < 40) & (image[..., 2] < 40))
           for image in (render_key_image(ct, segments, result, EncodeOptions(low_attenuation_hu=t))
                         for t in (median, median + 1))]
    assert red[0] == 0 and red[1] > 100
