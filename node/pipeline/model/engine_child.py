"""The resident engine's model process: loads every nnU-Net model once, keeps it on the device, serves jobs.

The parent (node.pipeline.engine) sends one `EngineJob` at a time over a pipe; the image and the
labels travel in shared memory. Each job runs TotalSegmentator's roi_subset pipeline in memory
(node.pipeline.model.roi_pipeline) with the loaded predictors, so a job costs no process start, no
model loading, no NIfTI files and no nnU-Net worker pools.
"""

from __future__ import annotations

import importlib.metadata
import multiprocessing
import os
import signal
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path

import numpy as np

from node.labels import MR_ROI_SUBSET
from node.pipeline.model.env import check_gpu, configure_totalsegmentator, register_trainers, time_forward_passes
from node.process import die_with_parent
from node.weights import CT_ONLY, Model

VERTEBRAE_BODY_CLASS = 1  # class_map["vertebrae_body"]: 1 vertebrae_body, 2 intervertebral_discs


@dataclass(frozen=True)
class EngineSpec:
    """What the model process loads; a different spec means a new process."""

    weights_dir: Path
    home: Path  # TotalSegmentator's private home (config.json without usage statistics)
    device: str  # cpu, gpu or gpu:N
    fast: bool
    vertebral_bodies: bool
    roi_subset: tuple[str, ...]
    time_forward: bool = False
    modalities: tuple[str, ...] = CT_ONLY  # whose models it loads: CT (total, vertebrae_body), MR (total_mr, vertebrae_mr)


@dataclass(frozen=True)
class EngineJob:
    """One image in shared memory ([k, r, c], like CTVolume.hu) and where the labels go: labels, then
    the body (CT) or the discs (MR)."""

    job_id: int
    ct_name: str
    out_name: str
    shape: tuple[int, int, int]
    dtype: str
    affine: tuple[tuple[float, ...], ...]  # RAS affine of the (c, r, k) NIfTI view
    modality: str = "CT"


@dataclass(frozen=True)
class Ready:
    version: str
    device: str
    load_s: float


@dataclass(frozen=True)
class Done:
    job_id: int
    has_body: bool
    forward_s: float | None
    stages: dict[str, float] = field(default_factory=dict)
    peak_gpu_bytes: int | None = None  # torch's peak allocation during the job, on a GPU


@dataclass(frozen=True)
class Failed:
    job_id: int | None  # None: the process could not start
    kind: str
    message: str


def engine_main(conn: Connection, spec: EngineSpec) -> None:
    """Entry point of the model process: Ready (or Failed) once the models are loaded, then one reply per job."""
    os.setpgid(0, 0)
    die_with_parent(signal.SIGKILL)  # a node that dies must not leave a model holding the GPU
    try:
        started = time.perf_counter()
        engine = _Engine(spec)
        conn.send(Ready(importlib.metadata.version("TotalSegmentator"), str(engine.device),
                        time.perf_counter() - started))
    except BaseException as exc:  # noqa: BLE001 - the parent must learn why the engine could not start
        traceback.print_exc()
        conn.send(_failed(None, exc))
        raise SystemExit(1) from None
    while True:
        try:
            job = conn.recv()
        except EOFError:  # the parent closed the pipe: stop
            return
        try:
            conn.send(engine.run(job))
        except Exception as exc:  # noqa: BLE001 - the job fails with its reason; the parent restarts us
            traceback.print_exc()
            conn.send(_failed(job.job_id, exc))


def _failed(job_id: int | None, exc: BaseException) -> Failed:
    lines = str(exc).strip().splitlines()
    return Failed(job_id, type(exc).__name__, lines[0] if lines else "")


class _Stages:
    """Seconds per pipeline stage of the current job (benchmarks print them)."""

    def __init__(self, device) -> None:
        self.device = device
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                import torch

                torch.cuda.synchronize(self.device)
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started


class _Engine:
    def __init__(self, spec: EngineSpec) -> None:
        configure_totalsegmentator(spec.weights_dir, spec.home)
        import torch

        from node.pipeline.model.roi_pipeline import RoiPipeline, mr_steps_for, steps_for, tile_step_size

        register_trainers()
        check_gpu(spec.device, torch.cuda.device_count() if torch.cuda.is_available() else 0)
        self.spec = spec
        self.device = _torch_device(spec.device)
        if self.device.type == "cpu":  # as nnUNetv2_predict sets it, so that CPU results are TotalSegmentator's
            torch.set_num_threads(multiprocessing.cpu_count())
        # On a GPU torch keeps its default threads (nnUNetv2_predict sets 1): nnU-Net's export
        # (softmax, argmax, resampling back) runs in this process here, not in its worker pool.
        self.clock = time_forward_passes() if spec.time_forward else None
        self.stages = _Stages(self.device)
        self.predictors = {}
        steps = steps_for(spec.fast, spec.vertebral_bodies, spec.roi_subset) if "CT" in spec.modalities else []
        steps += mr_steps_for(spec.fast, MR_ROI_SUBSET) if "MR" in spec.modalities else []
        for step in steps:
            for model in step.models:
                self.predictors[model.task_id] = self._load(model, tile_step_size(step.task_name))
        self.pipeline = RoiPipeline(self._predict, _resampler(self.device, self.stages))

    def _load(self, model: Model, step_size: float):
        """nnUNetv2_predict's predictor for this model, made once; its weights stay on the device."""
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        predictor = nnUNetPredictor(tile_step_size=step_size, use_gaussian=True, use_mirroring=False,
                                    perform_everything_on_device=self.device.type == "cuda", device=self.device, verbose=False,
                                    verbose_preprocessing=False, allow_tqdm=False)
        predictor.initialize_from_trained_model_folder(str(model.model_dir(self.spec.weights_dir)), use_folds=[0],
                                                       checkpoint_name="checkpoint_final.pth")
        predictor.network.to(self.device)
        predictor.list_of_parameters = [{name: tensor.to(self.device) for name, tensor in params.items()}
                                        for params in predictor.list_of_parameters]
        return predictor

    def _predict(self, model: Model, data_zyx: np.ndarray, spacing_zyx: tuple[float, float, float]) -> np.ndarray:
        with self.stages.stage(f"model {model.task_id}"):
            return self.predictors[model.task_id].predict_single_npy_array(data_zyx, {"spacing": list(spacing_zyx)})

    def run(self, job: EngineJob) -> Done:
        import nibabel as nib
        import torch

        self.stages.seconds = {}
        forward_before = self.clock.seconds if self.clock else 0.0
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        ct_memory, out_memory = _attach(job.ct_name), _attach(job.out_name)
        try:
            hu = np.ndarray(job.shape, dtype=np.dtype(job.dtype), buffer=ct_memory.buf)
            image = nib.Nifti1Image(hu.transpose(2, 1, 0), np.array(job.affine))  # (c, r, k), as the reference passes it
            size = int(np.prod(job.shape))
            labels = np.ndarray(job.shape, dtype=np.uint8, buffer=out_memory.buf)
            body = np.ndarray(job.shape, dtype=np.uint8, buffer=out_memory.buf, offset=size)
            has_body = self._segment(job.modality, image, labels, body)
            del hu, labels, body, image  # no view may outlive the shared memory
        finally:
            ct_memory.close()
            out_memory.close()
        forward_s = self.clock.seconds - forward_before if self.clock else None
        peak = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None
        return Done(job.job_id, has_body, forward_s, dict(self.stages.seconds), peak)

    def _segment(self, modality: str, image, labels: np.ndarray, second: np.ndarray) -> bool:
        """Fill labels and the second plane (body on CT, discs on MR); True when the CT's body was run."""
        from node.pipeline.model.mr_labels import node_mr_labels  # TotalSegmentator: only once configured
        from node.pipeline.model.roi_pipeline import TOTAL_MR

        if modality == "MR":
            total_mr = self.pipeline.total(image, self.spec.fast, MR_ROI_SUBSET, TOTAL_MR)
            node_labels, discs = node_mr_labels(total_mr, self.pipeline.vertebrae_mr(image))
            labels[...] = node_labels.transpose(2, 1, 0)
            second[...] = discs.transpose(2, 1, 0)
            return False
        labels[...] = self.pipeline.total(image, self.spec.fast, self.spec.roi_subset).transpose(2, 1, 0)
        if self.spec.vertebral_bodies:
            second[...] = (self.pipeline.vertebrae_body(image) == VERTEBRAE_BODY_CLASS).transpose(2, 1, 0)
        return self.spec.vertebral_bodies


def _attach(name: str) -> SharedMemory:
    """Map the parent's block. The parent owns and unlinks it; this process shares the parent's
    resource tracker, where attaching registers the same name again (a set), so nothing leaks."""
    return SharedMemory(name=name)


def _torch_device(device: str):
    import torch

    if device == "cpu":
        return torch.device("cpu")
    return torch.device(f"cuda:{device[4:] if device.startswith('gpu:') else 0}")


def _resampler(device, stages: _Stages):
    """TotalSegmentator's own change_spacing on the CPU (labels identical); torch on a GPU."""
    from totalsegmentator.resampling import change_spacing

    resample = change_spacing
    if device.type == "cuda":
        from node.pipeline.model.gpu_resample import change_spacing_on

        def resample(*args, **kwargs):
            return change_spacing_on(device, *args, **kwargs)

    def timed(*args, **kwargs):
        with stages.stage("resample"):
            return resample(*args, **kwargs)

    return timed
