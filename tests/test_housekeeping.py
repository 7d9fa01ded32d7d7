"""Retention: settled series leave the spool and the outbox after storage.retention_days, nothing else does."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from tracker_site import TrackerSite

from node.config import StorageConfig
from node.ingest.series import PrunedMeanwhile
from node.ingest.spool import Receipt
from node.service.housekeeping import Housekeeper
from node.state.store import SCHEMA_VERSION, NewDelivery, State, StateError

DAY = 86400.0


class Site(TrackerSite):
    """The series test node plus an outbox and a housekeeper keeping 10 days."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.storage = StorageConfig(state_dir=root, retention_days=10)
        self.housekeeper = Housekeeper(self.storage, self.state, self.tracker, clock=self.clock)

    def finished_job(self, association: str = "a1", delivery_status: str = "sent") -> int:
        """A received series whose job ran and wrote its outbox; its one delivery sent or failed."""
        self.send(4, association)
        (job_id,) = self.complete_after_release(association)
        outbox = self.storage.job_outbox(job_id) / "attempt-0"
        outbox.mkdir(parents=True)
        (outbox / "sr.dcm").write_bytes(b"result")
        claimed = self.state.claim("w", 60, 3)
        assert claimed.id == job_id
        self.state.complete(job_id, claimed.token, {}, [NewDelivery("PACS@127.0.0.1:104", str(outbox / "sr.dcm"))])
        (delivery,) = self.state.deliveries(job_id)
        if delivery_status == "sent":
            self.state.mark_sent(delivery.id)
        elif delivery_status == "failed":
            self.state.mark_not_sent(delivery.id, "refused", None)
        return job_id

    def spooled(self) -> list[Path]:
        return self.spool.series_files(self.study_uid, self.series_uid)


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return Site(tmp_path)


def test_settled_series_and_outbox_go_after_the_retention_and_retry_says_why(site: Site) -> None:
    job_id = site.finished_job(delivery_status="failed")
    site.clock.now += 9 * DAY
    assert site.housekeeper.run_once() == (0, 0)
    assert len(site.spooled()) == 4

    site.clock.now += 2 * DAY
    assert site.housekeeper.run_once() == (1, 1)
    assert site.spooled() == []
    assert not site.spool.series_dir(site.study_uid, site.series_uid).parent.exists()
    assert not site.storage.job_outbox(job_id).exists()
    assert site.housekeeper.run_once() == (0, 0)
    with pytest.raises(StateError, match="removed from the outbox after storage.retention_days"):
        site.state.retry(job_id)


def test_a_pending_delivery_keeps_the_images_and_the_results(site: Site) -> None:
    job_id = site.finished_job(delivery_status="pending")
    site.clock.now += 30 * DAY
    assert site.housekeeper.run_once() == (0, 0)
    assert len(site.spooled()) == 4 and site.storage.job_outbox(job_id).exists()


def test_a_job_queued_again_by_retry_keeps_its_images(site: Site) -> None:
    site.send(4, "a1")
    (job_id,) = site.complete_after_release("a1")
    claimed = site.state.claim("w", 60, 3)
    site.state.fail(job_id, claimed.token, "segmenter crashed", retry_in_s=None)
    site.clock.now += 11 * DAY
    site.state.retry(job_id)
    assert site.housekeeper.run_once() == (0, 0)
    assert len(site.spooled()) == 4


def test_a_series_receiving_again_is_left_alone_until_it_settles(site: Site) -> None:
    site.finished_job()
    site.clock.now += 11 * DAY
    site.send(1, "a2")  # more of the same series, still in flight
    assert site.housekeeper.run_once() == (0, 1)
    assert len(site.spooled()) == 5
    (grown,) = site.complete_after_release("a2")
    assert site.state.get_job(grown).status.value == "queued"
    assert site.housekeeper.run_once() == (0, 0)


def test_an_instance_pruned_as_it_arrives_is_not_acknowledged(site: Site) -> None:
    site.send(1, "a1")
    path = site.spooled()[0]
    instance = site.spool.store(path, Receipt("a2", "SCU", site.clock.now))
    path.unlink()
    with pytest.raises(PrunedMeanwhile, match="send it again"):
        site.tracker.instance_stored(instance)


def test_a_series_sent_again_after_pruning_is_processed_and_retried_normally(site: Site) -> None:
    first = site.finished_job()
    site.clock.now += 11 * DAY
    site.housekeeper.run_once()
    with pytest.raises(StateError, match="send the series to the node again"):
        site.state.retry(first)  # its one delivery was sent: nothing to retry, and the images are gone
    site.sent = 0
    site.send(4, "a3")
    (again,) = site.complete_after_release("a3")
    assert again != first and len(site.spooled()) == 4
    claimed = site.state.claim("w", 60, 3)
    site.state.fail(again, claimed.token, "segmenter crashed", retry_in_s=None)
    assert site.state.retry(again) == f"job {again} queued again"


def test_zero_days_keeps_everything(site: Site) -> None:
    site.finished_job()
    site.storage.retention_days = 0
    site.clock.now += 1000 * DAY
    site.housekeeper.tick()
    assert len(site.spooled()) == 4


def test_a_folder_outside_the_spool_is_never_removed(site: Site, tmp_path: Path) -> None:
    stranger = tmp_path / "elsewhere" / "series"
    stranger.mkdir(parents=True)
    (stranger / "keep.dcm").write_bytes(b"x")
    with pytest.raises(ValueError, match="not a series folder of the spool"):
        site.tracker.prune("1.2.3", stranger, lambda: True)
    assert (stranger / "keep.dcm").exists()


def test_a_database_of_the_first_schema_is_migrated_with_its_rows(tmp_path: Path) -> None:
    database = tmp_path / "state.sqlite"
    raw = sqlite3.connect(database)
    raw.executescript((Path(__file__).parent / "data" / "state-schema-1.sql").read_text())
    raw.execute("INSERT INTO series VALUES ('1.2.3', '1.2', 'P', 'A', '20240101', 'CT', '', 4, 'f', '/x', 0)")
    raw.execute("PRAGMA user_version=1")
    raw.commit()
    raw.close()
    state = State(database)
    assert state.schema_version == SCHEMA_VERSION >= 2
    assert state.get_series("1.2.3").instances == 4
    assert state.prunable_series(cutoff=1.0, limit=10) == [("1.2.3", "/x")]
    state.close()
