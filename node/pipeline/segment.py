"""Segmenters: a CT volume in, the node's Segmentation on the same grid out.

TotalSegmentator runs in a child process of its own, so that a crash, an out-of-memory error or a
hang in the model costs one job, never the node, and GPU memory is returned when the child exits.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import multiprocessing
import os
import signal
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np

from node.config import SegmenterConfig
from node.labels import ROI_SUBSET
from node.pipeline.ct import CTVolume
from node.pipeline.seg_load import PrecomputedSegmenter
from node.pipeline.segmentation import Segmentation, SegmenterError, WeightsMissingError
from node.weights import missing_models, runs_vertebral_bodies
from node.process import die_with_parent

_VARIANTS = "nnunetv2.training.nnUNetTrainer.variants"
_TRAINER_MODULES = {  # the trainers of the models in node.weights (total, fast, crop, vertebrae_body)
    "nnUNetTrainerNoMirroring": f"{_VARIANTS}.data_augmentation.nnUNetTrainerNoMirroring",
    "nnUNetTrainer_4000epochs_NoMirroring": f"{_VARIANTS}.training_length.nnUNetTrainer_Xepochs_NoMirroring",
    "nnUNetTrainer_DASegOrd0": f"{_VARIANTS}.data_augmentation.nnUNetTrainerDAOrd0",
}
VERTEBRAE_BODY_CLASS = 1  # class_map["vertebrae_body"]: 1 vertebrae_body, 2 intervertebral_discs
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


class Segmenter(Protocol):
    def segment(self, ct: CTVolume) -> Segmentation: ...


def nifti_affine(ct: CTVolume) -> np.ndarray:
    """RAS affine of the CT for a NIfTI whose voxel axes are (c, r, k)."""
    spacing_crk = np.array([ct.spacing[2], ct.spacing[1], ct.spacing[0]])
    affine = np.eye(4)
    affine[:3, :3] = LPS_TO_RAS @ np.asarray(ct.direction, dtype=float) @ np.diag(spacing_crk)
    affine[:3, 3] = LPS_TO_RAS @ np.asarray(ct.origin, dtype=float)
    return affine


def prepare_totalseg_home(home: Path) -> None:
    """Write TotalSegmentator's config.json before it can create one that sends usage statistics."""
    home.mkdir(parents=True, exist_ok=True)
    config = {
        "totalseg_id": "totalseg_paraspinal_node",
        "send_usage_stats": False,
        "prediction_counter": 0,
        "statistics_disclaimer_shown": True,
    }
    (home / "config.json").write_text(json.dumps(config, indent=4), encoding="utf-8")


class TotalSegmentatorSegmenter:
    """task "total" with roi_subset T1–T12 + autochthon, plus the vertebrae_body task when configured."""

    def __init__(self, config: SegmenterConfig) -> None:
        self.config = config

    def segment(self, ct: CTVolume) -> Segmentation:
        self._check_weights()
        with tempfile.TemporaryDirectory(prefix="paraspinal-seg-") as tmp:
            job_dir = Path(tmp)
            self._write_job(job_dir, ct)
            _run_child(job_dir, self.config.timeout_s)
            return _read_result(job_dir, ct)

    def _check_weights(self) -> None:
        missing = missing_models(self.config)
        if missing:
            raise WeightsMissingError(
                f"TotalSegmentator weights not found in {Path(self.config.weights_dir).resolve()} "
                f"(missing {', '.join(missing)}): run `paraspinal-node weights install --from <folder of release zips>` "
                "(`paraspinal-node weights urls` lists the zips to fetch); see README 'Weights'"
            )

    def _write_job(self, job_dir: Path, ct: CTVolume) -> None:
        np.save(job_dir / "ct.npy", ct.hu.transpose(2, 1, 0))  # (c, r, k) as NIfTI wants; written without a copy
        job = {
            "affine": nifti_affine(ct).tolist(),
            "weights_dir": str(Path(self.config.weights_dir).resolve()),
            "device": self.config.device,
            "fast": self.config.fast,
            "vertebral_bodies": runs_vertebral_bodies(self.config),
        }
        (job_dir / "job.json").write_text(json.dumps(job), encoding="utf-8")


_BACKENDS: dict[str, Callable[[SegmenterConfig], Segmenter]] = {
    "totalsegmentator": TotalSegmentatorSegmenter,
    "precomputed": PrecomputedSegmenter,
}


def make_segmenter(config: SegmenterConfig) -> Segmenter:
    try:
        return _BACKENDS[config.backend](config)
    except KeyError:
        raise SegmenterError(
            f"segmenter.backend {config.backend!r} is not available here: use one of {', '.join(sorted(_BACKENDS))}"
        ) from None


# ---------------------------------------------------------------- parent side of the child process


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
            _kill_process_group(process)
        process.join()
    if timed_out:
        raise SegmenterError(
            f"TotalSegmentator did not finish within segmenter.timeout_s = {timeout_s} s and was stopped: "
            "raise timeout_s, or use a GPU (segmenter.device) or fast mode"
        )
    if process.exitcode != 0:
        raise SegmenterError(_failure_reason(job_dir, process.exitcode))


def _kill_process_group(process: multiprocessing.process.BaseProcess) -> None:
    """The child leads its own process group; this also ends nnU-Net workers it may have left."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        if process.is_alive():
            process.kill()


def _failure_reason(job_dir: Path, exitcode: int | None) -> str:
    error_file = job_dir / "error.json"
    if error_file.exists():
        error = json.loads(error_file.read_text(encoding="utf-8"))
        return f"TotalSegmentator failed: {error['type']}: {error['message']}{_hint(error['type'], error['message'])}"
    if exitcode is not None and exitcode < 0:
        how = f"was killed by signal {signal.Signals(-exitcode).name}"
    else:
        how = f"exited with code {exitcode}"
    return (
        f"TotalSegmentator process {how} (a crash or the system running out of memory): "
        "check the node log and memory, or try segmenter.fast = true"
    )


def _hint(kind: str, message: str) -> str:
    if "OutOfMemory" in kind or "out of memory" in message.lower() or kind == "MemoryError":
        return ' (not enough memory for this CT: free the GPU or RAM, or set segmenter.fast = true or segmenter.device = "cpu")'
    return " (the node log has the traceback; `paraspinal-node weights check` verifies the model folders)"


def _read_result(job_dir: Path, ct: CTVolume) -> Segmentation:
    result = json.loads((job_dir / "result.json").read_text(encoding="utf-8"))
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


# ---------------------------------------------------------------- child process


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


def configure_totalsegmentator(weights_dir: Path, home: Path) -> None:
    """Call before TotalSegmentator is imported: weights only from weights_dir, a private home without stats."""
    prepare_totalseg_home(home)
    os.environ["TOTALSEG_HOME_DIR"] = str(home)
    os.environ["TOTALSEG_WEIGHTS_PATH"] = str(weights_dir)
    for name in ("nnUNet_results", "nnUNet_raw", "nnUNet_preprocessed"):
        os.environ[name] = str(weights_dir)


def _register_trainers() -> None:
    """Hand nnU-Net the trainer classes TotalSegmentator's models name, through TotalSegmentator's own table.

    Otherwise nnU-Net imports every trainer module to find them: seconds per model, and some of those
    modules import torchvision's compiled ops, which do not load next to the CPU build of torch.
    """
    from totalsegmentator import nnunet

    for name, module in _TRAINER_MODULES.items():
        nnunet.custom_trainers.setdefault(name, getattr(importlib.import_module(module), name))


def run_totalsegmentator(image, device: str, fast: bool, vertebral_bodies: bool):
    """The node's TotalSegmentator calls on a NIfTI image: (total roi_subset labels, vertebrae_body labels | None)."""
    import torch
    from totalsegmentator.python_api import totalsegmentator

    _register_trainers()
    _check_gpu(device, torch.cuda.device_count() if torch.cuda.is_available() else 0)
    common = {"device": device, "quiet": True, "nr_thr_saving": 1}
    seg = totalsegmentator(image, None, task="total", roi_subset=list(ROI_SUBSET), fast=fast, **common)
    body = totalsegmentator(image, None, task="vertebrae_body", **common) if vertebral_bodies else None
    return seg, body


def _check_gpu(device: str, visible: int) -> None:
    """TotalSegmentator quietly falls back to the CPU (hours per CT); the node refuses instead."""
    if not device.startswith("gpu"):
        return
    index = int(device[4:]) if device.startswith("gpu:") else 0
    if index >= visible:
        raise RuntimeError(
            f'segmenter.device is "{device}" but {visible} CUDA GPU(s) are visible: '
            'set segmenter.device = "cpu" or a visible "gpu:N", or fix the GPU driver'
        )


def _segment_job(job: dict, job_dir: Path) -> None:
    import nibabel as nib

    affine = np.asarray(job["affine"])
    image = nib.Nifti1Image(np.load(job_dir / "ct.npy"), affine)
    seg, body = run_totalsegmentator(image, job["device"], job["fast"], job["vertebral_bodies"])
    _save_labels(seg, affine, job_dir / "labels.npy", lambda data: data)
    if body is not None:
        _save_labels(body, affine, job_dir / "body.npy", lambda data: data == VERTEBRAE_BODY_CLASS)
    version = importlib.metadata.version("TotalSegmentator")
    (job_dir / "result.json").write_text(json.dumps({"totalsegmentator_version": version}), encoding="utf-8")


def _save_labels(image, affine: np.ndarray, path: Path, select: Callable[[np.ndarray], np.ndarray]) -> None:
    if not np.allclose(image.affine, affine, atol=1e-4):
        raise RuntimeError("TotalSegmentator returned a different geometry than the CT it was given")
    np.save(path, select(np.asanyarray(image.dataobj).astype(np.uint8)))
