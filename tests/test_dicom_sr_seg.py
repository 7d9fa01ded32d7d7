"""The SEG read back and mapped onto the phantom through its own geometry gives the input masks.

The mapping uses only the SEG's frame positions and orientation and the phantom's canonical
grid, so it is independent of the loader's and the builder's slice order and in-plane layout.
Each muscle segment holds its level's whole slab, so segments of levels sharing a slice overlap
(BINARY); a LABELMAP SEG gives the shared slice to the upper level.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
import phantom as ph
import pydicom
import pytest

from dicom_sr.options import EncodeOptions
from dicom_sr.seg import MUSCLE_SEGMENTS, build_seg, muscle_segment_number, segment_map
from node.config import MeasureConfig, ResultsConfig
from node.labels import AUTOCHTHON_LEFT, AUTOCHTHON_RIGHT, MEASURED_LEVELS, VERTEBRA_LABEL
from node.pipeline.ct_load import load_ct
from node.pipeline.measure import measure
from node.pipeline.segmentation import Segmentation


def loaded_case(phantom: ph.Phantom, series: ph.DicomSeries, layout: ph.DicomLayout, bodies: bool = True):
    """CT as the node loads it, masks brought onto its grid, and the measurement.

    Without vertebral bodies the whole vertebrae define the slabs, and adjacent slabs share slices."""
    ct = load_ct(series.folder)
    canonical = {uid: k for k, uid in enumerate(series.sop_instance_uids)}
    order = [canonical[str(ds.SOPInstanceUID)] for ds in ct.datasets]
    labels = ph.to_stored(phantom.labels[order], layout.in_plane)
    body = np.ascontiguousarray(ph.to_stored(phantom.body[order], layout.in_plane) == ph.BODY) if bodies else None
    seg = Segmentation(np.ascontiguousarray(labels), body, "2.18.0")
    return ct, seg, measure(ct, seg, MeasureConfig()), order


def expected_canonical(phantom: ph.Phantom, result, order: list[int], overlap: bool = True) -> dict[int, np.ndarray]:
    """Segment number -> canonical mask: muscle on its level's slab; with `overlap` False a shared
    slice goes to the upper level only."""
    owner = np.full(phantom.shape[0], "", dtype=object)
    slabs = {level: np.zeros(phantom.shape[0], bool) for level in MEASURED_LEVELS}
    for level in reversed(result.levels):
        if level.slab:
            for loaded_k in range(level.slab.first_slice, level.slab.last_slice + 1):
                owner[order[loaded_k]] = level.level
                slabs[level.level][order[loaded_k]] = True
    masks = {}
    for level in MEASURED_LEVELS:
        on_slab = (slabs[level] if overlap else owner == level)[:, None, None]
        masks[muscle_segment_number(level, "left")] = on_slab & (phantom.labels == AUTOCHTHON_LEFT)
        masks[muscle_segment_number(level, "right")] = on_slab & (phantom.labels == AUTOCHTHON_RIGHT)
    present = [level for level in MEASURED_LEVELS if (phantom.labels == VERTEBRA_LABEL[level]).any()]
    for i, level in enumerate(present):
        masks[MUSCLE_SEGMENTS + 1 + i] = phantom.labels == VERTEBRA_LABEL[level]
    return masks


def read_back_canonical(path, phantom: ph.Phantom, series: ph.DicomSeries) -> dict[int, np.ndarray]:
    """Place every SEG frame on the canonical grid by its patient coordinates; check its source image."""
    seg = hd.seg.segread(path)
    shared = seg.SharedFunctionalGroupsSequence[0]
    iop = np.array(shared.PlaneOrientationSequence[0].ImageOrientationPatient, float)
    row_spacing, col_spacing = (float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing)
    rows, cols = np.indices((seg.Rows, seg.Columns))
    pixels = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns)
    masks = {int(item.SegmentNumber): np.zeros(phantom.shape, bool) for item in seg.SegmentSequence
             if int(item.SegmentNumber) > 0}
    for frame, item in zip(pixels, seg.PerFrameFunctionalGroupsSequence):
        ipp = np.array(item.PlanePositionSequence[0].ImagePositionPatient, float)
        lps = ipp + cols[..., None] * col_spacing * iop[:3] + rows[..., None] * row_spacing * iop[3:]
        index = (lps - np.array(phantom.origin)) / np.array(phantom.spacing[::-1])  # (c, r, k)
        c, r, k = (np.rint(index[..., i]).astype(int) for i in range(3))
        assert np.allclose(index, np.stack([c, r, k], -1), atol=1e-3), "frame not on the CT voxel grid"
        assert len(set(k.ravel())) == 1
        source = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        assert source == series.sop_instance_uids[k[0, 0]], "frame references the wrong source image"
        if seg.SegmentationType == "LABELMAP":
            for number in np.unique(frame[frame > 0]):
                masks[int(number)][k[frame == number], r[frame == number], c[frame == number]] = True
        else:
            number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
            hit = frame > 0
            masks[number][k[hit], r[hit], c[hit]] = True
    return masks


def assert_same_masks(got: dict[int, np.ndarray], want: dict[int, np.ndarray]) -> None:
    assert sorted(got) == sorted(want)
    for number in want:
        assert np.array_equal(got[number], want[number]), f"segment {number} differs"


@pytest.mark.parametrize("layout_name", sorted(ph.LAYOUTS))
def test_seg_maps_back_onto_input_masks_for_every_geometry(layout_name, phantom, phantom_dicom, tmp_path):
    layout = ph.LAYOUTS[layout_name]
    series = phantom_dicom(layout_name)
    ct, seg, result, order = loaded_case(phantom, series, layout)
    path = tmp_path / "seg.dcm"
    build_seg(ct, segment_map(seg, result), result, EncodeOptions()).save_as(path)
    assert_same_masks(read_back_canonical(path, phantom, series), expected_canonical(phantom, result, order))


@pytest.mark.parametrize(("settings", "syntax", "kind"), [
    (ResultsConfig(), "1.2.840.10008.1.2.1", "BINARY"),
    (ResultsConfig(jpeg2000=True), "1.2.840.10008.1.2.4.90", "BINARY"),
    (ResultsConfig(labelmap=True), "1.2.840.10008.1.2.1", "LABELMAP"),
], ids=["binary", "jpeg2000", "labelmap"])
def test_shared_slices_lie_in_both_levels_except_in_a_labelmap(settings, syntax, kind, phantom, phantom_dicom, tmp_path):
    """Whole-vertebra slabs share slices: BINARY segments overlap there, exactly as the SR counts them."""
    layout = ph.LAYOUTS["flipped_feet_first_shuffled"]
    series = phantom_dicom("flipped_feet_first_shuffled")
    ct, seg, result, order = loaded_case(phantom, series, layout, bodies=False)
    segments = segment_map(seg, result)
    assert {cut.level for cut in segments.shared} >= {"T4", "T7", "T10"}
    path = tmp_path / "seg.dcm"
    build_seg(ct, segments, result, EncodeOptions(settings)).save_as(path)
    written = pydicom.dcmread(path, stop_before_pixels=True)
    assert (written.file_meta.TransferSyntaxUID, written.SegmentationType) == (syntax, kind)
    assert written.SegmentsOverlap == ("NO" if settings.labelmap else "YES")
    got = read_back_canonical(path, phantom, series)
    assert_same_masks(got, expected_canonical(phantom, result, order, overlap=not settings.labelmap))
    if not settings.labelmap:
        for level in result.levels:
            for side in ("left", "right"):
                assert int(got[muscle_segment_number(level.level, side)].sum()) == getattr(level, side).voxels


def test_segments_are_described_with_codes_laterality_algorithms_and_colours(phantom, phantom_dicom):
    series = phantom_dicom("axial")
    ct, seg, result, _ = loaded_case(phantom, series, ph.LAYOUTS["axial"])
    segments = segment_map(seg, result)
    written = build_seg(ct, segments, result, EncodeOptions())
    described = written.SegmentSequence
    assert [s.SegmentLabel for s in described[:2]] == ["T1 paraspinal muscle left", "T1 paraspinal muscle right"]
    left = described[0].SegmentedPropertyTypeCodeSequence[0]
    assert (left.CodeValue, left.SegmentedPropertyTypeModifierCodeSequence[0].CodeValue) == ("244849004", "7771000")
    assert described[1].SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence[0].CodeValue == "24028007"
    vertebra = described[MUSCLE_SEGMENTS]
    assert (vertebra.SegmentLabel, vertebra.SegmentedPropertyTypeCodeSequence[0].CodeValue) == ("T1 vertebra", "64864005")
    assert "SegmentedPropertyTypeModifierCodeSequence" not in vertebra.SegmentedPropertyTypeCodeSequence[0]
    (muscle,) = described[0].SegmentationAlgorithmIdentificationSequence
    assert (muscle.AlgorithmName, muscle.AlgorithmVersion) == ("paraspinal-node", result.software.paraspinal_node)
    assert [s.AnatomicRegionSequence[0].CodeValue for s in described[:4]] == ["64864005", "64864005", "53733008", "53733008"]
    assert muscle.AlgorithmSource == "TotalSegmentator 2.18.0"
    (bone,) = vertebra.SegmentationAlgorithmIdentificationSequence
    assert (bone.AlgorithmName, bone.AlgorithmVersion) == ("TotalSegmentator", "2.18.0")
    colours = [tuple(s.RecommendedDisplayCIELabValue) for s in described]
    assert len(set(colours[:MUSCLE_SEGMENTS])) == MUSCLE_SEGMENTS
    again = build_seg(ct, segments, result, EncodeOptions())
    assert colours == [tuple(s.RecommendedDisplayCIELabValue) for s in again.SegmentSequence]
    assert int(written.NumberOfFrames) == sum(
        int(np.count_nonzero(np.any(segments.numbers == n, axis=(1, 2)))) for n in range(1, len(segments.specs) + 1)
    ), "empty frames must be left out"
