"""The SQLite state: schema versioning, atomic claims, leases, completion with deliveries, retries."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest
from support import Clock

from node.state.store import (
    SCHEMA_VERSION,
    DeliveryStatus,
    JobStatus,
    NewDelivery,
    RunOutcome,
    SeriesRecord,
    State,
    StateError,
    open_state,
)


def series(uid: str = "1.2.3", date: str = "20240105") -> SeriesRecord:
    return SeriesRecord(series_uid=uid, study_uid="1.2", patient_id="P1", accession="A1", study_date=date,
                        modality="CT", description="chest", instances=40, fingerprint="f", series_dir="/spool/x")


@pytest.fixture
def clock() -> Clock:
    return Clock(1000.0)


@pytest.fixture
def state(tmp_path: Path, clock: Clock) -> State:
    db = State(tmp_path / "state.sqlite", clock=clock)
    db.record_series(series())
    yield db
    db.close()


def test_new_database_is_at_current_schema_in_wal_mode(tmp_path: Path) -> None:
    db = open_state(tmp_path / "sub" / "state.sqlite")
    assert db.schema_version == SCHEMA_VERSION
    db.close()
    raw = sqlite3.connect(tmp_path / "sub" / "state.sqlite")
    assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_reopening_keeps_data_and_newer_schema_is_refused(tmp_path: Path, state: State) -> None:
    state.add_job("1.2.3", "f", "/spool/x")
    reopened = open_state(tmp_path / "state.sqlite")
    assert [j.series_uid for j in reopened.jobs()] == ["1.2.3"]
    reopened.close()
    raw = sqlite3.connect(tmp_path / "state.sqlite")
    raw.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    raw.close()
    with pytest.raises(StateError, match="upgrade paraspinal-node"):
        open_state(tmp_path / "state.sqlite")


def test_same_content_gets_one_job_and_grown_content_another(state: State) -> None:
    first = state.add_job("1.2.3", "f1", "/spool/x")
    assert first is not None and first.status is JobStatus.QUEUED
    assert state.add_job("1.2.3", "f1", "/spool/x") is None
    assert state.has_job_for("1.2.3", "f1") and not state.has_job_for("1.2.3", "f2")
    assert state.add_job("1.2.3", "f2", "/spool/x") is not None


def test_skipped_job_keeps_its_reason(state: State) -> None:
    job = state.add_job("1.2.3", "f", "/x", JobStatus.SKIPPED, "modality MR is not in selection.modalities")
    assert job.status is JobStatus.SKIPPED and "selection.modalities" in job.last_error
    assert state.claim("w", 60, 3) is None


def test_claim_is_exclusive_across_connections(tmp_path: Path, state: State) -> None:
    for n in range(20):  # one series each: a series runs one job at a time
        state.record_series(series(f"1.2.{n + 10}"))
        state.add_job(f"1.2.{n + 10}", "f", "/x")
    others = [open_state(tmp_path / "state.sqlite") for _ in range(4)]
    claimed: list[int] = []

    def drain(db: State, owner: str) -> None:
        while (job := db.claim(owner, 60, 3)) is not None:
            claimed.append(job.id)

    threads = [threading.Thread(target=drain, args=(db, f"w{i}")) for i, db in enumerate(others)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(claimed) == list(range(1, 21))


def test_expired_lease_requeues_then_fails_after_max_attempts(state: State, clock: Clock) -> None:
    job = state.add_job("1.2.3", "f", "/x")
    dead = state.claim("dead", lease_s=10, max_attempts=2)
    assert dead.id == job.id
    clock.now += 5
    assert state.claim("other", 10, 2) is None  # lease still valid
    clock.now += 10
    again = state.claim("other", 10, 2)
    assert again.id == job.id and again.attempts == 2 and again.lease_owner == "other"
    assert again.token > dead.token
    assert not state.renew(job.id, dead.token, 10)
    clock.now += 20
    assert state.claim("third", 10, 2) is None
    final = state.get_job(job.id)
    assert final.status is JobStatus.FAILED and "lease expired" in final.last_error


def test_renew_keeps_the_job(state: State, clock: Clock) -> None:
    job = state.add_job("1.2.3", "f", "/x")
    claimed = state.claim("w", 10, 3)
    for _ in range(5):
        clock.now += 8
        assert state.renew(job.id, claimed.token, 10)
    assert state.claim("other", 10, 3) is None


def test_complete_records_result_and_deliveries_once(state: State) -> None:
    job = state.add_job("1.2.3", "f", "/x")
    claimed = state.claim("w", 60, 3)
    wanted = [NewDelivery("PACS@h:104", "/out/seg.dcm"), NewDelivery("PACS@h:104", "/out/sr.dcm")]
    assert state.complete(job.id, claimed.token, {"levels": []}, wanted)
    # the same attempt completing again (its first answer was lost) changes nothing
    assert state.complete(job.id, claimed.token, {"levels": [1]}, wanted + [NewDelivery("PACS@h:104", "/out/x.dcm")])
    assert state.get_job(job.id).status is JobStatus.DONE
    assert state.job_result(job.id) == {"levels": []}
    assert [d.file for d in state.deliveries(job.id)] == ["/out/seg.dcm", "/out/sr.dcm"]


def test_complete_by_a_worker_that_lost_the_lease_changes_nothing(state: State, clock: Clock) -> None:
    job = state.add_job("1.2.3", "f", "/x")
    slow = state.claim("slow", 10, 3)
    clock.now += 11
    fast = state.claim("fast", 10, 3)
    assert not state.complete(job.id, slow.token, {}, [NewDelivery("A@h:1", "/f")])
    assert not state.stage_deliveries(job.id, slow.token, [NewDelivery("A@h:1", "/g")])
    assert not state.fail(job.id, slow.token, "late", retry_in_s=None)
    assert state.deliveries(job.id) == [] and state.get_job(job.id).status is JobStatus.RUNNING
    assert state.complete(job.id, fast.token, {}, [])


def test_a_lease_expired_but_not_yet_reclaimed_cannot_complete(state: State, clock: Clock) -> None:
    job = state.add_job("1.2.3", "f", "/x")
    paused = state.claim("paused", 10, 3)
    clock.now += 11
    assert not state.lease_is_current(job.id, paused.token)
    assert not state.complete(job.id, paused.token, {}, [NewDelivery("A@h:1", "/f")])
    assert not state.renew(job.id, paused.token, 10)
    assert state.claim("next", 10, 3).token > paused.token


def test_staged_deliveries_appear_only_with_the_completion_of_the_same_token(state: State) -> None:
    job = state.add_job("1.2.3", "f", "/x")
    claimed = state.claim("remote", 60, 3)
    assert state.lease_is_current(job.id, claimed.token)
    assert state.stage_deliveries(job.id, claimed.token, [NewDelivery("A@h:1", "/outbox/seg.dcm")])
    assert state.stage_deliveries(job.id, claimed.token, [NewDelivery("A@h:1", "/outbox/seg.dcm")])  # repeated STOW
    assert state.deliveries(job.id) == []
    assert state.complete(job.id, claimed.token, {}, [])
    assert [d.file for d in state.deliveries(job.id)] == ["/outbox/seg.dcm"]


def test_one_running_job_per_series_and_every_run_recorded(state: State, clock: Clock) -> None:
    first = state.add_job("1.2.3", "f1", "/x")
    second = state.add_job("1.2.3", "f2", "/x")
    claimed = state.claim("a", 10, 3)
    assert claimed.id == first.id
    assert state.claim("b", 10, 3) is None  # the series' other content waits for the running one
    clock.now += 11  # a's lease expires: its run ends at the expiry
    again = state.claim("b", 10, 3)
    assert again.id == first.id
    assert state.complete(first.id, again.token, {}, [])
    assert state.claim("c", 10, 3).id == second.id
    runs = state.runs("1.2.3")
    assert [(r.owner, r.outcome) for r in runs] == [("a", RunOutcome.LEASE_EXPIRED), ("b", RunOutcome.DONE),
                                                    ("c", None)]
    assert runs[0].ended_at == runs[0].started_at + 10 <= runs[1].started_at
    assert runs[1].ended_at <= runs[2].started_at


def test_fail_with_retry_time_requeues_later(state: State, clock: Clock) -> None:
    job = state.add_job("1.2.3", "f", "/x")
    claimed = state.claim("w", 60, 3)
    state.fail(job.id, claimed.token, "RuntimeError: boom", retry_in_s=30)
    assert state.claim("w", 60, 3) is None
    clock.now += 31
    assert state.claim("w", 60, 3).id == job.id


def test_hold_release_and_stop_do_not_count_attempts(state: State) -> None:
    job = state.add_job("1.2.3", "f", "/x")
    claimed = state.claim("w", 60, 3)
    state.hold(job.id, claimed.token, "weights missing")
    assert state.get_job(job.id).status is JobStatus.HELD and state.get_job(job.id).attempts == 0
    assert state.claim("w", 60, 3) is None
    assert state.release_held() == 1
    claimed = state.claim("w", 60, 3)
    assert state.release(job.id, claimed.token)
    assert state.get_job(job.id).status is JobStatus.QUEUED and state.get_job(job.id).attempts == 0


def test_requeue_owner_frees_a_dead_workers_job_at_once(state: State) -> None:
    job = state.add_job("1.2.3", "f", "/x")
    state.claim("dead", 600, 3)
    assert state.requeue_owner("dead") == 1
    assert state.claim("new", 600, 3).id == job.id


def test_retry_requeues_failed_job_and_resends_failed_deliveries(state: State) -> None:
    job = state.add_job("1.2.3", "f", "/x")
    claimed = state.claim("w", 60, 3)
    state.fail(job.id, claimed.token, "refused input: no pixels", retry_in_s=None)
    assert "queued again" in state.retry(job.id)
    claimed = state.claim("w", 60, 3)
    state.complete(job.id, claimed.token, {}, [NewDelivery("A@h:1", "/f")])
    delivery = state.deliveries(job.id)[0]
    state.mark_not_sent(delivery.id, "refused", None)
    assert state.deliveries(job.id)[0].status is DeliveryStatus.FAILED
    assert "1 failed deliveries" in state.retry(job.id)
    assert state.deliveries(job.id)[0].status is DeliveryStatus.PENDING
    with pytest.raises(StateError, match="nothing to retry"):
        state.retry(job.id)
    with pytest.raises(StateError, match="no job 99"):
        state.retry(99)


def test_sent_delivery_is_never_due_again(state: State, clock: Clock) -> None:
    job = state.add_job("1.2.3", "f", "/x")
    claimed = state.claim("w", 60, 3)
    state.complete(job.id, claimed.token, {}, [NewDelivery("A@h:1", "/a"), NewDelivery("A@h:1", "/b")])
    first, second = state.due_deliveries()
    state.mark_sent(first.id)
    state.mark_not_sent(second.id, "association rejected", clock.now + 10)
    assert state.due_deliveries() == []
    clock.now += 10
    assert [d.id for d in state.due_deliveries()] == [second.id]
    state.mark_not_sent(first.id, "late failure", clock.now)
    assert state.deliveries(job.id)[0].status is DeliveryStatus.SENT


def test_processed_lists_latest_done_job_per_series_since_a_date(state: State) -> None:
    state.record_series(series("9.9", date="20231231"))
    for uid, content, result in (("1.2.3", "a", {"v": 1}), ("1.2.3", "b", {"v": 2}), ("9.9", "a", {"v": 3})):
        job = state.add_job(uid, content, "/x")
        claimed = state.claim("w", 60, 3)
        state.complete(job.id, claimed.token, result, [])
    rows = state.processed(None)
    assert [(s.series_uid, r) for s, _, r in rows] == [("9.9", {"v": 3}), ("1.2.3", {"v": 2})]
    assert [s.series_uid for s, _, _ in state.processed("20240101")] == ["1.2.3"]
