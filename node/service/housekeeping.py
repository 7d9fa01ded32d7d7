"""Retention: the spooled images and outbox folders of settled jobs go after `storage.retention_days`.

Without it the spool grows by every CT received until the free-disk watermark makes the receiver
refuse images. Only what nothing can still need is removed:
- a series' images, once every job for it is done, failed or skipped and no delivery is pending,
  all of it longer ago than the retention (SeriesTracker.prune does the removal, so an image
  arriving for that series meanwhile is refused and resent, never acknowledged and then lost);
- a job's outbox folder, under the same conditions for that job.
Each removal is recorded first, in a transaction that checks the conditions again, so an operator's
`retry` either sees the removal and explains it, or keeps the files. Measurements stay in the state
database, and results already delivered stay where they were delivered.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from node.config import StorageConfig
from node.ingest.series import SeriesTracker
from node.state.store import State

log = logging.getLogger(__name__)

INTERVAL_S = 600.0  # a round every ten minutes; retention is counted in days
BATCH = 50  # series and outboxes per round, so that a backlog does not hold up series completion
SECONDS_PER_DAY = 86400.0


class Housekeeper:
    """Run from the scheduler thread, the one that also turns completed series into jobs."""

    def __init__(self, storage: StorageConfig, state: State, tracker: SeriesTracker,
                 clock: Callable[[], float] = time.time) -> None:
        self._storage = storage
        self._state = state
        self._tracker = tracker
        self._clock = clock
        self._next_round = 0.0  # monotonic

    def tick(self) -> None:
        """A round when one is due; a full batch means a backlog, so the next round follows at once.

        Rounds are spaced by the monotonic clock; the cutoff is wall time, as the records it compares.
        """
        if self._storage.retention_days == 0 or time.monotonic() < self._next_round:
            return
        removed = self.run_once()
        self._next_round = time.monotonic() + (0.0 if BATCH in removed else INTERVAL_S)

    def run_once(self) -> tuple[int, int]:
        """Prune what settled before the retention cutoff; returns (series, outboxes) removed."""
        cutoff = self._clock() - self._storage.retention_days * SECONDS_PER_DAY
        series = sum(self._prune_series(uid, Path(folder), cutoff)
                     for uid, folder in self._state.prunable_series(cutoff, BATCH))
        outboxes = sum(self._prune_outbox(job_id, cutoff) for job_id in self._state.prunable_outboxes(cutoff, BATCH))
        return series, outboxes

    def _prune_series(self, series_uid: str, folder: Path, cutoff: float) -> int:
        removed = self._tracker.prune(series_uid, folder, lambda: self._state.mark_series_pruned(series_uid, cutoff))
        if removed is None:
            return 0
        log.info("event=spool_pruned series=%s files=%d", series_uid, removed)
        return 1

    def _prune_outbox(self, job_id: int, cutoff: float) -> int:
        if not self._state.mark_outbox_pruned(job_id, cutoff):
            return 0
        shutil.rmtree(self._storage.job_outbox(job_id), ignore_errors=True)
        log.info("event=outbox_pruned job=%d", job_id)
        return 1
