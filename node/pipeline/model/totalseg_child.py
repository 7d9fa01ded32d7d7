"""The reference engine's model process: one fresh Python per job that calls the `totalsegmentator()` API.

It reads job.json from the job folder and writes labels.npy (+ body.npy on CT, discs.npy on MR)
and result.json, or error.json with the reason. The parent side is TotalSegmentatorSegmenter in
node.pipeline.segment.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import signal
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np

from node.labels import MR_ROI_SUBSET, ROI_SUBSET
from node.pipeline.model.env import check_gpu, configure_totalsegmentator, register_trainers, time_forward_passes
from node.process import die_with_parent

VERTEBRAE_BODY_CLASS = 1  # class_map["vertebrae_body"]: 1 vertebrae_body, 2 intervertebral_discs


def child_main(job_dir_name: str) -> None:
    """Entry point of the child: reads job.json, writes labels.npy (+ body.npy) or error.json."""
    os.setpgid(0, 0)
    die_with_parent(signal.SIGKILL)  # a node that dies must not leave a model holding the GPU
    job_dir = Path(job_dir_name)
    try:
        job = json.loads((job_dir / "job.json").read_text(encoding="utf-8"))
        configure_totalsegmentator(Path(job["weights_dir"]), job_dir / "totalseg_home")
        _segment_job(job, job_dir)
    except BaseException as exc:  # noqa: BLE001 - everything must reach the parent as error.json
        traceback.print_exc()
        lines = str(exc).strip().splitlines()
        error = {"type": type(exc).__name__, "message": lines[0] if lines else ""}
        (job_dir / "error.json").write_text(json.dumps(error), encoding="utf-8")
        raise SystemExit(1) from None


def run_totalsegmentator(image, device: str, fast: bool, vertebral_bodies: bool, roi_subset: tuple[str, ...] = ROI_SUBSET):
    """The node's TotalSegmentator calls on a NIfTI image: (total roi_subset labels, vertebrae_body labels | None)."""
    import torch
    from totalsegmentator.python_api import totalsegmentator

    register_trainers()
    check_gpu(device, torch.cuda.device_count() if torch.cuda.is_available() else 0)
    common = {"device": device, "quiet": True, "nr_thr_saving": 1}
    seg = totalsegmentator(image, None, task="total", roi_subset=list(roi_subset), fast=fast, **common)
    body = totalsegmentator(image, None, task="vertebrae_body", **common) if vertebral_bodies else None
    return seg, body


def run_totalsegmentator_mr(image, device: str, fast: bool):
    """The node's TotalSegmentator calls on an MR image: (total_mr roi_subset labels, vertebrae_mr labels)."""
    import torch
    from totalsegmentator.python_api import totalsegmentator

    register_trainers()
    check_gpu(device, torch.cuda.device_count() if torch.cuda.is_available() else 0)
    common = {"device": device, "quiet": True, "nr_thr_saving": 1}
    seg = totalsegmentator(image, None, task="total_mr", roi_subset=list(MR_ROI_SUBSET), fast=fast, **common)
    return seg, totalsegmentator(image, None, task="vertebrae_mr", **common)


def _segment_job(job: dict, job_dir: Path) -> None:
    import nibabel as nib

    clock = time_forward_passes() if job.get("time_forward") else None
    affine = np.asarray(job["affine"])
    image = nib.Nifti1Image(np.load(job_dir / "ct.npy"), affine)
    if job.get("modality") == "MR":
        _segment_mr(image, job, job_dir)
    else:
        seg, body = run_totalsegmentator(image, job["device"], job["fast"], job["vertebral_bodies"],
                                         tuple(job.get("roi_subset", ROI_SUBSET)))
        _save_labels(seg, affine, job_dir / "labels.npy", lambda data: data)
        if body is not None:
            _save_labels(body, affine, job_dir / "body.npy", lambda data: data == VERTEBRAE_BODY_CLASS)
    result = {"totalsegmentator_version": importlib.metadata.version("TotalSegmentator"),
              "forward_s": None if clock is None else clock.seconds}
    (job_dir / "result.json").write_text(json.dumps(result), encoding="utf-8")


def _segment_mr(image, job: dict, job_dir: Path) -> None:
    """labels.npy in the node's numbering and discs.npy, from the total_mr and vertebrae_mr results."""
    from node.pipeline.model.mr_labels import node_mr_labels

    seg, vertebrae = run_totalsegmentator_mr(image, job["device"], job["fast"])
    total_mr, vertebrae_mr = (_checked(result, image.affine) for result in (seg, vertebrae))
    labels, discs = node_mr_labels(total_mr, vertebrae_mr)
    np.save(job_dir / "labels.npy", labels)
    np.save(job_dir / "discs.npy", discs)


def _checked(image, affine: np.ndarray) -> np.ndarray:
    if not np.allclose(image.affine, affine, atol=1e-4):
        raise RuntimeError("TotalSegmentator returned a different geometry than the image it was given")
    return np.asanyarray(image.dataobj).astype(np.uint8)


def _save_labels(image, affine: np.ndarray, path: Path, select: Callable[[np.ndarray], np.ndarray]) -> None:
    np.save(path, select(_checked(image, affine)))
