"""The worker: claims a job, runs the pipeline under a renewed lease, and queues the deliveries.

Outcomes by exception: refused input ends the job as failed at once (retrying cannot help);
missing weights, or a precomputed segmentation that has not arrived, hold it and it is tried
again every `worker.weights_check_s` once nothing is missing; anything else is retried with a
growing delay until `worker.max_attempts`, then the job fails with the last reason. A worker
that dies simply stops renewing its lease, and the job is claimed again when the lease expires.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import signal
import socket
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from node.config import Config
from node.delivery.destinations import configured
from node.durable import make_dirs
from node.errors import InputError
from node.labels import roi_subset
from node.pipeline.run import PipelineResult, run_pipeline
from node.pipeline.segment import Segmenter, close_segmenter, make_segmenter
from node.pipeline.segmentation import NotReadyError, SegmenterError
from node.service.ids import worker_id
from node.service.owner import DatabaseReplaced, OwnerCheck
from node.state.store import Job, JobStore, NewDelivery, WorkerReport, disk_full
from node.weights import missing_models

log = logging.getLogger(__name__)

_MAX_BACKOFF_S = 60.0
HEARTBEAT_S = 10.0  # how often an idle worker tells the status page it is alive

Pipeline = Callable[[Path, Path, Config], PipelineResult]


class Stop(BaseException):
    """Raised in the worker's main thread by SIGTERM, so the running job is handed back at once."""


def deliveries_for(result: PipelineResult, config: Config, out_dir: Path) -> list[NewDelivery]:
    """Every DICOM result to every destination, plus the results folder when one is configured."""
    return [NewDelivery(handler.key, str(f)) for handler in configured(config)
            for f in handler.files_for(result.files, out_dir)]


class Worker:
    """One worker loop; `paraspinal-node worker` runs it in its own process."""

    owner_check: Callable[[], bool] | None = None  # run_worker sets it: work only while serve owns the state dir
    engine: Segmenter | None = None  # run_worker sets it: the long-lived segmenter whose model process restarts count
    _full_backoff_s = 0.0  # while the disk is full: the wait before the next try

    def __init__(self, config: Config, store: JobStore, owner: str, pipeline: Pipeline = run_pipeline,
                 clock: Callable[[], float] = time.time, index: int = 0) -> None:
        self._config = config
        self._index = index
        self._store = store
        self._owner = owner
        self._pipeline = pipeline
        self._clock = clock
        self._next_weights_check = 0.0
        self._next_heartbeat = 0.0
        self._weights_missing = _missing_weights(config)  # refreshed at every weights check
        self._engine_pid: int | None = None
        self._engine_restarts = 0

    def run(self, stop: threading.Event) -> None:
        """Work until `stop` is set; a Stop raised mid-job hands the job back before returning."""
        log.info("event=worker_started worker=%s", self._owner)
        while not stop.is_set():
            if not self._work_once():
                stop.wait(self._full_backoff_s or self._config.worker.poll_s)
        log.info("event=worker_stopped worker=%s", self._owner)

    def _work_once(self) -> bool:
        """run_once while a serve owns the state dir; a full disk pauses it with one line and a growing wait."""
        if self.owner_check is not None and not self.owner_check():
            return False
        try:
            self._heartbeat()
            worked = self.run_once()
        except (OSError, sqlite3.Error) as exc:
            if not disk_full(exc):
                raise
            if not self._full_backoff_s:
                log.error("event=worker_paused worker=%s reason=%s", self._owner, f"disk full: {exc}")
            self._full_backoff_s = min(max(self._full_backoff_s * 2, self._config.worker.poll_s), _MAX_BACKOFF_S)
            return False
        if self._full_backoff_s:
            log.info("event=worker_resumed worker=%s reason=%s", self._owner, "disk space is back")
            self._full_backoff_s = 0.0
        return worked

    def run_once(self) -> bool:
        """Process at most one job; False when there was nothing to do."""
        self._release_held_when_ready()
        job = self._store.claim(self._owner, self._config.worker.lease_s, self._config.worker.max_attempts)
        if job is None:
            return False
        try:
            self._process(job)
        except Stop:
            self._store.release(job.id, self._owner)
            log.info("event=job_released job=%d series=%s reason=\"worker stopping\"", job.id, job.series_uid)
            raise
        return True

    def _process(self, job: Job) -> None:
        """Run the pipeline under a renewed lease, then record the outcome once renewal has stopped."""
        log.info("event=job_started job=%d series=%s attempt=%d worker=%s", job.id, job.series_uid,
                 job.attempts, self._owner)
        out_dir = _fresh_outbox(self._config.storage.job_outbox(job.id), job)
        try:
            with _LeaseKeeper(self._store, job.id, self._owner, self._config.worker.lease_s):
                result = self._pipeline(Path(job.series_dir), out_dir, self._config)
        except InputError as exc:
            self._store.fail(job.id, self._owner, f"refused input: {exc}", retry_at=None)
            log.warning("event=job_failed job=%d series=%s reason=%r", job.id, job.series_uid, f"refused input: {exc}")
        except NotReadyError as exc:  # missing weights, or a precomputed segmentation not there yet
            self._store.hold(job.id, self._owner, str(exc))
            log.warning("event=job_held job=%d series=%s reason=%r", job.id, job.series_uid, str(exc))
        except Exception as exc:  # noqa: BLE001 - any other failure is retried, never lost
            self._retry_or_fail(job, f"{type(exc).__name__}: {exc}")
        else:
            self._complete(job, result, out_dir)

    def _complete(self, job: Job, result: PipelineResult, out_dir: Path) -> None:
        deliveries = deliveries_for(result, self._config, out_dir)
        if self._store.complete(job.id, self._owner, result.measurement.to_dict(), deliveries):
            self._store.record_stage_timings(job.id, job.attempts, result.seconds)
            log.info("event=job_done job=%d series=%s deliveries=%d", job.id, job.series_uid, len(deliveries))
        else:
            log.warning("event=job_lease_lost job=%d series=%s reason=\"another worker took the job\"", job.id,
                        job.series_uid)

    def _retry_or_fail(self, job: Job, error: str) -> None:
        settings = self._config.worker
        if job.attempts >= settings.max_attempts:
            self._store.fail(job.id, self._owner, f"failed after {job.attempts} attempts: {error}", retry_at=None)
            log.error("event=job_failed job=%d series=%s attempts=%d reason=%r", job.id, job.series_uid,
                      job.attempts, error)
            return
        retry_at = self._clock() + settings.retry_delay_s * 2 ** (job.attempts - 1)
        self._store.fail(job.id, self._owner, error, retry_at=retry_at)
        log.warning("event=job_retry job=%d series=%s attempt=%d reason=%r", job.id, job.series_uid,
                    job.attempts, error)

    def _heartbeat(self) -> None:
        """Between jobs, at most every HEARTBEAT_S: the status page shows this worker, its device and weights."""
        self._watch_engine()
        now = self._clock()
        if now < self._next_heartbeat:
            return
        self._next_heartbeat = now + HEARTBEAT_S
        segmenter = self._config.segmenter
        engine = segmenter.engine if segmenter.backend == "totalsegmentator" else segmenter.backend
        self._store.report_worker(WorkerReport(self._owner, socket.gethostname(), os.getpid(), self._index,
                                               segmenter.device, engine, self._weights_missing, self._engine_restarts))

    def _watch_engine(self) -> None:
        """A model process other than the last one seen is a restart (after a crash, a hang or running out of memory)."""
        pid = getattr(self.engine, "pid", None)
        if pid is not None and pid != self._engine_pid:
            if self._engine_pid is not None:
                self._engine_restarts += 1
            self._engine_pid = pid

    def _release_held_when_ready(self) -> None:
        """Held jobs run again once the weights are there; a precomputed job simply looks again."""
        now = self._clock()
        if now < self._next_weights_check:
            return
        self._next_weights_check = now + self._config.worker.weights_check_s
        self._weights_missing = _missing_weights(self._config)
        if not self._weights_missing:
            released = self._store.release_held()
            if released:
                log.info("event=held_jobs_released count=%d reason=\"nothing missing any more, trying again\"", released)


class _LeaseKeeper:
    """Renews the job's lease from a side thread for as long as the pipeline runs."""

    def __init__(self, store: JobStore, job_id: int, owner: str, lease_s: float) -> None:
        self._store, self._job_id, self._owner, self._lease_s = store, job_id, owner, lease_s
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._renew, name=f"lease-{job_id}", daemon=True)

    def __enter__(self) -> _LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._done.set()
        self._thread.join()

    def _renew(self) -> None:
        while not self._done.wait(self._lease_s / 3):
            if not self._store.renew(self._job_id, self._owner, self._lease_s):
                log.warning("event=job_lease_lost job=%d worker=%s", self._job_id, self._owner)
                return


def _missing_weights(config: Config) -> tuple[str, ...]:
    return () if config.segmenter.backend == "precomputed" else tuple(missing_models(config.segmenter))


def _fresh_outbox(job_dir: Path, job: Job) -> Path:
    """An empty folder for this attempt; what an earlier, interrupted attempt left is removed."""
    shutil.rmtree(job_dir, ignore_errors=True)
    out_dir = job_dir / f"attempt-{job.attempts}"
    make_dirs(out_dir)
    return out_dir


def install_stop_handler() -> threading.Event:
    """SIGTERM/SIGINT: set the returned event and interrupt a running job so it is handed back."""
    stop = threading.Event()

    def handler(signum: int, frame: FrameType | None) -> None:
        if stop.is_set():  # a repeated signal (e.g. to the whole process group) must not interrupt the hand-back
            return
        stop.set()
        raise Stop(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a closing terminal must not cost the running job
    return stop


def run_worker(config: Config, store: JobStore, index: int = 0) -> int:
    """The `worker` command: run until SIGTERM, then exit 0 with the queue consistent."""
    from dicom_sr.results import warm_up

    stop = install_stop_handler()
    warm_up()
    segmenter = start_segmenter(config)
    try:
        worker = Worker(config, store, worker_id(index), functools.partial(run_pipeline, segmenter=segmenter),
                        index=index)
        worker.owner_check = OwnerCheck(config.storage.state_dir, config.storage.database)
        worker.engine = segmenter
        worker.run(stop)
    except Stop:
        pass
    except DatabaseReplaced as exc:
        log.error("event=worker_exiting worker=%s reason=%s", worker_id(index), str(exc))
        return 1
    finally:
        close_segmenter(segmenter)  # the model process ends with the worker, and its GPU memory is freed
    return 0


def start_segmenter(config: Config) -> Segmenter:
    """This worker's segmenter for every job; a resident engine loads its models now, not on the first job.

    A start that fails (weights not installed yet, no GPU) is logged; each job then tries again
    and fails or is held with the reason.
    """
    segmenter = make_segmenter(config.segmenter, roi_subset(config.biomarkers.liver))
    start = getattr(segmenter, "start", None)
    if start is not None:
        try:
            start()
        except SegmenterError as exc:
            log.warning("event=engine_not_started reason=%r", str(exc))
    return segmenter
