"""The reference engine (TotalSegmentatorSegmenter) through the real TotalSegmentator → nnU-Net → torch path, on CPU.

The stand-ins are step functions of HU (tests/standin_weights.py): inside the crop, HU < 0 → 43
(vertebrae_T1 from part 292), 0 ≤ HU < 600 → 86 and HU ≥ 600 → 87 (autochthon left/right from part 294);
vertebrae_body class 1 is HU ≥ 600. One module-scoped run (about 1.5–3 min on 2 cores) serves every
assertion on its result.
"""

from __future__ import annotations

import importlib.metadata
import json
import multiprocessing
from pathlib import Path

import numpy as np
import pytest
import torch
from standin_weights import HIGH_HU, MID_HU, sabotage_checkpoint, write_standin_weights

from node.config import SegmenterConfig
from node.pipeline.ct import CTVolume
from node.pipeline.model.env import prepare_totalseg_home
from node.pipeline.segment import (
    SegmenterError,
    TotalSegmentatorSegmenter,
    WeightsMissingError,
    make_segmenter,
    nifti_affine,
)

DARK, MID, BRIGHT = -500, 200, 1000
# Columns swapped with rows and slices running feet-ward: a wrong transpose or flip cannot pass.
DIRECTION = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, -1.0]])


def phantom_ct() -> CTVolume:
    """1.5 mm isotropic, so TotalSegmentator's 1.5 mm resampling is the identity and results are voxel-exact."""
    hu = np.full((40, 48, 72), DARK, dtype=np.int16)
    hu[8:30, 6:30, 6:30] = MID
    hu[12:20, 10:20, 12:24] = BRIGHT  # off-centre in every axis
    return CTVolume(hu=hu, spacing=(1.5, 1.5, 1.5), origin=np.array([10.0, -20.0, 30.0]), direction=DIRECTION)


def config(weights_dir: Path, **options) -> SegmenterConfig:
    return SegmenterConfig(weights_dir=weights_dir, device="cpu", engine="totalsegmentator", **options)


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory) -> Path:
    return write_standin_weights(tmp_path_factory.mktemp("weights"))


@pytest.fixture(scope="module")
def result(weights_dir):
    ct = phantom_ct()
    return ct, make_segmenter(config(weights_dir)).segment(ct)


def test_stand_in_thresholds_match_the_phantom():
    assert DARK < MID_HU <= MID < HIGH_HU <= BRIGHT


def test_part_local_labels_arrive_in_total_numbering_on_the_ct_grid(result):
    ct, seg = result
    assert seg.labels.shape == ct.shape and seg.labels.dtype == np.uint8
    assert (seg.labels[ct.hu == BRIGHT] == 87).all()  # part 294 local 19
    assert (seg.labels[ct.hu == MID] == 86).all()  # part 294 local 18
    assert set(np.unique(seg.labels)) == {0, 43, 86, 87}


def test_part_292_fills_the_crop_and_nothing_outside_it(result):
    _, seg = result
    beside_the_roi = seg.labels[8:30, 6:30, 30:36]  # dark voxels next to the MID box
    assert (beside_the_roi == 43).all()  # part 292 local 19, within the ROI's 20-voxel margin
    assert (seg.labels[:, :, 56:] == 0).all()  # beyond the crop


def test_body_is_class_1_of_vertebrae_body(result):
    ct, seg = result
    assert seg.body is not None and seg.body.dtype == bool
    np.testing.assert_array_equal(seg.body, ct.hu == BRIGHT)


def test_records_totalsegmentator_version(result):
    _, seg = result
    assert seg.totalsegmentator_version == importlib.metadata.version("TotalSegmentator")


def test_nifti_affine_matches_the_ct_geometry():
    ct = phantom_ct()
    image = ct.to_sitk()
    affine = nifti_affine(ct)
    for c, r, k in [(0, 0, 0), (71, 0, 0), (0, 47, 0), (0, 0, 39), (5, 17, 23)]:
        lps = np.array(image.TransformIndexToPhysicalPoint((c, r, k)))
        ras = affine @ np.array([c, r, k, 1.0])
        np.testing.assert_allclose(ras[:3], lps * [-1, -1, 1], atol=1e-9)


def test_missing_weights_name_the_folder_and_the_fix_without_touching_anything(tmp_path):
    weights_dir = tmp_path / "weights"
    with pytest.raises(WeightsMissingError) as caught:
        make_segmenter(config(weights_dir)).segment(phantom_ct())
    message = str(caught.value)
    assert "Dataset292_TotalSegmentator_part2_vertebrae_1532subj" in message
    assert str(weights_dir) in message and "paraspinal-node weights install --from" in message
    assert list(tmp_path.iterdir()) == []  # a download would have created weights_dir first


def test_vertebral_bodies_on_requires_their_weights(tmp_path):
    write_standin_weights(tmp_path, fast=False, vertebrae_body=False)
    with pytest.raises(WeightsMissingError, match="Dataset305_vertebrae_discs_1559subj"):
        make_segmenter(config(tmp_path, vertebral_bodies="on")).segment(phantom_ct())


@pytest.mark.parametrize(
    ("how", "options", "expected"),
    [
        ("exit", {}, "exited with code 70"),
        ("corrupt", {}, "TotalSegmentator failed: UnpicklingError"),
        ("hang", {"timeout_s": 10}, "did not finish within segmenter.timeout_s = 10 s"),
    ],
)
def test_a_failing_model_process_raises_and_the_caller_goes_on(tmp_path, how, options, expected):
    write_standin_weights(tmp_path, fast=False, vertebrae_body=False)
    sabotage_checkpoint(tmp_path, 298, how)
    with pytest.raises(SegmenterError, match=expected):
        TotalSegmentatorSegmenter(config(tmp_path, **options)).segment(phantom_ct())
    assert multiprocessing.active_children() == []


def test_a_gpu_that_is_not_there_is_refused_not_replaced_by_the_cpu(tmp_path):
    write_standin_weights(tmp_path, fast=False, vertebrae_body=False)
    absent = f"gpu:{torch.cuda.device_count()}"  # one past the last visible GPU
    with pytest.raises(SegmenterError, match=f'segmenter.device is "{absent}" but'):
        make_segmenter(SegmenterConfig(weights_dir=tmp_path, device=absent, engine="totalsegmentator")).segment(phantom_ct())


def _usage_posts(home: Path, monkeypatch) -> list:
    """Run TotalSegmentator's own end-of-run bookkeeping against `home`, recording any stats request."""
    from totalsegmentator import config as ts_config

    posts: list = []
    monkeypatch.setenv("TOTALSEG_HOME_DIR", str(home))
    monkeypatch.setattr(ts_config.requests, "post", lambda *args, **kwargs: posts.append(args))
    ts_config.setup_totalseg()
    params = {"task": "total", "fast": False, "preview": False, "multilabel": False, "roi_subset": None,
              "statistics": False, "radiomics": False}
    ts_config.send_usage_stats(ts_config.increase_prediction_counter(), params)
    return posts


def test_prepared_home_turns_usage_statistics_off(tmp_path, monkeypatch):
    home = tmp_path / "home"
    prepare_totalseg_home(home)
    assert _usage_posts(home, monkeypatch) == []
    assert json.loads((home / "config.json").read_text())["send_usage_stats"] is False


def test_an_unprepared_home_would_send_statistics(tmp_path, monkeypatch):
    assert len(_usage_posts(tmp_path / "fresh", monkeypatch)) == 1
