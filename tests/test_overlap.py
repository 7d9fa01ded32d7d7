"""One worker overlapping jobs around its one engine (`worker.cpu_threads_per_engine` = 2).

The engine is the only test double: the precomputed segmenter behind a gate that the test opens,
so a job stays inside segment() for as long as the test needs. Everything else is the real
pipeline on phantom CTs, the real SQLite store and real threads; the order of events is shown
with events, never with timings.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import phantom
import pytest
from support import wait_until
from worker_config import precomputed_worker_config

from node.config import Config, ConfigError, load_config
from node.delivery.destinations import RESULTS_FOLDER
from node.labels import roi_subset
from node.pipeline.ct import CTVolume
from node.pipeline.segment import make_segmenter
from node.pipeline.segmentation import Segmentation
from node.run import Prepared, Segmented, Stages, finish, prepare, segment_prepared
from node.service.worker import Stop, Worker, install_stop_handler
from node.state.store import JobStatus, SeriesRecord, State, open_state

WAIT_S = 60.0
STAGES = ["load", "segment", "measure", "encode"]  # and "priors" between measure and encode where the worker compares


@dataclass(frozen=True)
class Series:
    folder: Path
    series_uid: str


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Series], Path]:
    """Four phantom series (same pixels, their own UIDs) and precomputed masks for each."""
    root = tmp_path_factory.mktemp("overlap-data")
    body = phantom.make_phantom(spacing=(5.0, 3.0, 3.0))
    series = []
    for n in range(4):
        out = phantom.write_dicom_series(body, root / f"ct-{n}")
        series.append(Series(out.folder, out.series_uid))
    masks = root / "masks"
    phantom.write_masks(body, masks)
    (root / "precomputed").mkdir()
    for s in series:
        (root / "precomputed" / s.series_uid).symlink_to(masks, target_is_directory=True)
    return series, root / "precomputed"


@pytest.fixture
def config(tmp_path: Path, written: tuple[list[Series], Path]) -> Config:
    config = precomputed_worker_config(tmp_path, written[1])
    config.worker.poll_s = 0.05
    config.worker.cpu_threads_per_engine = 2
    return config


@pytest.fixture
def state(config: Config) -> State:
    db = open_state(config.storage.database)
    yield db
    db.close()


def queue_all(state: State, series: list[Series]) -> list[int]:
    ids = []
    for s in series:
        state.record_series(SeriesRecord(s.series_uid, "1.2", "PHANTOM-0", "ACC", "20240101", "CT", "thorax", 1, "f",
                                         str(s.folder)))
        ids.append(state.add_job(s.series_uid, "f", str(s.folder)).id)
    return ids


class GatedEngine:
    """The GPU model's double: precomputed labels, handed back once the test opens that series' gate."""

    def __init__(self, config: Config, series: list[Series]) -> None:
        self._inner = make_segmenter(config.segmenter, roi_subset(False))
        self.entered = {s.series_uid: threading.Event() for s in series}
        self.gates = {s.series_uid: threading.Event() for s in series}
        self.inside: str | None = None
        self.on_enter: dict[str, Callable[[], None]] = {}

    def segment(self, ct: CTVolume) -> Segmentation:
        uid = ct.series_uid
        assert self.inside is None, f"{self.inside} and {uid} inside the one engine at once"
        self.inside = uid
        try:
            self.entered[uid].set()
            self.on_enter.get(uid, lambda: None)()
            if not self.gates[uid].wait(WAIT_S):
                raise RuntimeError(f"the test never let {uid} through the engine")
            return self._inner.segment(ct)
        finally:
            self.inside = None


class Recorder:
    """The real prepare and finish stages, telling the test when a CT is loaded and a finish may start."""

    def __init__(self, series: list[Series]) -> None:
        self.loaded = {s.series_uid: threading.Event() for s in series}
        self.finish_after: dict[str, threading.Event] = {}  # series -> event its finish waits for
        self.finish_gate_missed: list[str] = []

    def prepare(self, ct_path: Path) -> Prepared:
        prepared = prepare(ct_path)
        self.loaded[prepared.ct.series_uid].set()
        return prepared

    def finish(self, segmented: Segmented, out_dir: Path, config: Config):
        after = self.finish_after.get(segmented.ct.series_uid)
        if after is not None and not after.wait(WAIT_S):
            self.finish_gate_missed.append(segmented.ct.series_uid)
        return finish(segmented, out_dir, config)


def stages(recorder: Recorder, engine: GatedEngine) -> Stages:
    return Stages(recorder.prepare, lambda prepared, cfg: segment_prepared(prepared, cfg, engine), recorder.finish)


def status(state: State, job_id: int) -> JobStatus:
    return state.get_job(job_id).status


def assert_done_once(state: State, config: Config, job_id: int, series_uid: str) -> None:
    """Done in one attempt, its result, its seven deliveries and one set of stage timings: completed once."""
    job = state.get_job(job_id)
    assert job.status is JobStatus.DONE and job.attempts == 1, job.last_error
    assert state.job_result(job_id)["source"]["series_instance_uid"] == series_uid
    deliveries = state.deliveries(job_id)
    dicom = sorted((d.destination, Path(d.file).name) for d in deliveries if d.destination != RESULTS_FOLDER)
    assert dicom == [(dest, name) for dest in ("PACS@127.0.0.1:11112", "VNA@10.0.0.9:104")
                     for name in ("keyimage.dcm", "seg.dcm", "sr.dcm")]
    assert all(Path(d.file).is_file() for d in deliveries if d.destination != RESULTS_FOLDER)
    (folder,) = [d for d in deliveries if d.destination == RESULTS_FOLDER]
    assert (Path(folder.file) / "measurements.json").is_file()
    assert [t.stage for t in state.stage_timings([job_id]) if t.stage != "priors"] == STAGES


def test_next_job_loads_and_previous_job_encodes_while_the_engine_runs_one(config: Config, state: State,
                                                                           written: tuple[list[Series], Path]) -> None:
    series = written[0][:3]
    config.worker.lease_s = 2.0
    a, b, c = queue_all(state, series)
    engine, recorder = GatedEngine(config, series), Recorder(series)
    uid_a, uid_b, uid_c = (s.series_uid for s in series)
    recorder.finish_after[uid_a] = engine.entered[uid_b]  # A's measure and encode start only once B is in the engine
    stop = threading.Event()
    worker = Worker(config, state, "w", pipeline=stages(recorder, engine))
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    thread.start()
    try:
        assert engine.entered[uid_a].wait(WAIT_S)
        assert recorder.loaded[uid_b].wait(WAIT_S), "job N+1 was not loaded while job N was in the engine"
        assert engine.inside == uid_a and status(state, a) is JobStatus.RUNNING
        engine.gates[uid_a].set()

        assert engine.entered[uid_b].wait(WAIT_S)
        wait_until(lambda: status(state, a) is JobStatus.DONE, "job N-1 measured, encoded and recorded", WAIT_S)
        assert recorder.loaded[uid_c].wait(WAIT_S), "job N+1 was not loaded while job N was in the engine"
        assert engine.inside == uid_b and not engine.gates[uid_b].is_set()
        rival = open_state(config.storage.database)
        for _ in range(6):  # three seconds, longer than the lease: C waits for the engine, its lease renewed
            assert rival.claim("rival", config.worker.lease_s, config.worker.max_attempts) is None
            time.sleep(0.5)
        rival.close()
        assert status(state, c) is JobStatus.RUNNING and status(state, b) is JobStatus.RUNNING
        engine.gates[uid_b].set()
        engine.gates[uid_c].set()
        wait_until(lambda: all(status(state, j) is JobStatus.DONE for j in (a, b, c)), "every job done", WAIT_S)
    finally:
        for gate in engine.gates.values():
            gate.set()
        stop.set()
        thread.join(WAIT_S)
    assert not thread.is_alive() and recorder.finish_gate_missed == []
    for job_id, s in zip((a, b, c), series):
        assert_done_once(state, config, job_id, s.series_uid)


def test_sigterm_mid_pipeline_hands_back_every_claimed_unfinished_job(config: Config, state: State,
                                                                      written: tuple[list[Series], Path]) -> None:
    series = written[0]
    a, b, c, d = queue_all(state, series)
    engine, recorder = GatedEngine(config, series), Recorder(series)
    uid_a, uid_b, uid_c, _ = (s.series_uid for s in series)
    engine.gates[uid_a].set()

    def stop_inside_b() -> None:  # A finished, C loaded and waiting, B in the engine: then SIGTERM
        wait_until(lambda: status(state, a) is JobStatus.DONE, "A done", WAIT_S)
        assert recorder.loaded[uid_c].wait(WAIT_S)
        os.kill(os.getpid(), signal.SIGTERM)

    engine.on_enter[uid_b] = stop_inside_b
    previous = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    try:
        stop = install_stop_handler()
        with pytest.raises(Stop):
            Worker(config, state, "w", pipeline=stages(recorder, engine)).run(stop)
    finally:
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGINT, previous[1])
    assert stop.is_set() and not engine.gates[uid_b].is_set()
    assert_done_once(state, config, a, uid_a)
    for job_id in (b, c, d):  # B in the engine, C loaded, D never claimed: all queued, no attempt used
        job = state.get_job(job_id)
        assert job.status is JobStatus.QUEUED and job.attempts == 0 and job.lease_owner is None, job
        assert state.deliveries(job_id) == [] and state.stage_timings([job_id]) == []

    again = threading.Event()
    thread = threading.Thread(target=Worker(config, state, "w2").run, args=(again,), daemon=True)
    thread.start()
    try:
        wait_until(lambda: all(status(state, j) is JobStatus.DONE for j in (b, c, d)), "the handed-back jobs", WAIT_S)
    finally:
        again.set()
        thread.join(WAIT_S)
    for job_id, s in zip((a, b, c, d), series):
        assert_done_once(state, config, job_id, s.series_uid)


def test_cpu_threads_per_engine_below_one_is_refused_with_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text("[worker]\ncpu_threads_per_engine = 0\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="cpu_threads_per_engine must be 1 or more, not 0: set 1"):
        load_config(path, environ={})
    path.write_text("[worker]\ncpu_threads_per_engine = 3\n", encoding="utf-8")
    assert load_config(path, environ={}).worker.cpu_threads_per_engine == 3
