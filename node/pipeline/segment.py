"""Segmenters: a CT volume in, the node's Segmentation on the same grid out.

Two engines run TotalSegmentator's models, each in a child process so that a crash, an
out-of-memory error or a hang in the model costs one job, never the node:

- "resident" (node.pipeline.engine): one long-lived model process that loads the models once and
  runs TotalSegmentator's roi_subset pipeline in memory, job after job;
- "totalsegmentator": a fresh process per job that calls the `totalsegmentator()` API, the
  reference whose labels the resident engine reproduces voxel for voxel on the CPU.
"""

from __future__ import annotations

import json
import multiprocessing
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np

from node.config import SegmenterConfig
from node.labels import ROI_SUBSET
from node.pipeline.ct import CTVolume
from node.pipeline.engine import ResidentEngine
from node.pipeline.model.totalseg_child import child_main
from node.pipeline.model_process import check_weights, error_reason, exit_reason, kill_process_group, nifti_affine
from node.pipeline.seg_load import PrecomputedSegmenter
from node.pipeline.segmentation import Segmentation, SegmenterError, WeightsMissingError
from node.weights import runs_vertebral_bodies

__all__ = ["Segmenter", "SegmenterError", "TotalSegmentatorSegmenter", "WeightsMissingError", "close_segmenter",
           "make_segmenter", "nifti_affine"]


MR_NOT_YET = ("MR series are not segmented by this node's TotalSegmentator engines yet (total_mr and vertebrae_mr): "
              "put their masks in segmenter.precomputed_dir/<SeriesInstanceUID>/ with segmenter.backend = "
              '"precomputed", or use `paraspinal-node measure STUDY_DIR --seg MASKS`')


class Segmenter(Protocol):
    def segment(self, ct: CTVolume) -> Segmentation: ...

    def segment_mr(self, image: CTVolume) -> Segmentation:
        """total_mr (autochthon, discs) and vertebrae_mr (vertebrae, sacrum) on an MR series."""
        ...


class TotalSegmentatorSegmenter:
    """task "total" with roi_subset T1–T12 + autochthon, plus the vertebrae_body task when configured.

    `time_forward` makes the child time the networks' forward passes (benchmarks); the last
    job's figure is then in `last_forward_s`.
    """

    def __init__(self, config: SegmenterConfig, time_forward: bool = False, roi_subset: tuple[str, ...] = ROI_SUBSET) -> None:
        self.config = config
        self.roi_subset = roi_subset
        self.time_forward = time_forward
        self.last_forward_s: float | None = None

    def segment(self, ct: CTVolume) -> Segmentation:
        check_weights(self.config)
        with tempfile.TemporaryDirectory(prefix="paraspinal-seg-") as tmp:
            job_dir = Path(tmp)
            self._write_job(job_dir, ct)
            _run_child(job_dir, self.config.timeout_s)
            return self._read_result(job_dir, ct)

    def close(self) -> None:
        """Nothing stays running between jobs."""

    def segment_mr(self, image: CTVolume) -> Segmentation:
        raise SegmenterError(MR_NOT_YET)

    def _write_job(self, job_dir: Path, ct: CTVolume) -> None:
        np.save(job_dir / "ct.npy", ct.hu.transpose(2, 1, 0))  # (c, r, k) as NIfTI wants; written without a copy
        job = {
            "affine": nifti_affine(ct).tolist(),
            "weights_dir": str(Path(self.config.weights_dir).resolve()),
            "device": self.config.device,
            "fast": self.config.fast,
            "vertebral_bodies": runs_vertebral_bodies(self.config),
            "time_forward": self.time_forward,
            "roi_subset": list(self.roi_subset),
        }
        (job_dir / "job.json").write_text(json.dumps(job), encoding="utf-8")

    def _read_result(self, job_dir: Path, ct: CTVolume) -> Segmentation:
        result = json.loads((job_dir / "result.json").read_text(encoding="utf-8"))
        self.last_forward_s = result.get("forward_s")
        labels = np.load(job_dir / "labels.npy").transpose(2, 1, 0)
        body_file = job_dir / "body.npy"
        body = np.load(body_file).transpose(2, 1, 0) if body_file.exists() else None
        if labels.shape != ct.shape:
            raise SegmenterError(f"TotalSegmentator returned shape {labels.shape} for a CT of {ct.shape}: report this bug")
        return Segmentation(
            labels=np.ascontiguousarray(labels, dtype=np.uint8),
            body=None if body is None else np.ascontiguousarray(body, dtype=bool),
            totalsegmentator_version=result["totalsegmentator_version"],
        )


_ENGINES: dict[str, Callable[..., Segmenter]] = {
    "resident": ResidentEngine,
    "totalsegmentator": TotalSegmentatorSegmenter,
}


def make_segmenter(config: SegmenterConfig, roi_subset: tuple[str, ...] = ROI_SUBSET) -> Segmenter:
    """The configured segmenter; a resident engine starts its model process on its first job.

    `roi_subset` is what TotalSegmentator segments (node.labels.roi_subset: the organs with [biomarkers] liver).
    """
    if config.backend == "precomputed":
        return PrecomputedSegmenter(config)
    if config.backend != "totalsegmentator":
        raise SegmenterError(
            f"segmenter.backend {config.backend!r} is not available here: use totalsegmentator or precomputed")
    try:
        return _ENGINES[config.engine](config, roi_subset=roi_subset)
    except KeyError:
        raise SegmenterError(
            f"segmenter.engine {config.engine!r} is not available here: use one of {', '.join(sorted(_ENGINES))}"
        ) from None


def close_segmenter(segmenter: Segmenter) -> None:
    """End what a segmenter keeps running (the resident engine's model process); others hold nothing."""
    close = getattr(segmenter, "close", None)
    if close is not None:
        close()


def _run_child(job_dir: Path, timeout_s: float) -> None:
    # Not daemonic: nnU-Net starts worker processes of its own, which daemonic processes may not do.
    process = multiprocessing.get_context("spawn").Process(
        target=child_main, args=(str(job_dir),), name="totalsegmentator", daemon=False
    )
    process.start()
    try:
        process.join(timeout_s)
    finally:  # a timeout, or the node itself being stopped, ends the model too
        timed_out = process.is_alive()
        if timed_out or process.exitcode != 0:
            kill_process_group(process)
        process.join()
    if timed_out:
        raise SegmenterError(
            f"TotalSegmentator did not finish within segmenter.timeout_s = {timeout_s} s and was stopped: "
            "raise timeout_s, or use a GPU (segmenter.device) or fast mode"
        )
    if process.exitcode != 0:
        raise SegmenterError(_failure_reason(job_dir, process.exitcode))


def _failure_reason(job_dir: Path, exitcode: int | None) -> str:
    error_file = job_dir / "error.json"
    if error_file.exists():
        error = json.loads(error_file.read_text(encoding="utf-8"))
        return error_reason("TotalSegmentator", error["type"], error["message"])
    return exit_reason("TotalSegmentator", exitcode)
