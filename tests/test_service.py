"""End to end: `paraspinal-node serve` as a real process, dcmtk storescu in, dcmtk storescp out.

The segmenter is the "precomputed" backend reading the phantom's masks, so the whole path
(receive → spool → completion → job → worker → SEG/SR/key image → C-STORE) runs without a
model. Completion periods are shortened to keep each test to a few seconds; every wait is
bounded.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import phantom as ph
import pydicom
import pytest
from dicom_peers import dcmtk_env, free_port, storescu, wait_for_port
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage
from support import wait_until

from node.config import Config
from node.service.serve import Service
from node.state.store import DeliveryStatus, JobStatus, State, open_state

ROOT = Path(__file__).resolve().parents[1]
PATIENT_NAME = "Phantom^Thorax"
WAIT_S = 90.0


@dataclass(frozen=True)
class Series:
    files: list[Path]
    study_uid: str
    series_uid: str
    precomputed: Path


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> Series:
    root = tmp_path_factory.mktemp("service-data")
    body = ph.make_phantom(spacing=(5.0, 3.0, 3.0))
    written = ph.write_dicom_series(body, root / "ct", patient_name=PATIENT_NAME)
    ph.write_masks(body, root / "precomputed" / written.series_uid)
    return Series(written.paths, written.study_uid, written.series_uid, root / "precomputed")


class Destination:
    """dcmtk storescp on a fixed port, so it can be down while the node already knows it."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self._process: subprocess.Popen | None = None
        folder.mkdir(parents=True, exist_ok=True)

    def start(self) -> None:
        command = ["storescp", "-aet", "DEST", "+xa", "-pm", "-od", str(self.folder), str(self.port)]
        self._process = subprocess.Popen(command, env=dcmtk_env(), stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL)
        wait_for_port(self.port)

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(timeout=10)
            self._process = None

    def received(self) -> list[pydicom.Dataset]:
        return [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(self.folder.iterdir()) if p.is_file()]


class Node:
    """`paraspinal-node serve` in a subprocess with a generated config on loopback ports."""

    def __init__(self, root: Path, series: Series, destination: Destination) -> None:
        self.root = root
        self.port = free_port()
        self.log = root / "node.log"
        self.config = root / "node.toml"
        self.config.write_text(f"""
[receiver]
ae_title = "NODE"
port = {self.port}
bind_address = "127.0.0.1"
min_free_disk_mb = 1
watch_dir = "{root / 'inbox'}"
watch_stable_s = 0.3
[[destinations]]
ae_title = "DEST"
host = "127.0.0.1"
port = {destination.port}
[storage]
state_dir = "{root / 'state'}"
[segmenter]
backend = "precomputed"
precomputed_dir = "{series.precomputed}"
[completion]
release_quiet_s = 0.5
idle_quiet_s = 5.0
[worker]
lease_s = 10.0
poll_s = 0.2
retry_delay_s = 0.5
[delivery]
retry_base_s = 0.5
retry_max_interval_s = 1.0
timeout_s = 5.0
results_dir = "{root / 'results'}"
""")
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        """Start and wait for the started event (a bare TCP probe would hold an association open)."""
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        starts = self.log.read_text().count("event=node_started") if self.log.exists() else 0
        with self.log.open("a") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "node.cli.main", "serve", "--config", str(self.config)],
                                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        wait_until(lambda: self.log.read_text().count("event=node_started") > starts, "node start", 30)

    def stop(self) -> int:
        """SIGTERM and wait: the exit code."""
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def worker_pids(self) -> list[int]:
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text().split()
        return [int(pid) for pid in children]

    def state(self) -> State:
        return open_state(self.root / "state" / "state.sqlite")

    def jobs(self) -> list:
        return self._read(State.jobs)

    def deliveries(self) -> list:
        return self._read(State.deliveries)

    def _read(self, query: Callable[[State], list]) -> list:
        state = self.state()
        try:
            return query(state)
        finally:
            state.close()

    def delivery_states(self) -> set[DeliveryStatus]:
        return {d.status for d in self.deliveries()}

    def send(self, files: list[Path], all_accepted: bool = True) -> None:
        result = storescu(self.port, files, "NODE", "MODALITY")
        assert (result.returncode == 0) is all_accepted, result.stderr

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "node.cli.main", *args, "--config", str(self.config)], cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                              timeout=60)


@pytest.fixture
def destination(tmp_path: Path) -> Iterator[Destination]:
    peer = Destination(tmp_path / "received")
    yield peer
    peer.stop()


@pytest.fixture
def node(tmp_path: Path, series: Series, destination: Destination) -> Iterator[Node]:
    started = Node(tmp_path, series, destination)
    yield started
    started.kill()


def assert_results_once(destination: Destination, series: Series) -> None:
    received = destination.received()
    assert {"SEG", "SR"} <= {str(ds.Modality) for ds in received}
    assert len({str(ds.SOPInstanceUID) for ds in received}) == len(received) == 3
    assert all(str(ds.StudyInstanceUID) == series.study_uid for ds in received)


def test_series_in_results_out_once_then_clean_shutdown(node: Node, destination: Destination,
                                                        series: Series) -> None:
    destination.start()
    node.start()
    node.send(series.files)
    wait_until(lambda: node.delivery_states() == {DeliveryStatus.SENT}, "every delivery acknowledged")
    wait_until(lambda: (node.root / "results" / f"{series.series_uid}.json").is_file(), "results folder")
    assert_results_once(destination, series)
    node.send(series.files)  # the same series again: no second job
    wait_until(lambda: "event=series_unchanged" in node.log.read_text(), "duplicate series noticed")
    (job,) = node.jobs()
    assert job.status is JobStatus.DONE and job.attempts == 1
    worklist = node.cli("worklist", "--format", "csv")
    assert worklist.returncode == 0 and "PHANTOM-0" in worklist.stdout
    status = node.cli("status")
    assert status.returncode == 0 and "done 1" in status.stdout and "sent 4" in status.stdout
    assert node.stop() == 0
    log = node.log.read_text()
    assert "event=node_stopped" in log and PATIENT_NAME not in log and "Phantom^" not in log
    assert len(destination.received()) == 3


def test_worker_killed_mid_job_is_requeued_and_results_arrive_once(node: Node, destination: Destination,
                                                                  series: Series) -> None:
    destination.start()
    node.start()
    node.send(series.files)
    wait_until(lambda: any(j.status is JobStatus.RUNNING for j in node.jobs()), "job running")
    (worker,) = node.worker_pids()
    os.kill(worker, signal.SIGKILL)
    wait_until(lambda: node.delivery_states() == {DeliveryStatus.SENT}, "every delivery acknowledged")
    (job,) = node.jobs()
    assert job.status is JobStatus.DONE and job.attempts == 2
    assert "event=worker_exited" in node.log.read_text()
    assert_results_once(destination, series)
    assert node.stop() == 0


def test_destination_down_then_up_after_restart_gets_results_once(node: Node, destination: Destination,
                                                                  series: Series) -> None:
    node.start()
    inbox = node.root / "inbox"
    for path in series.files:  # this time through the watch folder
        shutil.copy(path, inbox / f".{path.name}.part")
        os.replace(inbox / f".{path.name}.part", inbox / path.name)

    def delivery_retried() -> bool:
        return any(d.attempts >= 2 and d.status is DeliveryStatus.PENDING for d in node.deliveries())

    wait_until(delivery_retried, "a failed delivery attempt")
    assert node.stop() == 0
    destination.start()
    node.start()
    wait_until(lambda: node.delivery_states() == {DeliveryStatus.SENT}, "every delivery acknowledged")
    assert_results_once(destination, series)
    assert node.stop() == 0


def test_sigterm_during_a_job_leaves_it_queued_and_restart_finishes_it(node: Node, destination: Destination,
                                                                       series: Series) -> None:
    destination.start()
    node.start()
    node.send(series.files)
    wait_until(lambda: any(j.status is JobStatus.RUNNING for j in node.jobs()), "job running")
    assert node.stop() == 0
    (job,) = node.jobs()
    assert job.status is JobStatus.QUEUED and job.attempts == 0 and job.lease_owner is None
    node.start()
    wait_until(lambda: node.delivery_states() == {DeliveryStatus.SENT}, "every delivery acknowledged")
    assert_results_once(destination, series)
    assert node.stop() == 0


def test_node_killed_mid_transfer_keeps_acknowledged_instances_and_processes_once(
        node: Node, destination: Destination, series: Series) -> None:
    destination.start()
    node.start()
    acknowledged = []
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="NODE")
    assert assoc.is_established
    for path in series.files:
        dataset = pydicom.dcmread(path)
        status = assoc.send_c_store(dataset)
        if "Status" not in status or status.Status != 0x0000:
            break
        acknowledged.append(str(dataset.SOPInstanceUID))
        if len(acknowledged) == 10:
            node.process.kill()  # kill -9 in the middle of the association
    assoc.abort()
    node.process.wait(timeout=10)
    spooled = {p.stem for p in (node.root / "state" / "spool" / series.study_uid / series.series_uid).glob("*.dcm")}
    assert 10 <= len(acknowledged) and set(acknowledged) <= spooled
    node.start()
    node.send(series.files)  # the modality sends the study again
    wait_until(lambda: node.delivery_states() == {DeliveryStatus.SENT}, "every delivery acknowledged")
    done = [j for j in node.jobs() if j.status is JobStatus.DONE]
    state = node.state()
    assert len(done) == 1 and state.get_series(series.series_uid).instances == len(series.files)
    state.close()
    assert_results_once(destination, series)
    assert node.stop() == 0


def test_scheduler_round_that_fails_is_logged_and_scheduling_goes_on(tmp_path: Path, series: Series,
                                                                     caplog) -> None:
    config = Config()
    config.receiver.port, config.receiver.bind_address, config.receiver.min_free_disk_mb = free_port(), "127.0.0.1", 1
    config.storage.state_dir = tmp_path / "state"
    config.completion.release_quiet_s = 0.2
    config.worker.count = 0
    service = Service(config, None)
    check = service.supervisor.check
    calls = []

    def check_failing_once() -> None:  # start() makes the first call; the scheduler loop's first round fails
        calls.append(None)
        if len(calls) == 2:
            raise OSError(11, "Resource temporarily unavailable")
        check()

    service.supervisor.check = check_failing_once
    stop = threading.Event()
    runner = threading.Thread(target=service.run, args=(stop,), daemon=True)
    with caplog.at_level(logging.ERROR, logger="node.service.serve"):
        runner.start()
        try:
            wait_until(lambda: len(calls) > 2, "a scheduler round after the failed one", 30)
            result = storescu(config.receiver.port, series.files, config.receiver.ae_title, "MODALITY")
            assert result.returncode == 0, result.stderr
            wait_until(lambda: service.state.jobs(), "the series queued", 30)
        finally:
            stop.set()
            runner.join(timeout=60)
    assert any("event=scheduler_round_failed" in m for m in caplog.messages)
    assert not runner.is_alive()


def test_bad_series_fail_with_their_reason_and_the_node_keeps_working(node: Node, destination: Destination,
                                                                       series: Series, tmp_path: Path) -> None:
    body = ph.make_phantom(spacing=(5.0, 3.0, 3.0))
    no_pixels = ph.write_dicom_series(body, tmp_path / "no-pixels")
    damaged = pydicom.dcmread(no_pixels.paths[10])
    del damaged.PixelData
    damaged.save_as(no_pixels.paths[10])
    mixed = ph.write_dicom_series(body, tmp_path / "mixed")
    for path in mixed.paths[:5]:
        other = pydicom.dcmread(path)
        other.ImageOrientationPatient = [-1, 0, 0, 0, -1, 0]
        other.save_as(path)
    destination.start()
    node.start()
    node.send(no_pixels.paths, all_accepted=False)  # the image without pixel data is refused at C-STORE time
    node.send(mixed.paths)
    node.send(series.files)
    wait_until(lambda: node.delivery_states() == {DeliveryStatus.SENT}, "the good series delivered")
    jobs = {job.series_uid: job for job in node.jobs()}
    assert no_pixels.series_uid not in jobs  # a series with a refused image waits for the sender's resend ...
    status = json.loads(node.cli("status", "--format", "json").stdout)
    waiting = {p["series"]: p["reason"] for p in status["pending_series"]}
    assert waiting[no_pixels.series_uid] == "refused"  # ... and status says why
    mixed_up = jobs[mixed.series_uid]
    assert mixed_up.status is JobStatus.FAILED and "mixed series" in mixed_up.last_error
    assert jobs[series.series_uid].status is JobStatus.DONE
    assert node.process.poll() is None
    assert_results_once(destination, series)


def pending_reasons(node: Node) -> dict[str, str]:
    status = json.loads(node.cli("status", "--format", "json").stdout)
    return {p["series"]: p["reason"] for p in status["pending_series"]}


def test_pause_longer_than_the_idle_period_inside_an_open_association_runs_one_whole_job(
        node: Node, series: Series) -> None:
    node.start()
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="NODE")
    assert assoc.is_established
    half = len(series.files) // 2
    for path in series.files[:half]:
        assert assoc.send_c_store(pydicom.dcmread(path)).Status == 0x0000
    wait_until(lambda: pending_reasons(node).get(series.series_uid) == "open_association", "the series held open", 30)
    threading.Event().wait(6.0)  # longer than idle_quiet_s (5 s), the association still open
    assert node.jobs() == []
    for path in series.files[half:]:
        assert assoc.send_c_store(pydicom.dcmread(path)).Status == 0x0000
    assoc.release()
    wait_until(lambda: node.jobs(), "the job queued", WAIT_S)
    (job,) = node.jobs()
    state = node.state()
    assert state.get_series(series.series_uid).instances == len(series.files)
    state.close()
    assert node.stop() == 0


def test_aborted_send_waits_for_the_resend_past_the_idle_period(node: Node, destination: Destination,
                                                                series: Series) -> None:
    destination.start()
    node.start()
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="NODE")
    for path in series.files[:10]:
        assert assoc.send_c_store(pydicom.dcmread(path)).Status == 0x0000
    assoc.abort()
    wait_until(lambda: pending_reasons(node).get(series.series_uid) == "aborted", "the series cut off", 30)
    threading.Event().wait(6.0)  # past idle_quiet_s: a cut-off series is not completed by it
    assert node.jobs() == [] and pending_reasons(node)[series.series_uid] == "aborted"
    node.send(series.files)  # the late resend, released cleanly
    wait_until(lambda: node.delivery_states() == {DeliveryStatus.SENT}, "every delivery acknowledged")
    (job,) = node.jobs()
    assert job.status is JobStatus.DONE
    assert_results_once(destination, series)
    assert node.stop() == 0
