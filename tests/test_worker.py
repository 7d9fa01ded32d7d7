"""The worker on the real pipeline (precomputed segmenter, phantom CT): outcomes, holds, retries, stop."""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import phantom
import pytest
from worker_config import precomputed_worker_config

from node.config import Config
from node.delivery.destinations import RESULTS_FOLDER
from node.run import run_pipeline
from node.service.worker import Stop, Worker, install_stop_handler
from node.state.store import JobStatus, SeriesRecord, State, open_state
from node.weights import MODEL_FILES, required_models


@dataclass(frozen=True)
class Series:
    folder: Path
    series_uid: str
    precomputed: Path


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> Series:
    root = tmp_path_factory.mktemp("worker-data")
    body = phantom.make_phantom(spacing=(5.0, 3.0, 3.0))
    written = phantom.write_dicom_series(body, root / "ct")
    phantom.write_masks(body, root / "precomputed" / written.series_uid)
    return Series(written.folder, written.series_uid, root / "precomputed")


@pytest.fixture
def config(tmp_path: Path, series: Series) -> Config:
    config = precomputed_worker_config(tmp_path, series.precomputed)
    config.worker.weights_check_s = 0.0  # held jobs are looked at on every claim: no test waits on the clock
    return config


@pytest.fixture
def state(config: Config) -> State:
    db = open_state(config.storage.database)
    yield db
    db.close()


def queue(state: State, series: Series, folder: Path | None = None) -> int:
    state.record_series(SeriesRecord(series.series_uid, "1.2", "PHANTOM-0", "ACC", "20240101", "CT", "thorax",
                                     1, "f", str(folder or series.folder)))
    return state.add_job(series.series_uid, "f", str(folder or series.folder)).id


def test_job_done_with_results_in_outbox_and_deliveries_queued(config: Config, state: State, series: Series) -> None:
    job_id = queue(state, series)
    assert Worker(config, state, "w").run_once()
    job = state.get_job(job_id)
    assert job.status is JobStatus.DONE, job.last_error
    assert state.job_result(job_id)["source"]["series_instance_uid"] == series.series_uid
    deliveries = state.deliveries(job_id)
    dicom = [d for d in deliveries if d.destination != RESULTS_FOLDER]
    assert sorted({d.destination for d in dicom}) == ["PACS@127.0.0.1:11112", "VNA@10.0.0.9:104"]
    assert sorted(Path(d.file).name for d in dicom if d.destination.startswith("PACS")) == \
        ["keyimage.dcm", "seg.dcm", "sr.dcm"]
    assert all(Path(d.file).is_file() and config.storage.outbox_dir in Path(d.file).parents for d in dicom)
    (folder,) = [d for d in deliveries if d.destination == RESULTS_FOLDER]
    assert (Path(folder.file) / "measurements.json").is_file()
    assert not Worker(config, state, "w").run_once()


def test_refused_input_fails_at_once_with_the_reason(config: Config, state: State, series: Series,
                                                     tmp_path: Path) -> None:
    (tmp_path / "not-a-series").mkdir()
    (tmp_path / "not-a-series" / "notes.txt").write_text("not DICOM")
    job_id = queue(state, series, tmp_path / "not-a-series")
    Worker(config, state, "w").run_once()
    job = state.get_job(job_id)
    assert job.status is JobStatus.FAILED and job.attempts == 1
    assert job.last_error.startswith("refused input: no DICOM files")
    assert state.deliveries(job_id) == []


def test_missing_weights_hold_the_job_until_they_are_installed(config: Config, state: State, series: Series,
                                                               tmp_path: Path) -> None:
    config.segmenter.backend = "totalsegmentator"
    config.segmenter.weights_dir = tmp_path / "weights"
    job_id = queue(state, series)
    worker = Worker(config, state, "w")
    assert worker.run_once()
    job = state.get_job(job_id)
    assert job.status is JobStatus.HELD and "weights install" in job.last_error and job.attempts == 0
    assert not worker.run_once()
    assert state.get_job(job_id).status is JobStatus.HELD
    for folder in required_models(config.segmenter):
        for name in MODEL_FILES:
            (config.segmenter.weights_dir / folder / name).parent.mkdir(parents=True, exist_ok=True)
            (config.segmenter.weights_dir / folder / name).write_bytes(b"")
    config.segmenter.backend = "precomputed"  # the stand-in files cannot run a model; the release is what counts
    assert worker.run_once()
    assert state.get_job(job_id).status is JobStatus.DONE


class Flaky:
    """The real pipeline behind a disk that fails the first `failures` calls (a transient fault)."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0

    def __call__(self, series_dir: Path, out_dir: Path, config: Config):
        self.calls += 1
        if self.calls <= self.failures:
            raise OSError(28, "No space left on device")
        return run_pipeline(series_dir, out_dir, config)


def test_transient_failure_is_retried_then_done(config: Config, state: State, series: Series) -> None:
    job_id = queue(state, series)
    worker = Worker(config, state, "w", pipeline=Flaky(1))
    worker.run_once()
    job = state.get_job(job_id)
    assert job.status is JobStatus.QUEUED and "No space left" in job.last_error
    worker.run_once()
    job = state.get_job(job_id)
    assert job.status is JobStatus.DONE and job.attempts == 2
    files = [Path(d.file) for d in state.deliveries(job_id) if d.destination != RESULTS_FOLDER]
    assert all(f.is_file() and f.parent.name == "attempt-2" for f in files)


def test_failure_that_persists_ends_as_failed_with_the_reason(config: Config, state: State, series: Series) -> None:
    config.worker.max_attempts = 3
    job_id = queue(state, series)
    worker = Worker(config, state, "w", pipeline=Flaky(99))
    for _ in range(5):
        worker.run_once()
    job = state.get_job(job_id)
    assert job.status is JobStatus.FAILED and job.attempts == 3
    assert job.last_error == "failed after 3 attempts: OSError: [Errno 28] No space left on device"


def test_lease_is_renewed_while_the_pipeline_runs(config: Config, state: State, series: Series) -> None:
    config.worker.lease_s = 1.5
    job_id = queue(state, series)
    rival = open_state(config.storage.database)
    seen: list = []

    def slow(series_dir: Path, out_dir: Path, cfg: Config):
        for _ in range(4):
            seen.append(rival.claim("rival", 1.5, 3))
            time.sleep(0.6)
        return run_pipeline(series_dir, out_dir, cfg)

    Worker(config, state, "w", pipeline=slow).run_once()
    assert seen == [None] * 4
    assert state.get_job(job_id).status is JobStatus.DONE


def test_sigterm_mid_job_hands_the_job_back(config: Config, state: State, series: Series) -> None:
    job_id = queue(state, series)
    previous = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)

    def interrupted(series_dir: Path, out_dir: Path, cfg: Config):
        os.kill(os.getpid(), signal.SIGTERM)
        return run_pipeline(series_dir, out_dir, cfg)

    try:
        stop = install_stop_handler()
        with pytest.raises(Stop):
            Worker(config, state, "w", pipeline=interrupted).run(stop)
    finally:
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGINT, previous[1])
    job = state.get_job(job_id)
    assert stop.is_set() and job.status is JobStatus.QUEUED and job.attempts == 0 and job.lease_owner is None


def test_precomputed_segmentation_not_there_yet_holds_the_job_until_it_arrives(config: Config, state: State,
                                                                               series: Series, tmp_path: Path) -> None:
    config.segmenter.precomputed_dir = tmp_path / "later"
    job_id = queue(state, series)
    worker = Worker(config, state, "w")
    assert worker.run_once()
    job = state.get_job(job_id)
    assert job.status is JobStatus.HELD and "no precomputed segmentation" in job.last_error and job.attempts == 0
    assert worker.run_once()  # looked again: still not there, held again without using up an attempt
    assert state.get_job(job_id).status is JobStatus.HELD and state.get_job(job_id).attempts == 0
    (tmp_path / "later").symlink_to(series.precomputed, target_is_directory=True)
    assert worker.run_once()
    assert state.get_job(job_id).status is JobStatus.DONE
