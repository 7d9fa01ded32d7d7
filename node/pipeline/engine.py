"""The resident engine: one long-lived model process per device, supervised from the worker.

The process loads each nnU-Net model once and serves job after job (node.pipeline.model.engine_child).
What a fresh process per job gave us is kept: a crash, an out-of-memory error or a timeout fails
that one job with its reason, and the process is ended (so its GPU memory is freed) and started
again for the next job; a process that does not answer within segmenter.timeout_s is killed.
It never falls back to the CPU: a missing GPU is an error the job reports.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import multiprocessing.connection
import tempfile
import threading
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path

import numpy as np

from node.config import SegmenterConfig
from node.labels import ROI_SUBSET
from node.pipeline.ct import CTVolume
from node.pipeline.model.engine_child import Done, EngineJob, EngineSpec, Failed, Ready, engine_main
from node.pipeline.model_process import check_weights, error_reason, exit_reason, kill_process_group, nifti_affine
from node.pipeline.segmentation import Segmentation, SegmenterError
from node.weights import runs_vertebral_bodies

log = logging.getLogger(__name__)

WHAT = "Segmentation engine"
STOP_GRACE_S = 2.0


class ResidentEngine:
    """Segmenter whose model process outlives the job; thread-safe, one job at a time.

    `time_forward` makes the process time the networks' forward passes (benchmarks); the last
    job's figures are then in `last_forward_s` and `last_stages` (and, on a GPU, `last_peak_gpu_bytes`).
    """

    def __init__(self, config: SegmenterConfig, time_forward: bool = False, roi_subset: tuple[str, ...] = ROI_SUBSET) -> None:
        self.config = config
        self.roi_subset = roi_subset
        self.time_forward = time_forward
        self.last_forward_s: float | None = None
        self.last_stages: dict[str, float] = {}
        self.last_peak_gpu_bytes: int | None = None
        self._lock = threading.Lock()
        self._process: multiprocessing.process.BaseProcess | None = None
        self._conn: multiprocessing.connection.Connection | None = None
        self._spec: EngineSpec | None = None
        self._version: str | None = None
        self._jobs = itertools.count(1)
        self._home = tempfile.TemporaryDirectory(prefix="paraspinal-engine-")

    @property
    def pid(self) -> int | None:
        """The model process, while one runs."""
        return self._process.pid if self._process is not None and self._process.is_alive() else None

    def start(self) -> None:
        """Start the model process and load the models now rather than on the first job (worker start)."""
        check_weights(self.config)
        with self._lock:
            self._ensure_running(self._wanted_spec())

    def segment(self, ct: CTVolume) -> Segmentation:
        check_weights(self.config)
        with self._lock:
            self._ensure_running(self._wanted_spec())
            try:
                return self._run(ct)
            except BaseException:  # failed, or interrupted (worker stopping): never reuse a process mid-job
                self._stop()  # a fresh process for the next job, and this one's memory back
                raise

    def segment_mr(self, image: CTVolume) -> Segmentation:
        from node.pipeline.segment import MR_NOT_YET  # segment imports this module

        raise SegmenterError(MR_NOT_YET)

    def close(self) -> None:
        with self._lock:
            self._stop()
        self._home.cleanup()

    def _wanted_spec(self) -> EngineSpec:
        return EngineSpec(
            weights_dir=Path(self.config.weights_dir).resolve(), home=Path(self._home.name), device=self.config.device,
            fast=self.config.fast, vertebral_bodies=runs_vertebral_bodies(self.config), roi_subset=self.roi_subset,
            time_forward=self.time_forward)

    def _ensure_running(self, spec: EngineSpec) -> None:
        if self._process is not None and self._process.is_alive() and spec == self._spec:
            return
        self._stop()
        context = multiprocessing.get_context("spawn")
        parent_end, child_end = context.Pipe()
        # Daemonic: an engine its owner forgot to close ends with the owner's interpreter instead of
        # holding it at exit. It starts no processes of its own (no nnU-Net worker pools).
        process = context.Process(target=engine_main, args=(child_end, spec), name="segmentation-engine",
                                  daemon=True)
        process.start()
        child_end.close()
        self._process, self._conn, self._spec = process, parent_end, spec
        try:
            reply = self._receive(self.config.start_timeout_s, "segmenter.start_timeout_s", "start")
        except SegmenterError:
            self._stop()
            raise
        if isinstance(reply, Failed):
            self._stop()
            raise SegmenterError(error_reason(f"{WHAT} start", reply.kind, reply.message))
        assert isinstance(reply, Ready)
        self._version = reply.version
        log.info("event=engine_started pid=%d device=%s load_s=%.1f", process.pid, reply.device, reply.load_s)

    def _run(self, ct: CTVolume) -> Segmentation:
        hu = np.ascontiguousarray(ct.hu)
        ct_memory = SharedMemory(create=True, size=max(hu.nbytes, 1))
        out_memory = SharedMemory(create=True, size=max(2 * hu.size, 1))
        try:
            np.ndarray(hu.shape, dtype=hu.dtype, buffer=ct_memory.buf)[...] = hu
            job = EngineJob(next(self._jobs), ct_memory.name, out_memory.name, hu.shape, hu.dtype.str,
                            tuple(tuple(row) for row in nifti_affine(ct).tolist()))
            try:
                self._conn.send(job)
            except OSError:
                pass  # the process has just died: _receive says how
            reply = self._receive(self.config.timeout_s, "segmenter.timeout_s", "finish")
            if isinstance(reply, Failed):
                raise SegmenterError(error_reason(WHAT, reply.kind, reply.message))
            assert isinstance(reply, Done) and reply.job_id == job.job_id
            labels = np.ndarray(hu.shape, dtype=np.uint8, buffer=out_memory.buf).copy()
            body = None
            if reply.has_body:
                body = np.ndarray(hu.shape, dtype=np.uint8, buffer=out_memory.buf, offset=hu.size).astype(bool)
        finally:
            for memory in (ct_memory, out_memory):
                memory.close()
                memory.unlink()
        self.last_forward_s, self.last_stages, self.last_peak_gpu_bytes = reply.forward_s, reply.stages, reply.peak_gpu_bytes
        return Segmentation(labels=labels, body=body, totalsegmentator_version=self._version)

    def _receive(self, timeout_s: float, option: str, doing: str) -> Ready | Done | Failed:
        """The process's next reply; a timeout or its death raise SegmenterError with the reason."""
        ready = multiprocessing.connection.wait([self._conn, self._process.sentinel], timeout_s)
        if self._conn in ready:
            try:
                return self._conn.recv()
            except EOFError:
                pass  # the process died; its exit code says how
        if not ready:
            self._stop()
            raise SegmenterError(
                f"{WHAT} did not {doing} within {option} = {timeout_s} s and was stopped: "
                "raise the timeout, or use a GPU (segmenter.device) or fast mode")
        self._process.join(10)
        raise SegmenterError(exit_reason(WHAT, self._process.exitcode))

    def _stop(self) -> None:
        """End the model process (and anything it started); its memory, GPU memory included, is freed."""
        if self._conn is not None:
            self._conn.close()  # an idle process sees the end of the pipe and leaves by itself
        if self._process is not None:
            self._process.join(STOP_GRACE_S)
            if self._process.exitcode is None:
                kill_process_group(self._process)
            self._process.join()
            log.info("event=engine_stopped pid=%d exitcode=%s", self._process.pid, self._process.exitcode)
        self._process = self._conn = self._spec = None
