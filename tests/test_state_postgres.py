"""The PostgreSQL state on a real server: claims across processes, fencing, the database's clock, restarts."""

from __future__ import annotations

import logging
import multiprocessing
import threading
import time

import pytest

from node.state.store import SCHEMA_VERSION, JobStatus, NewDelivery, RunOutcome, SeriesRecord, StateError, open_state


def series(uid: str) -> SeriesRecord:
    return SeriesRecord(series_uid=uid, study_uid="1.2", patient_id="P1", accession="A1", study_date="20240105",
                        modality="CT", description="chest", instances=40, fingerprint="f", series_dir="/spool/x")


def _drain(url: str, owner: str, out) -> None:
    state = open_state(url)
    while (job := state.claim(owner, 60, 3)) is not None:
        out.put((job.id, job.token))
        state.complete(job.id, job.token, {}, [])
    state.close()


def test_fresh_database_is_migrated_once_and_a_newer_one_refused(postgres_url: str) -> None:
    first, second = open_state(postgres_url), open_state(postgres_url)  # the second finds it migrated
    assert first.schema_version == second.schema_version == SCHEMA_VERSION
    first._db.write(lambda tx: tx.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,)))
    with pytest.raises(StateError, match="upgrade paraspinal-node on every host"):
        open_state(postgres_url)


def test_unreachable_server_is_one_clear_error() -> None:
    with pytest.raises(StateError, match="cannot reach the state database postgresql://u:\\*\\*\\*@127.0.0.1:9/x"):
        open_state("postgresql://u:secret@127.0.0.1:9/x")


def test_claims_from_four_processes_take_every_job_exactly_once(postgres_url: str) -> None:
    state = open_state(postgres_url, serve="recv1")
    for n in range(40):
        state.record_series(series(f"1.2.{n}"))
        state.add_job(f"1.2.{n}", "f", "/x")
    out = multiprocessing.get_context("spawn").Queue()
    workers = [multiprocessing.get_context("spawn").Process(target=_drain, args=(postgres_url, f"w{i}", out))
               for i in range(4)]
    for process in workers:
        process.start()
    for process in workers:
        process.join(120)
    claimed = [out.get(timeout=5) for _ in range(40)]
    assert sorted(job for job, _ in claimed) == list(range(1, 41))
    assert len({token for _, token in claimed}) == 40
    assert state.job_counts() == {"done": 40}


def test_one_series_never_runs_twice_at_once_under_concurrent_claims(postgres_url: str) -> None:
    state = open_state(postgres_url)
    state.record_series(series("1.2.3"))
    for n in range(6):
        state.add_job("1.2.3", f"content-{n}", "/x")
    stop = threading.Event()

    def claim_loop(owner: str) -> None:
        mine = open_state(postgres_url)
        while not stop.is_set():
            job = mine.claim(owner, 60, 3)
            if job is not None:
                time.sleep(0.02)
                mine.complete(job.id, job.token, {}, [])
        mine.close()

    threads = [threading.Thread(target=claim_loop, args=(f"w{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60
    while state.job_counts().get("done", 0) < 6 and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    for thread in threads:
        thread.join()
    runs = state.runs("1.2.3")
    assert len(runs) == 6 and all(r.outcome is RunOutcome.DONE for r in runs)
    for earlier, later in zip(runs, runs[1:]):
        assert earlier.ended_at <= later.started_at


def test_leases_run_on_the_database_clock_and_a_late_worker_is_fenced_off(postgres_url: str) -> None:
    state = open_state(postgres_url)
    state.record_series(series("1.2.3"))
    job = state.add_job("1.2.3", "f", "/x")
    paused = state.claim("paused", 0.5, 3)
    assert paused.lease_expires_at - state.now() == pytest.approx(0.5, abs=0.2)
    time.sleep(0.7)  # the worker was stopped past its lease
    fresh = state.claim("fresh", 60, 3)
    assert fresh.id == job.id and fresh.token > paused.token
    assert not state.renew(job.id, paused.token, 60)
    assert not state.stage_deliveries(job.id, paused.token, [NewDelivery("A@h:1", "/late")])
    assert not state.complete(job.id, paused.token, {"late": True}, [NewDelivery("A@h:1", "/late")])
    assert state.complete(job.id, fresh.token, {"fresh": True}, [NewDelivery("A@h:1", "/fresh")])
    assert state.job_result(job.id) == {"fresh": True}
    assert [d.file for d in state.deliveries(job.id)] == ["/fresh"]
    first, second = state.runs("1.2.3")
    assert first.outcome is RunOutcome.LEASE_EXPIRED and first.ended_at <= second.started_at


def test_a_server_restart_loses_nothing_and_is_logged(postgres_server, postgres_url: str,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    state = open_state(postgres_url)
    state.record_series(series("1.2.3"))
    job = state.add_job("1.2.3", "f", "/x")
    claimed = state.claim("w", 60, 3)
    caplog.set_level(logging.WARNING, logger="node.state.postgres")
    postgres_server.restart_immediate()
    assert state.renew(job.id, claimed.token, 60)  # reconnects by itself
    assert state.complete(job.id, claimed.token, {}, [NewDelivery("A@h:1", "/f")])
    assert state.get_job(job.id).status is JobStatus.DONE and len(state.deliveries(job.id)) == 1
    events = [r.getMessage() for r in caplog.records]
    assert any("event=state_database_unreachable" in e for e in events)
    assert any("event=state_database_back" in e for e in events)


def test_a_write_waits_while_the_server_is_down_and_goes_through_when_it_is_back(postgres_server,
                                                                                 postgres_url: str) -> None:
    state = open_state(postgres_url)
    state.record_series(series("1.2.3"))
    postgres_server.stop()
    added: list = []
    writer = threading.Thread(target=lambda: added.append(state.add_job("1.2.3", "f", "/x")))
    writer.start()
    time.sleep(1.5)
    assert writer.is_alive() and not added  # waiting, not failing
    postgres_server.start()
    writer.join(60)
    assert added and added[0] is not None and state.job_counts() == {"queued": 1}


def test_each_serve_delivers_and_prunes_only_what_its_spool_holds(postgres_url: str) -> None:
    one, two = open_state(postgres_url, serve="recv1"), open_state(postgres_url, serve="recv2")
    one.record_series(series("1.1"))
    two.record_series(series("2.2"))
    for state, uid in ((one, "1.1"), (two, "2.2")):
        job = state.add_job(uid, "f", "/x")
        claimed = state.claim("w", 60, 3)
        assert claimed.id == job.id
        state.complete(job.id, claimed.token, {}, [NewDelivery("A@h:1", f"/{uid}")])
    assert [d.file for d in one.due_deliveries()] == ["/1.1"]
    assert [d.file for d in two.due_deliveries()] == ["/2.2"]
    assert one.get_series("2.2").serve == "recv2"
    assert [uid for uid, _ in one.prunable_series(cutoff=one.now() + 1, limit=10)] == []  # deliveries pending
