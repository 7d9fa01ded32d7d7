"""The resident engine against the reference: labels equal to the `totalsegmentator()` API's, voxel for voxel.

CPU, stand-in weights (tests/standin_weights.py) written with `oriented=True`: the networks are
step functions of HU plus a class where HU rises along the superior axis, so a wrong crop,
resampling, transpose or flip changes the labels. Each scenario costs one reference call (about a
minute on 2 cores: a fresh process, nnU-Net's worker pools); its result is cached in the temp
folder under a key of everything it depends on, and every assertion shares it. The engines are
module-scoped: one model process per option set, reused job after job.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import multiprocessing
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import standin_weights
import torch
from standin_weights import TRIP_HU, sabotage_checkpoint, write_standin_weights

from node.config import SegmenterConfig
from node.labels import ROI_SUBSET
from node.pipeline import model_process, segment
from node.pipeline.ct import CTVolume
from node.pipeline.engine import ResidentEngine
from node.pipeline.model import totalseg_child
from node.pipeline.model.roi_pipeline import total_step
from node.pipeline.segment import SegmenterError, TotalSegmentatorSegmenter, make_segmenter
from node.pipeline.segmentation import Segmentation

T2, T1, AUTOCHTHON_LEFT, AUTOCHTHON_RIGHT = 42, 43, 86, 87
PERMUTED_FLIPPED = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, -1.0]])  # c ↔ r, slices feet-ward


def _tissue(shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """Dark background with a noisy mid box and a bright core, off-centre on every axis."""
    rng = np.random.default_rng(seed)
    hu = rng.integers(-560, -440, size=shape).astype(np.int16)
    k, r, c = shape
    mid = (slice(k // 5, 3 * k // 4), slice(r // 6, 2 * r // 3), slice(c // 8, c // 2))
    hu[mid] = rng.integers(-60, 420, size=hu[mid].shape)
    hu[k // 3:k // 2, r // 4:r // 2, c // 5:c // 3] = 1000
    return hu


def anisotropic_flipped() -> CTVolume:
    """2 × 0.9 × 1.2 mm, columns and rows swapped, descending slices: every resampling step is real."""
    return CTVolume(hu=_tissue((36, 44, 48), 1), spacing=(2.0, 0.9, 1.2), origin=np.array([10.0, -20.0, 30.0]),
                    direction=PERMUTED_FLIPPED)


def ascending_cut_at_t1() -> CTVolume:
    """Ascending slices whose field of view ends inside the ROI: the crop box meets the image border."""
    hu = _tissue((32, 40, 40), 2)
    hu[-6:, 8:28, 6:30] = 150  # the tissue runs out of the top of the scan, as a FOV cut through T1
    return CTVolume(hu=hu, spacing=(1.25, 1.1, 1.0), origin=np.array([-5.0, 3.0, -40.0]), direction=np.eye(3))


def nothing_to_find() -> CTVolume:
    """No voxel reaches the crop model's threshold. TotalSegmentator 2.18 in memory then segments the
    whole image (its early return for an empty crop only happens when it writes files)."""
    hu = np.random.default_rng(3).integers(-900, -100, size=(24, 32, 32)).astype(np.int16)
    return CTVolume(hu=hu, spacing=(2.5, 1.0, 1.0), origin=np.zeros(3), direction=np.eye(3))


@dataclass(frozen=True)
class Scenario:
    name: str
    make_ct: Callable[[], CTVolume]
    fast: bool = False
    vertebral_bodies: bool = False
    crop_leaves_out: bool = True  # the ROI and its margin do not cover the whole image


SCENARIOS = [
    Scenario("anisotropic-flipped-with-bodies", anisotropic_flipped, vertebral_bodies=True),
    Scenario("ascending-fov-cut-at-t1", ascending_cut_at_t1, crop_leaves_out=False),
    Scenario("empty-roi", nothing_to_find, crop_leaves_out=False),
    Scenario("fast-anisotropic-flipped", anisotropic_flipped, fast=True),
]


def config(weights_dir: Path, scenario: Scenario, engine: str, **options) -> SegmenterConfig:
    return SegmenterConfig(weights_dir=weights_dir, device="cpu", engine=engine, fast=scenario.fast,
                           vertebral_bodies="on" if scenario.vertebral_bodies else "off", **options)


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory) -> Path:
    return write_standin_weights(tmp_path_factory.mktemp("weights"), oriented=True)


@pytest.fixture(scope="module")
def engines(weights_dir):
    """One resident engine per option set, kept for the whole module as the worker keeps its own."""
    made: dict[tuple[bool, bool], ResidentEngine] = {}

    def engine_for(scenario: Scenario) -> ResidentEngine:
        key = (scenario.fast, scenario.vertebral_bodies)
        if key not in made:
            made[key] = make_segmenter(config(weights_dir, scenario, "resident"))
        return made[key]

    yield engine_for
    for engine in made.values():
        engine.close()


def _cache_key(ct: CTVolume, scenario: Scenario) -> str:
    """Everything the reference labels depend on: the CT, the options, the stand-ins, the reference engine's code."""
    digest = hashlib.sha256()
    for part in (ct.hu.tobytes(), str(ct.hu.shape), repr(ct.spacing), ct.origin.tobytes(), ct.direction.tobytes(),
                 repr((scenario.fast, scenario.vertebral_bodies)), importlib.metadata.version("TotalSegmentator"),
                 *(Path(module.__file__).read_bytes() for module in (standin_weights, totalseg_child, segment,
                                                                      model_process))):
        digest.update(part if isinstance(part, bytes) else part.encode())
    return digest.hexdigest()[:24]


def reference(weights_dir: Path, scenario: Scenario, ct: CTVolume) -> Segmentation:
    """The totalsegmentator() API's result, from the cache when this exact case ran before."""
    cache = Path(tempfile.gettempdir()) / "paraspinal-reference-cache" / _cache_key(ct, scenario)
    if not (cache / "labels.npy").exists():
        seg = TotalSegmentatorSegmenter(config(weights_dir, scenario, "totalsegmentator")).segment(ct)
        cache.parent.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(dir=cache.parent, prefix=".partial-"))  # complete before it is visible
        np.save(partial / "labels.npy", seg.labels)
        if seg.body is not None:
            np.save(partial / "body.npy", seg.body)
        shutil.rmtree(cache, ignore_errors=True)
        partial.rename(cache)
    body = cache / "body.npy"
    return Segmentation(np.load(cache / "labels.npy"), np.load(body) if body.exists() else None)


@pytest.fixture(scope="module", params=SCENARIOS, ids=[s.name for s in SCENARIOS])
def pair(request, weights_dir, engines):
    scenario: Scenario = request.param
    ct = scenario.make_ct()
    engine = engines(scenario)
    resident = engine.segment(ct)
    return scenario, ct, resident, reference(weights_dir, scenario, ct), engine


def test_labels_equal_totalsegmentator_voxel_for_voxel(pair):
    scenario, ct, resident, expected, _ = pair
    assert resident.labels.shape == ct.shape and resident.labels.dtype == np.uint8
    np.testing.assert_array_equal(resident.labels, expected.labels)
    # the comparison means something: the direction-dependent class is there, and what the crop leaves out
    assert T2 in expected.labels
    if scenario.name != "empty-roi":
        assert {AUTOCHTHON_LEFT, AUTOCHTHON_RIGHT} <= set(np.unique(expected.labels))
    assert (expected.labels == 0).any() == scenario.crop_leaves_out


def test_vertebral_bodies_equal_and_only_when_configured(pair):
    scenario, _, resident, expected, _ = pair
    if scenario.vertebral_bodies:
        assert resident.body is not None and resident.body.dtype == bool and resident.body.any()
        np.testing.assert_array_equal(resident.body, expected.body)
    else:
        assert resident.body is None and expected.body is None


def test_records_totalsegmentator_version(pair):
    _, _, resident, _, _ = pair
    assert resident.totalsegmentator_version == importlib.metadata.version("TotalSegmentator")


def test_the_next_job_reuses_the_process(pair):
    _, ct, resident, _, engine = pair
    pid = engine.pid
    again = engine.segment(ct)
    assert engine.pid == pid is not None
    np.testing.assert_array_equal(again.labels, resident.labels)


def test_parts_follow_the_roi_classes_like_totalsegmentator():
    assert [m.task_id for m in total_step(False, ROI_SUBSET).models] == [292, 294]
    assert [m.task_id for m in total_step(False, (*ROI_SUBSET, "liver", "spleen")).models] == [291, 292, 294]
    assert [m.task_id for m in total_step(True, ROI_SUBSET).models] == [297]


def _metal(ct: CTVolume) -> CTVolume:
    hu = ct.hu.copy()
    hu[4:16, 4:20, 4:20] = int(TRIP_HU) + 500
    return CTVolume(hu=hu, spacing=ct.spacing, origin=ct.origin, direction=ct.direction)


@pytest.fixture
def sabotaged(tmp_path, weights_dir):
    """A copy of the stand-ins whose crop model is sabotaged as asked."""

    def make(how: str) -> Path:
        copy = tmp_path / "weights"
        shutil.copytree(weights_dir, copy)
        sabotage_checkpoint(copy, 298, how)
        return copy

    return make


def _children() -> set[int]:
    return {child.pid for child in multiprocessing.active_children()}


def test_a_crash_fails_that_job_with_its_reason_and_the_next_job_succeeds(sabotaged, weights_dir):
    scenario = SCENARIOS[1]
    before = _children()
    engine = ResidentEngine(config(sabotaged("trip-exit"), scenario, "resident"))
    try:
        ct = scenario.make_ct()
        engine.start()
        crashed_pid = engine.pid
        with pytest.raises(SegmenterError, match="Segmentation engine process exited with code 70"):
            engine.segment(_metal(ct))
        assert engine.pid is None and crashed_pid not in _children()
        after = engine.segment(ct)
        assert engine.pid not in (None, crashed_pid)
        np.testing.assert_array_equal(after.labels, reference(weights_dir, scenario, ct).labels)
    finally:
        engine.close()
    assert _children() == before


def test_a_hung_job_is_killed_after_timeout_s(sabotaged):
    scenario = SCENARIOS[1]
    engine = ResidentEngine(config(sabotaged("trip-hang"), scenario, "resident", timeout_s=10))
    try:
        engine.start()
        hung_pid = engine.pid
        with pytest.raises(SegmenterError, match="did not finish within segmenter.timeout_s = 10 s and was stopped"):
            engine.segment(_metal(scenario.make_ct()))
        assert hung_pid not in _children()  # killed, and its memory with it
    finally:
        engine.close()


@pytest.mark.parametrize(
    ("how", "options", "expected"),
    [
        ("corrupt", {}, "Segmentation engine start failed: UnpicklingError"),
        ("hang", {"start_timeout_s": 10}, "did not start within segmenter.start_timeout_s = 10 s"),
    ],
)
def test_a_model_that_cannot_load_fails_the_job_with_its_reason(sabotaged, how, options, expected):
    before = _children()
    engine = ResidentEngine(config(sabotaged(how), SCENARIOS[1], "resident", **options))
    try:
        with pytest.raises(SegmenterError, match=expected):
            engine.segment(SCENARIOS[1].make_ct())
        assert _children() == before  # nothing left behind
    finally:
        engine.close()


def test_a_gpu_that_is_not_there_is_refused_not_replaced_by_the_cpu(weights_dir):
    absent = f"gpu:{torch.cuda.device_count()}"  # one past the last visible GPU
    engine = ResidentEngine(SegmenterConfig(weights_dir=weights_dir, device=absent, vertebral_bodies="off"))
    try:
        with pytest.raises(SegmenterError, match=f'segmenter.device is "{absent}" but'):
            engine.segment(nothing_to_find())
    finally:
        engine.close()


def test_torch_resampling_keeps_totalsegmentators_grid_and_orders():
    """The GPU path's resampling, run here on the CPU: same shape and affine; labels (order 0) identical,
    the CT (order 1) within 1 HU of scipy's where float rounding truncates the other way."""
    from totalsegmentator.resampling import change_spacing

    from node.pipeline.model.gpu_resample import change_spacing_on

    rng = np.random.default_rng(5)
    affine = np.diag([-0.9, 1.2, 2.0, 1.0])
    image = nib.Nifti1Image(rng.integers(-1000, 1500, size=(37, 41, 23)).astype(np.float64), affine)
    expected = change_spacing(image, [1.5] * 3, order=1, dtype=np.int32)
    got = change_spacing_on(torch.device("cpu"), image, [1.5] * 3, order=1, dtype=np.int32)
    assert got.shape == expected.shape and np.allclose(got.affine, expected.affine)
    difference = np.abs(np.asarray(got.dataobj, dtype=np.int64) - np.asarray(expected.dataobj, dtype=np.int64))
    assert difference.max() <= 1 and (difference > 0).mean() < 0.01

    labels = nib.Nifti1Image(rng.integers(0, 5, size=expected.shape).astype(np.uint8), expected.affine)
    back = {"target_shape": image.shape, "order": 0, "dtype": np.uint8, "force_affine": affine}
    expected_labels = change_spacing(labels, [1.5] * 3, **back)
    got_labels = change_spacing_on(torch.device("cpu"), labels, [1.5] * 3, **back)
    np.testing.assert_array_equal(np.asarray(got_labels.dataobj), np.asarray(expected_labels.dataobj))
    np.testing.assert_array_equal(got_labels.affine, affine)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: run on a GPU machine (README 'Performance')")
def test_on_a_gpu_the_labels_agree_with_the_cpu_reference(weights_dir):
    scenario = SCENARIOS[0]
    ct = scenario.make_ct()
    engine = ResidentEngine(SegmenterConfig(weights_dir=weights_dir, device="gpu", vertebral_bodies="on"))
    try:
        seg = engine.segment(ct)
    finally:
        engine.close()
    expected = reference(weights_dir, scenario, ct)
    assert (seg.labels == expected.labels).mean() > 0.99  # autocast and cuDNN move voxels at the stand-ins' steps
    assert (seg.body == expected.body).mean() > 0.99
