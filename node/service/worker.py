"""The worker: claims a job, runs the pipeline under a renewed lease, and queues the deliveries.

Outcomes by exception: refused input ends the job as failed at once (retrying cannot help);
missing weights, or a precomputed segmentation that has not arrived, hold it and it is tried
again every `worker.weights_check_s` once nothing is missing; anything else is retried with a
growing delay until `worker.max_attempts`, then the job fails with the last reason. A worker
that dies simply stops renewing its lease, and the job is claimed again when the lease expires.

With `worker.cpu_threads_per_engine` above 1 the worker overlaps jobs (`_Overlap`): while its one
engine segments job N, CPU threads load job N+1 and measure and encode job N-1. Every job it holds
keeps its lease renewed wherever it waits, and SIGTERM hands back every one not finished.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TypeVar

from node.config import Config
from node.delivery.destinations import DICOM_RESULTS, DicomPeer, configured
from node.durable import make_dirs
from node.errors import InputError
from node.labels import roi_subset
from node.pipeline.segment import Segmenter, close_segmenter, make_segmenter
from node.pipeline.segmentation import NotReadyError, SegmenterError
from node.priors.lookup import PriorSources
from node.run import PipelineResult, Prepared, Segmented, Stages
from node.service.dicomweb_client import ClientSettings, LeaseLost, fetch_series, store_results
from node.service.ids import worker_id
from node.service.owner import DatabaseReplaced, OwnerCheck
from node.state.store import Job, JobStore, NewDelivery, SeriesRecord, WorkerReport, disk_full
from node.weights import missing_models

log = logging.getLogger(__name__)

_MAX_BACKOFF_S = 60.0
HEARTBEAT_S = 10.0  # how often an idle worker tells the status page it is alive
PAIRED_MODALITIES = ("MR",)  # series loaded with partners of the same study (Dixon water and fat)

Pipeline = Callable[[Path, Path, Config], PipelineResult]  # a whole pipeline in one call: runs one job at a time
T = TypeVar("T")


class Stop(BaseException):
    """Raised in the worker's main thread by SIGTERM, so the running job is handed back at once."""


@dataclass(eq=False)
class _Claimed:
    """A job this worker holds: its outbox, its lease renewal, and what its stages have made so far.

    `remote_url` is the DICOMweb of the serve holding the series when it is not on this host: the
    CT is fetched from there and the results go back there, from and to `out_dir`'s scratch space.
    """

    job: Job
    out_dir: Path
    lease: _LeaseKeeper
    remote_url: str | None = None
    prepared: Prepared | None = None
    segmented: Segmented | None = None


def deliveries_for(result: PipelineResult, config: Config, out_dir: Path, withheld: bool = False) -> list[NewDelivery]:
    """Every DICOM result to every destination, plus the results folder when one is configured;
    `withheld` (a series backfilled with send_results off): the results folder only."""
    return [NewDelivery(handler.key, str(f)) for handler in configured(config)
            if not (withheld and isinstance(handler, DicomPeer)) for f in handler.files_for(result.files, out_dir)]


class Worker:
    """One worker loop; `paraspinal-node worker` runs it in its own process.

    `pipeline` is the stages of run_pipeline (the default, on a one-off segmenter per job) or, for
    tests, one whole-pipeline callable, which runs one job at a time.
    """

    owner_check: Callable[[], bool] | None = None  # run_worker sets it: work only while serve owns the state dir
    engine: Segmenter | None = None  # run_worker sets it: the long-lived segmenter whose model process restarts count
    _full_backoff_s = 0.0  # while the disk is full: the wait before the next try

    def __init__(self, config: Config, store: JobStore, owner: str, pipeline: Stages | Pipeline | None = None,
                 clock: Callable[[], float] = time.time, index: int = 0) -> None:
        self._config = config
        self._index = index
        self._store = store
        self._owner = owner
        whole = pipeline is not None and not isinstance(pipeline, Stages)
        self._stages = pipeline if isinstance(pipeline, Stages) else Stages.with_segmenter(
            priors=PriorSources.from_config(config, store))
        self._whole: Pipeline | None = pipeline if whole else None  # a whole pipeline cannot overlap jobs
        self._clock = clock
        self._next_weights_check = 0.0
        self._next_heartbeat = 0.0
        self._weights_missing = _missing_weights(config)  # refreshed at every weights check
        self._engine_pid: int | None = None
        self._engine_restarts = 0
        self._dicomweb: ClientSettings | None = None

    def run(self, stop: threading.Event) -> None:
        """Work until `stop` is set; a Stop raised mid-job hands back every job held before returning."""
        log.info("event=worker_started worker=%s", self._owner)
        threads = self._config.worker.cpu_threads_per_engine
        if threads > 1 and self._whole is None:
            _Overlap(self, stop, threads).run()
        else:
            while not stop.is_set():
                if not self._work_once():
                    stop.wait(self._idle_wait())
        log.info("event=worker_stopped worker=%s", self._owner)

    def _idle_wait(self) -> float:
        return self._full_backoff_s or self._config.worker.poll_s

    def _work_once(self) -> bool:
        return bool(self._guarded(self.run_once))

    def _guarded(self, action: Callable[[], T]) -> T | None:
        """`action` while a serve owns the state dir (else None), after the heartbeat; see _paused_on_full_disk."""
        if self.owner_check is not None and not self.owner_check():
            return None

        def beat_then_act() -> T:
            self._heartbeat()
            return action()

        return self._paused_on_full_disk(beat_then_act)

    def _paused_on_full_disk(self, action: Callable[[], T]) -> T | None:
        """A full disk pauses the worker with one line and a growing wait (None); it resumes with one line."""
        try:
            value = action()
        except (OSError, sqlite3.Error) as exc:
            if not disk_full(exc):
                raise
            if not self._full_backoff_s:
                log.error("event=worker_paused worker=%s reason=%s", self._owner, f"disk full: {exc}")
            self._full_backoff_s = min(max(self._full_backoff_s * 2, self._config.worker.poll_s), _MAX_BACKOFF_S)
            return None
        if self._full_backoff_s:
            log.info("event=worker_resumed worker=%s reason=%s", self._owner, "disk space is back")
            self._full_backoff_s = 0.0
        return value

    def run_once(self) -> bool:
        """Process at most one job, every stage in this thread; False when there was nothing to do."""
        claimed = self._claim()
        if claimed is None:
            return False
        try:
            if self._whole is not None:
                self._run_whole(claimed, self._whole)
            elif self._prepare(claimed) and self._segment(claimed):
                self._finish(claimed)
        except Stop:
            self._hand_back(claimed)
            raise
        return True

    def _claim(self) -> _Claimed | None:
        """The next runnable job with a fresh outbox, its lease renewed from now until its outcome is recorded."""
        self._release_held_when_ready()
        job = self._store.claim(self._owner, self._config.worker.lease_s, self._config.worker.max_attempts)
        if job is None:
            return None
        log.info("event=job_started job=%d series=%s attempt=%d worker=%s", job.id, job.series_uid,
                 job.attempts, self._owner)
        try:
            remote_url = self._remote_url(job)
            if remote_url is None:
                out_dir = _fresh_outbox(self._config.storage.job_outbox(job.id), job)
            else:
                out_dir = _fresh_outbox(self._config.storage.state_dir / "scratch" / f"job-{job.id}", job) / "results"
        except BaseException:
            with contextlib.suppress(OSError, sqlite3.Error):  # a full disk may refuse this too: the lease then expires
                self._store.release(job.id, job.token)
            raise
        lease = _LeaseKeeper(self._store, job, self._config.worker.lease_s)
        lease.start()
        return _Claimed(job, out_dir, lease, remote_url)

    def _remote_url(self, job: Job) -> str | None:
        """The DICOMweb URL to fetch the series from, or None to read serve's spool on this host."""
        series = self._store.get_series(job.series_uid)
        serve = self._store.get_serve(series.serve) if series is not None and series.serve else None
        url = serve.dicomweb_url if serve is not None else ""
        local = serve is None or serve.host == socket.gethostname()
        if url and (self._config.worker.series_source == "dicomweb" or not local or not Path(job.series_dir).is_dir()):
            return url
        if not Path(job.series_dir).is_dir():
            holder = series.serve if series is not None and series.serve else "its serve"
            raise FileNotFoundError(f"series folder {job.series_dir} is not on this host and {holder} offers no "
                                    "DICOMweb: set [dicomweb] enabled and url on that serve")
        return None

    def _prepare(self, claimed: _Claimed) -> bool:
        """Load the CT (fetched first when remote); False when the job has ended (failed, held or queued for a retry)."""
        claimed.prepared = self._attempt(claimed, lambda: self._load(claimed))
        return claimed.prepared is not None

    def _load(self, claimed: _Claimed) -> Prepared:
        if claimed.remote_url is None:
            return self._stages.prepare(Path(claimed.job.series_dir))
        study = claimed.out_dir.parent / "study"  # laid out as serve's spool: partners beside the series
        series = self._store.get_series(claimed.job.series_uid)
        started = time.perf_counter()
        for one in [series, *self._partners(series)]:
            fetch_series(claimed.remote_url, claimed.job, one, study / one.series_uid, self._client_settings())
        fetched_s = time.perf_counter() - started
        try:
            prepared = self._stages.prepare(study / series.series_uid)
        finally:
            shutil.rmtree(study, ignore_errors=True)
        prepared.seconds["fetch"] = fetched_s
        return prepared

    def _partners(self, series: SeriesRecord) -> list[SeriesRecord]:
        """The other series of the study the loader may pair with this one (a Dixon water series' fat partner)."""
        if series.modality not in PAIRED_MODALITIES:
            return []
        return [other for other in self._store.study_series(series.study_uid)
                if other.series_uid != series.series_uid and other.modality == series.modality
                and other.serve == series.serve]

    def _client_settings(self) -> ClientSettings:
        """Read once: the token (and certificates) for every serve's DICOMweb; a missing token file fails the job."""
        if self._dicomweb is None:
            self._dicomweb = ClientSettings.from_config(self._config.dicomweb)
        return self._dicomweb

    def _segment(self, claimed: _Claimed) -> bool:
        """Run the engine on the loaded CT; False when the job has ended."""
        assert claimed.prepared is not None
        prepared, claimed.prepared = claimed.prepared, None  # the CT goes on in `segmented`
        claimed.segmented = self._attempt(claimed, lambda: self._stages.segment(prepared, self._config))
        return claimed.segmented is not None

    def _finish(self, claimed: _Claimed) -> bool:
        """Measure, encode, then record completion and deliveries; True when the job is done."""
        assert claimed.segmented is not None
        segmented, claimed.segmented = claimed.segmented, None
        result = self._attempt(claimed, lambda: self._stages.finish(segmented, claimed.out_dir, self._config))
        return result is not None and self._complete(claimed, result)

    def _run_whole(self, claimed: _Claimed, pipeline: Pipeline) -> None:
        result = self._attempt(claimed, lambda: pipeline(Path(claimed.job.series_dir), claimed.out_dir, self._config))
        if result is not None:
            self._complete(claimed, result)

    def _attempt(self, claimed: _Claimed, stage: Callable[[], T]) -> T | None:
        """Run one stage; when it raises, record the outcome once renewal has stopped and return None."""
        job = claimed.job
        try:
            return stage()
        except InputError as exc:
            claimed.lease.stop()
            self._store.fail(job.id, job.token, f"refused input: {exc}", retry_in_s=None)
            log.warning("event=job_failed job=%d series=%s reason=%r", job.id, job.series_uid, f"refused input: {exc}")
        except LeaseLost as exc:  # serve says another attempt holds the job now: drop it, record nothing
            claimed.lease.stop()
            log.warning("event=job_lease_lost job=%d series=%s token=%d reason=%r", job.id, job.series_uid, job.token,
                        str(exc))
        except NotReadyError as exc:  # missing weights, or a precomputed segmentation not there yet
            claimed.lease.stop()
            self._store.hold(job.id, job.token, str(exc))
            log.warning("event=job_held job=%d series=%s reason=%r", job.id, job.series_uid, str(exc))
        except Exception as exc:  # noqa: BLE001 - any other failure is retried, never lost
            claimed.lease.stop()
            self._retry_or_fail(job, f"{type(exc).__name__}: {exc}")
        return None

    def _complete(self, claimed: _Claimed, result: PipelineResult) -> bool:
        job = claimed.job
        if claimed.remote_url is not None:
            if self._attempt(claimed, lambda: self._return_results(claimed, result)) is None:
                return False
            deliveries: list[NewDelivery] = []  # serve staged them when it stored the results
        else:
            deliveries = deliveries_for(result, self._config, claimed.out_dir,
                                        self._store.results_withheld(job.series_uid))
        claimed.lease.stop()
        done = self._store.complete(job.id, job.token, result.measurement.to_dict(), deliveries)
        if claimed.remote_url is not None:
            shutil.rmtree(claimed.out_dir.parent, ignore_errors=True)
        if done:
            self._store.record_stage_timings(job.id, job.attempts, result.seconds)
            log.info("event=job_done job=%d series=%s deliveries=%d", job.id, job.series_uid, len(deliveries))
            return True
        log.warning("event=job_lease_lost job=%d series=%s reason=\"another worker took the job\"", job.id,
                    job.series_uid)
        return False

    def _return_results(self, claimed: _Claimed, result: PipelineResult) -> bool:
        """STOW-RS the SEG, SR and key image to the serve holding the series: it stores them and stages their deliveries."""
        started = time.perf_counter()
        files = [result.files[name] for name in DICOM_RESULTS if name in result.files]
        log.info("event=results_storing job=%d token=%d files=%d serve=%s", claimed.job.id, claimed.job.token,
                 len(files), claimed.remote_url)
        store_results(claimed.remote_url, claimed.job, files, self._client_settings())
        result.seconds["stow"] = time.perf_counter() - started
        return True

    def _hand_back(self, claimed: _Claimed) -> None:
        """The worker is stopping: the job is queued again and the attempt does not count."""
        claimed.lease.stop()
        self._store.release(claimed.job.id, claimed.job.token)
        log.info("event=job_released job=%d series=%s reason=\"worker stopping\"", claimed.job.id,
                 claimed.job.series_uid)

    def _retry_or_fail(self, job: Job, error: str) -> None:
        settings = self._config.worker
        if job.attempts >= settings.max_attempts:
            self._store.fail(job.id, job.token, f"failed after {job.attempts} attempts: {error}", retry_in_s=None)
            log.error("event=job_failed job=%d series=%s attempts=%d reason=%r", job.id, job.series_uid,
                      job.attempts, error)
            return
        self._store.fail(job.id, job.token, error, retry_in_s=settings.retry_delay_s * 2 ** (job.attempts - 1))
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
    """Renews the job's lease from a side thread from its claim until its outcome is recorded."""

    def __init__(self, store: JobStore, job: Job, lease_s: float) -> None:
        self._store, self._job, self._lease_s = store, job, lease_s
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._renew, name=f"lease-{job.id}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Idempotent: the outcome is recorded only once renewal has stopped."""
        self._done.set()
        if self._thread.is_alive():
            self._thread.join()

    def _renew(self) -> None:
        while not self._done.wait(self._lease_s / 3):
            if not self._store.renew(self._job.id, self._job.token, self._lease_s):
                log.warning("event=job_lease_lost job=%d token=%d worker=%s", self._job.id, self._job.token,
                            self._job.lease_owner)
                return


class _Overlap:
    """One worker's jobs in three stages: CPU threads prepare and finish, the calling thread runs the engine.

    The engine thread is the one SIGTERM interrupts (the main thread), as it is without overlap.
    At most one job is prepared ahead of the engine: more would only hold leases other workers
    could use. `_held` lists every job claimed and not yet ended; whatever is in it when the
    worker stops is handed back, after the CPU threads have finished their current step.
    """

    def __init__(self, worker: Worker, stop: threading.Event, threads: int) -> None:
        self._worker, self._stop, self._threads = worker, stop, threads
        self._cond = threading.Condition()
        self._ready: deque[_Claimed] = deque()  # prepared, waiting for the engine
        self._segmented: deque[_Claimed] = deque()  # waiting to be measured and encoded
        self._held: list[_Claimed] = []
        self._preparing = False  # one claim-and-load at a time
        self._next_claim = 0.0  # time.monotonic() of the next claim while there is nothing to do
        self._closing = False
        self._fault: BaseException | None = None

    def run(self) -> None:
        threads = [threading.Thread(target=self._cpu_loop, name=f"cpu-{n}", daemon=True) for n in range(self._threads)]
        for thread in threads:
            thread.start()
        try:
            while not self._stop.is_set():
                claimed = self._next_for_engine()
                if claimed is not None:
                    self._settle(claimed, self._worker._segment, self._segmented)
        finally:
            self._close(threads)

    def _next_for_engine(self) -> _Claimed | None:
        with self._cond:
            if self._fault is not None:
                raise self._fault
            if not self._ready:
                self._cond.wait(self._worker._config.worker.poll_s)
                return None
            self._cond.notify_all()  # the engine took the job ready for it: time to load the next one
            return self._ready.popleft()

    def _settle(self, claimed: _Claimed, stage: Callable[[_Claimed], bool], then: deque[_Claimed] | None) -> None:
        """Run `stage`; the job goes on to `then`, or has ended. A full disk that refused the record keeps it
        held, in no queue: it is handed back when the worker stops, or its lease expires."""
        went_on = self._worker._paused_on_full_disk(lambda: stage(claimed))
        if went_on is not None:
            self._after(claimed, then if went_on else None)

    def _after(self, claimed: _Claimed, queue: deque[_Claimed] | None) -> None:
        """The job goes on to `queue`, or has ended (None) and is no longer held."""
        with self._cond:
            if queue is not None:
                queue.append(claimed)
            else:
                self._held.remove(claimed)
            self._cond.notify_all()

    def _cpu_loop(self) -> None:
        try:
            while (work := self._next_cpu_work()) is not None:
                work()
        except BaseException as exc:  # noqa: BLE001 - the engine thread raises it, as a worker without overlap would
            with self._cond:
                self._fault = self._fault or exc
                self._closing = True
                self._cond.notify_all()

    def _next_cpu_work(self) -> Callable[[], None] | None:
        """Finishing comes first (it frees memory and delivers); then the next claim when the engine has none ready."""
        with self._cond:
            while not self._closing:
                if self._segmented:
                    claimed = self._segmented.popleft()
                    return lambda: self._finish(claimed)
                if not self._preparing and not self._ready:
                    wait = self._next_claim - time.monotonic()
                    if wait <= 0:
                        self._preparing = True
                        return self._claim_and_prepare
                    self._cond.wait(wait)
                else:
                    self._cond.wait()
            return None

    def _claim_and_prepare(self) -> None:
        claimed = self._worker._guarded(self._worker._claim)
        with self._cond:
            if claimed is None:
                self._preparing = False
                self._next_claim = time.monotonic() + self._worker._idle_wait()
                return
            self._held.append(claimed)
            closing = self._closing
        try:
            if not closing:
                self._settle(claimed, self._worker._prepare, self._ready)
        finally:
            with self._cond:
                self._preparing = False
                self._cond.notify_all()

    def _finish(self, claimed: _Claimed) -> None:
        self._settle(claimed, self._worker._finish, None)

    def _close(self, threads: list[threading.Thread]) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        for thread in threads:
            thread.join()
        for claimed in self._held:
            self._worker._hand_back(claimed)
        self._held.clear()


def _missing_weights(config: Config) -> tuple[str, ...]:
    return () if config.segmenter.backend == "precomputed" else tuple(missing_models(config.segmenter, config.selection.modalities))


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
        stages = Stages.with_segmenter(segmenter, PriorSources.from_config(config, store))
        worker = Worker(config, store, worker_id(index), stages, index=index)
        if not config.state.shared:  # a shared state has no serve lock on this host to check
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
    segmenter = make_segmenter(config.segmenter, roi_subset(config.biomarkers.liver), tuple(config.selection.modalities))
    start = getattr(segmenter, "start", None)
    if start is not None:
        try:
            start()
        except SegmenterError as exc:
            log.warning("event=engine_not_started reason=%r", str(exc))
    return segmenter
