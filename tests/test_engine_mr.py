"""MR on the TotalSegmentator engines: total_mr (roi_subset autochthon + discs) and vertebrae_mr.

CPU, stand-in MR weights (tests/standin_weights.py, `oriented=True`: step functions of the signal
plus classes where it rises along the superior axis) and only those, so an MR job is shown to
need no CT folder. One call per engine on a small MR image serves every parity assert: the
resident engine's labels and discs equal those from the `totalsegmentator()` API, voxel for
voxel. Then a small Dixon study goes through the node on the same resident engine.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
from pathlib import Path

import mr_phantom as mp
import numpy as np
import pytest
from standin_weights import MR_HIGH, MR_LOW, MR_MID, write_mr_standin_weights

from node.config import Config, SegmenterConfig
from node.labels import AUTOCHTHON_LEFT, AUTOCHTHON_RIGHT, VERTEBRA_LABEL
from node.pipeline.ct import CTVolume
from node.pipeline.engine import ResidentEngine
from node.pipeline.segment import TotalSegmentatorSegmenter, close_segmenter, make_segmenter
from node.pipeline.segmentation import Segmentation, WeightsMissingError
from node.run import run_pipeline

PERMUTED_FLIPPED = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, -1.0]])  # c ↔ r, slices feet-ward
L1, L4 = VERTEBRA_LABEL["L1"], VERTEBRA_LABEL["L4"]


def mr_image() -> CTVolume:
    """Air, a body (mid signal) with a bright core, a low-signal band, and a mid-signal blob far from the
    core that total_mr's crop leaves out; float32 like a paired Dixon water image; every resampling step real."""
    rng = np.random.default_rng(19)
    signal = rng.uniform(0, 60, size=(24, 44, 48)).astype(np.float32)
    body = (slice(3, 15), slice(6, 26), slice(8, 30))
    signal[body] = rng.uniform(MR_MID + 20, MR_HIGH - 20, size=signal[body].shape)
    signal[6:12, 12:20, 14:24] = rng.uniform(MR_HIGH + 20, 1300, size=(6, 8, 10))
    signal[4:7, 8:14, 10:16] = rng.uniform(MR_LOW + 20, MR_MID - 20, size=(3, 6, 6))
    signal[20:24, 38:44, 40:48] = MR_MID + 100  # > 20 mm from the bright core
    return CTVolume(hu=signal, spacing=(3.0, 2.0, 1.8), origin=np.array([10.0, -20.0, 30.0]),
                    direction=PERMUTED_FLIPPED)


def segmenter_config(weights_dir: Path, engine: str) -> SegmenterConfig:
    return SegmenterConfig(weights_dir=weights_dir, device="cpu", engine=engine, vertebral_bodies="off")


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory) -> Path:
    return write_mr_standin_weights(tmp_path_factory.mktemp("mr-weights"), oriented=True)


@pytest.fixture(scope="module")
def engine(weights_dir):
    """The resident engine as a worker with MR selected makes it."""
    made = make_segmenter(segmenter_config(weights_dir, "resident"), modalities=("MR",))
    yield made
    close_segmenter(made)


@pytest.fixture(scope="module")
def pair(weights_dir, engine) -> tuple[CTVolume, Segmentation, Segmentation]:
    image = mr_image()
    reference = TotalSegmentatorSegmenter(segmenter_config(weights_dir, "totalsegmentator")).segment_mr(image)
    return image, engine.segment_mr(image), reference


def test_mr_labels_and_discs_equal_totalsegmentator_voxel_for_voxel(pair):
    image, resident, reference = pair
    assert resident.labels.shape == image.shape and resident.labels.dtype == np.uint8
    np.testing.assert_array_equal(resident.labels, reference.labels)
    assert resident.discs is not None and resident.discs.dtype == bool and resident.body is None
    np.testing.assert_array_equal(resident.discs, reference.discs)
    # the comparison means something: both tasks, the direction-dependent class, the discs (the sacrum is
    # where the autochthon is, so the muscle covers it)
    assert {AUTOCHTHON_LEFT, AUTOCHTHON_RIGHT, L4, L1} <= set(np.unique(reference.labels))
    assert reference.discs.any()


def test_mr_masks_follow_total_mr_crop_and_vertebrae_mr(pair):
    """The autochthon only inside total_mr's 3 mm crop (+20 mm); the vertebrae from vertebrae_mr on the whole image."""
    image, resident, _ = pair
    far_blob = resident.labels[20:24, 38:44, 40:48]
    assert not np.isin(far_blob, (AUTOCHTHON_LEFT, AUTOCHTHON_RIGHT)).any()
    assert np.isin(far_blob, (L4, L1)).all()
    core = resident.labels[6:12, 12:20, 14:24]
    assert np.isin(core, (AUTOCHTHON_RIGHT, AUTOCHTHON_LEFT)).mean() > 0.9
    assert resident.totalsegmentator_version == importlib.metadata.version("TotalSegmentator")


def small_dixon_phantom() -> mp.MRPhantom:
    """The middle of the MR phantom (L2–L4 and its muscle, 24 × 32 × 32 voxels): the engine costs little on a CPU."""
    mr = mp.make_mr_phantom()
    k, r, c = slice(30, 54), slice(8, 40), slice(8, 40)
    dk, dr, dc = mr.spacing
    origin = tuple(np.add(mr.origin, (c.start * dc, r.start * dr, k.start * dk)))
    return dataclasses.replace(mr, water=mr.water[k, r, c], fat=mr.fat[k, r, c], labels=mr.labels[k, r, c],
                               discs=mr.discs[k, r, c], origin=origin)


def test_a_dixon_study_is_measured_on_the_resident_engine(pair, engine, tmp_path):
    """The node's MR path end to end on the engine: pairing, total_mr + vertebrae_mr, the Dixon measurement."""
    pid = engine.pid
    study = mp.write_study(small_dixon_phantom(), tmp_path / "study", images=("water", "fat"))
    run_pipeline(study.folder, tmp_path / "out", Config(), dicom=False, segmenter=engine)
    data = json.loads((tmp_path / "out" / "measurements.json").read_text())
    assert engine.pid == pid  # the same model process, MR models loaded once
    assert data["fat"]["dixon"] and data["software"]["totalsegmentator"] == importlib.metadata.version("TotalSegmentator")
    levels = {level["level"]: level for level in data["levels"]}
    assert levels["L4"]["status"] != "absent"  # the stand-in vertebrae_mr calls every vertebra L4 (and L1 where S rises)
    assert {levels[name]["status"] for name in ("L2", "L3", "L5")} == {"absent"}
    combined = levels["L4"]["combined"]
    assert combined["voxels"] > 0 and 0 < combined["fat_signal_fraction"] < 1 and combined["fat_grade"]


def test_missing_mr_weights_do_not_hold_the_ct_jobs_of_a_ct_engine(tmp_path):
    """An MR job on a CT engine asks for MR's folders; the next CT job asks for CT's alone (none here: no process starts)."""
    engine = ResidentEngine(segmenter_config(tmp_path, "resident"))
    try:
        with pytest.raises(WeightsMissingError, match="Dataset756_mri_vertebrae_1076subj"):
            engine.segment_mr(mr_image())
        with pytest.raises(WeightsMissingError) as caught:
            engine.segment(CTVolume(hu=np.zeros((4, 4, 4), np.int16), spacing=(1.0, 1.0, 1.0), origin=np.zeros(3),
                                    direction=np.eye(3)))
    finally:
        engine.close()
    assert "Dataset298" in str(caught.value) and "TotalSegMRI" not in str(caught.value)
