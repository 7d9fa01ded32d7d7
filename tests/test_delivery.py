"""The delivery loop against a real pynetdicom C-STORE SCP: success, refusals, backoff, horizon, restart."""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pydicom
import pytest
from dicom_peers import free_port, write_ct_series
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage
from support import Clock, wait_until

from node.config import Config, DestinationConfig
from node.delivery.destinations import RESULTS_FOLDER, export_results
from node.delivery.loop import DeliveryLoop, next_attempt_at
from node.delivery.sender import SendOutcome, send_files
from node.state.store import DeliveryStatus, NewDelivery, SeriesRecord, State


class Destination:
    """A PACS stand-in: stores CT, answers each SOP Instance UID with a configurable status."""

    def __init__(self) -> None:
        self.port = free_port()
        self.received: list[str] = []
        self.status: dict[str, int] = {}
        self._lock = threading.Lock()
        self._server = None

    def start(self) -> None:
        ae = AE(ae_title="PACS")
        ae.add_supported_context(CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        self._server = ae.start_server(("127.0.0.1", self.port), block=False,
                                       evt_handlers=[(evt.EVT_C_STORE, self._on_store)])

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def _on_store(self, event: evt.Event) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        with self._lock:
            status = self.status.get(uid, 0x0000)
            if status == 0x0000:
                self.received.append(uid)
        return status


@pytest.fixture
def destination() -> Iterator[Destination]:
    peer = Destination()
    peer.start()
    yield peer
    peer.stop()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def config(tmp_path: Path, destination: Destination) -> Config:
    config = Config()
    config.storage.state_dir = tmp_path / "state"
    config.destinations = [DestinationConfig("PACS", "127.0.0.1", destination.port)]
    config.delivery.retry_base_s = 10
    config.delivery.retry_max_interval_s = 40
    config.delivery.horizon_s = 100
    config.delivery.timeout_s = 5
    return config


@pytest.fixture
def state(config: Config, clock: Clock) -> Iterator[State]:
    config.storage.state_dir.mkdir(parents=True)
    db = State(config.storage.database, clock=clock)
    yield db
    db.close()


def finished_job(state: State, files: list[Path], destination: str) -> int:
    state.record_series(SeriesRecord("1.2.3", "1.2", "P", "A", "20240101", "CT", "", 1, "f", "/x"))
    job = state.add_job("1.2.3", "f", "/x")
    claimed = state.claim("w", 60, 3)
    state.complete(job.id, claimed.token, {}, [NewDelivery(destination, str(f)) for f in files])
    return job.id


def uid_of(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


@pytest.fixture
def files(tmp_path: Path) -> list[Path]:
    return write_ct_series(tmp_path / "results", 3, size=8)


def test_pending_deliveries_are_sent_once(config: Config, state: State, destination: Destination,
                                          files: list[Path], clock: Clock) -> None:
    job_id = finished_job(state, files, f"PACS@127.0.0.1:{destination.port}")
    loop = DeliveryLoop(config, state, clock=clock)
    assert loop.run_once() == 3
    assert sorted(destination.received) == sorted(uid_of(f) for f in files)
    assert {d.status for d in state.deliveries(job_id)} == {DeliveryStatus.SENT}
    clock.now += 10_000
    assert loop.run_once() == 0
    assert len(destination.received) == 3


def test_refused_and_warning_files_are_retried_alone(config: Config, state: State, destination: Destination,
                                                     files: list[Path], clock: Clock) -> None:
    destination.status = {uid_of(files[0]): 0xA700, uid_of(files[1]): 0xB000}
    job_id = finished_job(state, files, f"PACS@127.0.0.1:{destination.port}")
    loop = DeliveryLoop(config, state, clock=clock)
    loop.run_once()
    refused, warned, sent = state.deliveries(job_id)
    assert sent.status is DeliveryStatus.SENT
    assert refused.status is DeliveryStatus.PENDING and "0xA700" in refused.last_error
    assert warned.status is DeliveryStatus.PENDING and "0xB000" in warned.last_error
    assert refused.next_attempt_at == clock.now + 10
    destination.status = {}
    clock.now += 10
    assert loop.run_once() == 2
    assert sorted(destination.received) == sorted(uid_of(f) for f in files)


def test_destination_down_backs_off_then_delivers_after_a_restart(config: Config, state: State, clock: Clock,
                                                                  destination: Destination, files: list[Path]) -> None:
    destination.stop()
    job_id = finished_job(state, files, f"PACS@127.0.0.1:{destination.port}")
    loop = DeliveryLoop(config, state, clock=clock)
    delays = []
    for _ in range(3):
        loop.run_once()
        delivery = state.deliveries(job_id)[0]
        assert delivery.status is DeliveryStatus.PENDING and delivery.last_error
        delays.append(delivery.next_attempt_at - clock.now)
        clock.now = delivery.next_attempt_at
    assert delays == [10, 20, 40]
    state.close()
    destination.start()
    reopened = State(config.storage.database, clock=clock)
    assert DeliveryLoop(config, reopened, clock=clock).run_once() == 3
    assert {d.status for d in reopened.deliveries(job_id)} == {DeliveryStatus.SENT}
    assert len(destination.received) == 3
    reopened.close()


def test_delivery_fails_for_good_after_the_horizon(config: Config, state: State, clock: Clock,
                                                   destination: Destination, files: list[Path]) -> None:
    destination.stop()
    job_id = finished_job(state, files[:1], f"PACS@127.0.0.1:{destination.port}")
    loop = DeliveryLoop(config, state, clock=clock)
    while (delivery := state.deliveries(job_id)[0]).status is DeliveryStatus.PENDING:
        clock.now = max(clock.now, delivery.next_attempt_at)
        loop.run_once()
        assert delivery.attempts < 10
    assert delivery.status is DeliveryStatus.FAILED and delivery.attempts == 5


def test_backoff_is_capped_and_stops_at_the_horizon(config: Config, state: State, clock: Clock,
                                                    files: list[Path]) -> None:
    job_id = finished_job(state, files[:1], "PACS@127.0.0.1:1")
    delivery = state.deliveries(job_id)[0]
    assert next_attempt_at(delivery, clock.now, config) == clock.now + 10
    assert next_attempt_at(replace(delivery, attempts=3), clock.now, config) == clock.now + 40  # 80 s, capped
    assert next_attempt_at(replace(delivery, attempts=4), clock.now, config) is None  # 10 + 20 + 40 + 40 s waited


def test_a_clock_step_neither_fails_nor_delays_a_pending_delivery(config: Config, state: State, clock: Clock,
                                                                  destination: Destination, files: list[Path]) -> None:
    destination.stop()
    job_id = finished_job(state, files[:1], f"PACS@127.0.0.1:{destination.port}")
    loop = DeliveryLoop(config, state, clock=clock)
    loop.run_once()
    clock.now += 10 * config.delivery.horizon_s  # the wall clock jumps forward past the horizon
    loop.run_once()
    (delivery,) = state.deliveries(job_id)
    assert delivery.status is DeliveryStatus.PENDING and delivery.attempts == 2
    clock.now -= 100 * config.delivery.horizon_s  # and far back: the retry must not wait for the clock
    destination.start()
    assert loop.run_once() == 1
    assert state.deliveries(job_id)[0].status is DeliveryStatus.SENT


def test_results_folder_gets_json_and_csv(config: Config, state: State, clock: Clock, tmp_path: Path) -> None:
    out_dir = tmp_path / "outbox" / "job-1" / "attempt-1"
    out_dir.mkdir(parents=True)
    (out_dir / "measurements.json").write_text('{"levels": []}\n')
    (out_dir / "measurements.csv").write_text("level,status\n")
    config.delivery.results_dir = tmp_path / "results-folder"
    job_id = finished_job(state, [out_dir], RESULTS_FOLDER)
    DeliveryLoop(config, state, clock=clock).run_once()
    assert state.deliveries(job_id)[0].status is DeliveryStatus.SENT
    assert (config.delivery.results_dir / "1.2.3.json").read_text() == '{"levels": []}\n'
    assert (config.delivery.results_dir / "1.2.3.csv").read_text() == "level,status\n"


def test_export_refuses_a_missing_outbox(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        export_results(tmp_path / "gone", tmp_path / "results", "1.2.3")


@contextlib.contextmanager
def running(loop: DeliveryLoop) -> Iterator[None]:
    """DeliveryLoop.run in its own thread, as serve starts it."""
    stop = threading.Event()
    thread = threading.Thread(target=loop.run, args=(stop, 0.01), daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=30)


class LockedOnce(State):
    """The state database answering 'database is locked' to the first look for due deliveries."""

    locked = True

    def due_deliveries(self, limit: int = 100, max_wait_s: float | None = None) -> list:
        if self.locked:
            self.locked = False
            raise sqlite3.OperationalError("database is locked")
        return super().due_deliveries(limit, max_wait_s)


def test_loop_survives_a_locked_database(config: Config, clock: Clock, destination: Destination,
                                         files: list[Path], caplog) -> None:
    config.storage.state_dir.mkdir(parents=True)
    state = LockedOnce(config.storage.database, clock=clock)
    job_id = finished_job(state, files, f"PACS@127.0.0.1:{destination.port}")
    with caplog.at_level(logging.ERROR, logger="node.delivery.loop"), running(DeliveryLoop(config, state, clock=clock)):
        wait_until(lambda: {d.status for d in state.deliveries(job_id)} == {DeliveryStatus.SENT}, "delivery")
    assert any("event=delivery_round_failed" in m for m in caplog.messages)
    assert len(destination.received) == 3
    state.close()


def test_sender_error_is_a_failed_attempt_and_the_loop_goes_on(config: Config, state: State, clock: Clock,
                                                               destination: Destination, files: list[Path]) -> None:
    calls = []

    def sender(peer: DestinationConfig, paths: list[Path], calling_ae: str, timeout_s: float) -> list[SendOutcome]:
        calls.append(paths)
        if len(calls) == 1:
            raise RuntimeError("pynetdicom failed unexpectedly")
        return send_files(peer, paths, calling_ae, timeout_s)

    job_id = finished_job(state, files, f"PACS@127.0.0.1:{destination.port}")
    with running(DeliveryLoop(config, state, sender=sender, clock=clock)):
        wait_until(lambda: all(d.attempts == 1 for d in state.deliveries(job_id)), "the failed attempts recorded")
        assert all("RuntimeError" in d.last_error for d in state.deliveries(job_id))
        clock.now += 10
        wait_until(lambda: {d.status for d in state.deliveries(job_id)} == {DeliveryStatus.SENT}, "delivery")
    assert sorted(destination.received) == sorted(uid_of(f) for f in files)
