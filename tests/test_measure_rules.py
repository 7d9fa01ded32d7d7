"""Rules of the seed method on small hand-built volumes whose answers can be worked out by eye."""

import numpy as np
import pytest

from node.config import MeasureConfig
from node.labels import AUTOCHTHON_LEFT, AUTOCHTHON_RIGHT, VERTEBRA_LABEL
from node.pipeline.ct import CTVolume
from node.pipeline.measure import measure
from node.pipeline.segmentation import Segmentation

K, R, C = 64, 48, 48


def stacked_spine(levels=range(1, 11), superior_up=True):
    """Ten 4-slice bodies, one disc slice apart, muscle on every slice (left 40 HU, right -50 HU)."""
    hu = np.full((K, R, C), -1000, np.int16)
    labels = np.zeros((K, R, C), np.uint8)
    body = np.zeros((K, R, C), bool)
    for n in levels:
        k0 = 60 - 5 * n if superior_up else 5 * n
        labels[k0 : k0 + 4, 10:20, 20:30] = VERTEBRA_LABEL[f"T{n}"]
        body[k0 : k0 + 4, 10:20, 20:30] = True
        hu[k0 : k0 + 4, 10:20, 20:30] = 250
    labels[:, 25:35, 10:18] = AUTOCHTHON_LEFT
    hu[:, 25:35, 10:18] = 40
    labels[:, 25:35, 30:38] = AUTOCHTHON_RIGHT
    hu[:, 25:35, 30:38] = -50
    return hu, labels, body


def volume(hu, spacing=(2.5, 0.8, 0.8)):
    return CTVolume(hu=hu, spacing=spacing, origin=np.zeros(3), direction=np.eye(3), slice_thickness=spacing[0])


def test_slab_is_the_body_extent_and_muscle_is_the_whole_plane_on_it():
    hu, labels, body = stacked_spine()
    result = measure(volume(hu), Segmentation(labels, body), MeasureConfig())
    t5 = result.level("T5")
    assert (t5.slab.first_slice, t5.slab.last_slice) == (35, 38)
    assert t5.left.voxels == 4 * 10 * 8 and t5.right.voxels == 4 * 10 * 8
    assert t5.combined.median_hu == pytest.approx(-5.0)
    assert t5.left.fat_fraction == 0 and t5.right.fat_fraction == 1
    assert t5.combined.lean.voxels == t5.left.voxels
    assert t5.combined.volume_cm3 == pytest.approx(640 * 2.5 * 0.8 * 0.8 / 1000)
    assert result.total.combined.voxels == 10 * 640
    assert [lv.status for lv in result.levels] == ["complete"] * 10
    assert result.qc == []


def test_cortical_voxels_above_700_hu_do_not_extend_the_slab():
    hu, labels, body = stacked_spine()
    hu[35, 10:20, 20:30] = 900  # T5's upper endplate is cortical bone only
    result = measure(volume(hu), Segmentation(labels, body), MeasureConfig())
    assert result.level("T5").slab.first_slice == 36


def test_without_vertebrae_body_the_whole_vertebra_defines_the_slab_and_says_so():
    hu, labels, body = stacked_spine()
    labels[39, 12:14, 22:24] = VERTEBRA_LABEL["T5"]  # a spinous process reaching into the disc
    hu[39, 12:14, 22:24] = 300
    result = measure(volume(hu), Segmentation(labels, None), MeasureConfig())
    assert result.method.vertebral_body_source == "whole_vertebra"
    assert result.level("T5").slab.last_slice == 39
    assert "whole_vertebra_bodies" in {f.code for f in result.qc}


def test_vertebra_on_the_first_slice_is_partial_and_keeps_its_numbers():
    hu, labels, body = stacked_spine()
    truncated = volume(hu[:57]), Segmentation(labels[:57], body[:57])
    result = measure(*truncated, MeasureConfig())
    t1 = result.level("T1")
    assert t1.status == "partial" and t1.combined.voxels == 2 * 160
    assert result.level("T2").status == "complete"


def test_muscle_on_the_image_border_makes_the_level_partial():
    hu, labels, body = stacked_spine()
    labels[40:44, 25:35, 0:10] = AUTOCHTHON_LEFT
    result = measure(volume(hu), Segmentation(labels, body), MeasureConfig())
    assert result.level("T4").status == "partial"
    assert result.level("T5").status == "complete"


def test_missing_level_is_absent_and_reported_as_a_gap():
    hu, labels, body = stacked_spine(levels=[1, 2, 3, 5, 6, 7, 8, 9, 10])
    result = measure(volume(hu), Segmentation(labels, body), MeasureConfig())
    t4 = result.level("T4")
    assert t4.status == "absent" and t4.combined.voxels == 0 and t4.combined.median_hu is None
    assert "level_gap" in {f.code for f in result.qc}


def test_swapped_labels_are_reported_out_of_order():
    hu, labels, body = stacked_spine()
    t3, t4 = VERTEBRA_LABEL["T3"], VERTEBRA_LABEL["T4"]
    labels[(labels == t3) | (labels == t4)] ^= t3 ^ t4
    result = measure(volume(hu), Segmentation(labels, body), MeasureConfig())
    assert "level_order" in {f.code for f in result.qc}


def test_feet_first_slice_order_is_read_through_the_direction():
    hu, labels, body = stacked_spine(superior_up=False)
    ct = CTVolume(hu=hu, spacing=(2.5, 0.8, 0.8), origin=np.zeros(3), direction=np.diag([1.0, 1.0, -1.0]))
    result = measure(ct, Segmentation(labels, body), MeasureConfig())
    assert not {"level_order"} & {f.code for f in result.qc}


def test_overlapping_slabs_count_a_shared_slice_in_both():
    hu, labels, body = stacked_spine()
    labels[39, 10:20, 20:30] = VERTEBRA_LABEL["T5"]  # T5 body grows into T4's first slice row
    body[39, 10:20, 20:30] = True
    hu[39, 10:20, 20:30] = 250
    labels[39, 10:12, 20:30] = VERTEBRA_LABEL["T4"]
    result = measure(volume(hu), Segmentation(labels, body), MeasureConfig())
    assert result.level("T5").slab.last_slice == result.level("T4").slab.first_slice == 39
    assert "slab_overlap" in {f.code for f in result.qc}
    assert result.total.combined.voxels < sum(lv.combined.voxels for lv in result.levels)


def test_thick_slices_and_short_scans_are_flagged():
    hu, labels, body = stacked_spine()
    result = measure(volume(hu[20:35], spacing=(6.0, 0.8, 0.8)), Segmentation(labels[20:35], body[20:35]), MeasureConfig())
    codes = {f.code for f in result.qc}
    assert {"slice_thickness", "too_few_slices"} <= codes


def test_implausible_body_height_is_flagged():
    hu, labels, body = stacked_spine()
    result = measure(volume(hu, spacing=(0.5, 0.8, 0.8)), Segmentation(labels, body), MeasureConfig())
    assert "body_height" in {f.code for f in result.qc}
