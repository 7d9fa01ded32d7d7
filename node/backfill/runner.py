"""Serve's backfill thread: search the PACS day by day, then retrieve the chosen series, throttled.

Search: a C-FIND for the day's studies with ModalitiesInStudy (each listed modality), queried again
in halves of the day by StudyTime while an answer is incomplete or reaches `query.result_limit`;
then a series-level C-FIND per study, keeping the series that pass selection.* (what a C-FIND can
tell: modality, slice thickness, image count, description and body part) and whose header names
one of `query.protocols`. A day's candidates and the next day are recorded together (resume).

Retrieve: one series per association (C-MOVE to the node's own AE, or C-GET into the receiver's
store path), `max_associations` at a time, only inside `windows`, never more than `studies_per_hour`
studies in any hour (counted in the state, so a restart does not reset it), and not while more
than `max_live_queue` jobs wait. A retrieve counts only when the spool holds as many instances as
the PACS listed (NumberOfSeriesRelatedInstances): a partial one, whatever the PACS's status said,
is retried after `retry_delay_s` and failed after `max_attempts`; the series tracker holds a partial
backfilled series back from measurement meanwhile (node.ingest.series).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import date, datetime, timedelta

from pydicom.dataset import Dataset

from node.backfill.windows import is_open, parse_windows
from node.config import BackfillQueryConfig, Config
from node.ingest.series import SeriesSummary, selection_refusal
from node.ingest.spool import Spool
from node.protocol import protocol_by_header
from node.query_retrieve import Answers, Pacs, PacsError, Retrieved, Storage, StoreHandlers, storage_classes
from node.state.backfill import Backfill, Candidate, CandidateRow
from node.state.store import State

log = logging.getLogger(__name__)

DAY_SECONDS = 86400
HOUR_S = 3600.0


def study_identifier(day: str, modality: str, times: tuple[int, int] | None) -> Dataset:
    """Study-level C-FIND keys; no patient name is asked for (it would end up in logs)."""
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyDate = day
    ds.StudyTime = "" if times is None else f"{_hhmmss(times[0])}-{_hhmmss(times[1])}"
    ds.ModalitiesInStudy = modality
    ds.StudyInstanceUID = ""
    ds.StudyDescription = ""
    return ds


def series_identifier(study_uid: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "SERIES"
    ds.StudyInstanceUID = study_uid
    for keyword in ("SeriesInstanceUID", "Modality", "SeriesDescription", "BodyPartExamined", "ProtocolName",
                    "SliceThickness", "NumberOfSeriesRelatedInstances"):
        setattr(ds, keyword, "")
    return ds


def retrieve_identifier(candidate: Candidate, level: str = "SERIES") -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    ds.StudyInstanceUID = candidate.study_uid
    ds.SeriesInstanceUID = candidate.series_uid
    if level == "IMAGE":
        ds.SOPInstanceUID = ""
    return ds


def _hhmmss(seconds: int) -> str:
    return f"{seconds // 3600:02d}{seconds // 60 % 60:02d}{seconds % 60:02d}"


def next_day(day: str) -> str:
    return (datetime.strptime(day, "%Y%m%d").date() + timedelta(days=1)).strftime("%Y%m%d")


def day_text(value: date) -> str:
    return value.strftime("%Y%m%d")


class BackfillRunner:
    """One round at a time (`run_once`), from serve's backfill thread or a test with an injected clock."""

    def __init__(self, config: Config, state: State, spool: Spool, store: StoreHandlers | None = None,
                 spooled_classes: list[str] | None = None, clock: Callable[[], float] = time.time,
                 pacs: Pacs | None = None) -> None:
        settings = config.backfill
        self._config = config
        self._settings = settings
        self._state = state
        self._spool = spool
        self._storage = Storage(storage_classes(spooled_classes or []), store or [])
        self._clock = clock
        self._windows = parse_windows(settings.windows)
        self._pacs = pacs or (Pacs(settings.pacs, config.receiver.ae_title, "backfill.pacs", settings.timeout_s)
                              if settings.pacs is not None else None)
        self._destination = settings.move_destination or config.receiver.ae_title
        self._pool = ThreadPoolExecutor(settings.max_associations, thread_name_prefix="backfill-retrieve")
        self._paused_for: str | None = None

    def run(self, stop: threading.Event, interval_s: float = 1.0) -> None:
        """Work until `stop`; an error ends one round, never the thread."""
        while not stop.is_set():
            try:
                busy = self.run_once()
            except Exception:
                log.exception("event=backfill_round_failed retry_in_s=%g", interval_s)
                busy = False
            if not busy:
                stop.wait(interval_s)
        self._pool.shutdown(wait=True)

    def run_once(self) -> bool:
        """Search one day or retrieve one batch of the first running backfill that can go on; True if it did."""
        backfills = self._state.backfills(running_only=True, serve=self._state.serve)
        if not backfills or self._pacs is None:
            return False
        if self._pause("outside backfill.windows", not is_open(self._windows, datetime.fromtimestamp(self._clock()))):
            return False
        for backfill in backfills:
            if backfill.searching:
                return self._search_day(backfill)
            if self._retrieve_batch(backfill):
                return True
            if self._state.finish_backfill(backfill.id):
                log.info("event=backfill_done backfill=%d", backfill.id)
        return False

    # ------------------------------------------------------------------------------ pausing

    def _pause(self, reason: str, paused: bool) -> bool:
        """Log a pause and the resume once each, not every round."""
        if paused and self._paused_for != reason:
            log.info("event=backfill_paused reason=%r", reason)
            self._paused_for = reason
        elif not paused and self._paused_for == reason:
            log.info("event=backfill_resumed after=%r", reason)
            self._paused_for = None
        return paused

    def _gate(self, candidate: Candidate, counted: set[str]) -> bool:
        """Whether this candidate may be retrieved now; `counted` is the studies begun in the last hour."""
        limit = self._settings.studies_per_hour
        full = bool(limit) and candidate.study_uid not in counted and len(counted) >= limit
        if self._pause("backfill.studies_per_hour reached", full):
            return False
        busy = self._state.live_queue() > self._settings.max_live_queue
        return not self._pause("more jobs waiting than backfill.max_live_queue", busy)

    # ------------------------------------------------------------------------------ search

    def _search_day(self, backfill: Backfill) -> bool:
        day = backfill.next_day
        query = BackfillQueryConfig(**backfill.query)
        try:
            candidates = [c for study in self._studies(day, query) for c in self._chosen_series(study, query)]
        except PacsError as exc:
            log.warning("event=backfill_search_failed backfill=%d day=%s reason=%s", backfill.id, day, exc)
            return False
        added = self._state.record_backfill_day(backfill.id, day, next_day(day), candidates)
        log.info("event=backfill_day_searched backfill=%d day=%s series=%d new=%d", backfill.id, day, len(candidates),
                 added)
        return True

    def _studies(self, day: str, query: BackfillQueryConfig) -> list[Dataset]:
        found: dict[str, Dataset] = {}
        for modality in query.modalities_in_study:
            for study in self._studies_between(day, modality, None, query.result_limit):
                found.setdefault(str(study.get("StudyInstanceUID", "")), study)
        found.pop("", None)
        return list(found.values())

    def _studies_between(self, day: str, modality: str, times: tuple[int, int] | None, limit: int) -> list[Dataset]:
        """The whole day first (studies without StudyTime included), then halves while the PACS holds back."""
        answers: Answers = self._pacs.find(study_identifier(day, modality, times))
        if answers.complete and len(answers.matches) < limit:
            return answers.matches
        low, high = times or (0, DAY_SECONDS - 1)
        if high <= low:
            log.warning("event=backfill_search_incomplete day=%s time=%s reason=%s", day, _hhmmss(low),
                        f"{len(answers.matches)} studies within one second reach query.result_limit ({limit})")
            return answers.matches
        middle = (low + high) // 2
        log.info("event=backfill_search_split day=%s from=%s to=%s answers=%d", day, _hhmmss(low), _hhmmss(high),
                 len(answers.matches))
        return (self._studies_between(day, modality, (low, middle), limit)
                + self._studies_between(day, modality, (middle + 1, high), limit))

    def _chosen_series(self, study: Dataset, query: BackfillQueryConfig) -> list[Candidate]:
        study_uid = str(study.StudyInstanceUID)
        chosen = []
        for series in self._pacs.find(series_identifier(study_uid)).matches:
            series.StudyDescription = study.get("StudyDescription", "")
            if self._refusal(series, query) is not None:
                continue
            expected = _int(series.get("NumberOfSeriesRelatedInstances"))
            if expected is None:  # not every PACS counts: ask for the instances
                expected = len(self._pacs.find(retrieve_identifier(
                    Candidate(str(series.SeriesInstanceUID), study_uid, "", 0), "IMAGE")).matches)
            chosen.append(Candidate(str(series.SeriesInstanceUID), study_uid, str(study.get("StudyDate", "")), expected))
        return chosen

    def _refusal(self, series: Dataset, query: BackfillQueryConfig) -> str | None:
        """selection.* as far as a C-FIND answer shows it, then the protocol its header names."""
        thickness = _float(series.get("SliceThickness"))
        instances = _int(series.get("NumberOfSeriesRelatedInstances"))
        summary = SeriesSummary(
            modalities=frozenset({str(series.get("Modality", ""))}), image_types=(),
            slice_thicknesses=frozenset({thickness} if thickness is not None else ()),
            description=str(series.get("SeriesDescription", "")), body_part=str(series.get("BodyPartExamined", "")),
            kernel="", instances=instances if instances is not None else self._config.selection.min_slices)
        rules = dataclasses.replace(self._config.selection, image_type=[], kernel_include="", kernel_exclude="")
        refusal = selection_refusal(summary, rules)
        if refusal is not None:
            return refusal
        choice = protocol_by_header(series, self._config.protocols)
        if choice is None or choice.protocol.name not in query.protocols:
            return "its header names none of query.protocols"
        return None

    # ------------------------------------------------------------------------------ retrieve

    def _retrieve_batch(self, backfill: Backfill) -> bool:
        """Up to max_associations retrieves side by side; True if any began."""
        now = self._clock()
        due = self._state.due_candidates(backfill.id, now, self._settings.max_associations)
        counted = self._state.studies_retrieved_since(now - HOUR_S)
        batch: list[CandidateRow] = []
        for row in due:
            if not self._gate(row.candidate, counted):
                break
            self._state.start_retrieve(row.candidate.series_uid, now)
            counted.add(row.candidate.study_uid)
            batch.append(row)
        for future in [self._pool.submit(self._retrieve, row) for row in batch]:
            future.result()
        return bool(batch)

    def _retrieve(self, row: CandidateRow) -> None:
        candidate = row.candidate
        started = time.monotonic()
        try:
            result = self._transfer(candidate)
        except PacsError as exc:
            self._retry(row, str(exc))
            return
        received = len(self._spool.series_files(candidate.study_uid, candidate.series_uid))
        if received >= candidate.expected:
            self._state.retrieved(candidate.series_uid, self._clock())
            log.info("event=backfill_retrieved series=%s instances=%d seconds=%.1f", candidate.series_uid, received,
                     time.monotonic() - started)
            return
        self._retry(row, f"partial retrieve: {received} of {candidate.expected} instances ({result.describe()})")

    def _transfer(self, candidate: Candidate) -> Retrieved:
        identifier = retrieve_identifier(candidate)
        if self._settings.retrieve == "get":
            return self._pacs.get(identifier, self._storage)
        return self._pacs.move(identifier, self._destination)

    def _retry(self, row: CandidateRow, reason: str) -> None:
        attempts = row.attempts + 1
        final = attempts >= self._settings.max_attempts
        retry_at = None if final else self._clock() + self._settings.retry_delay_s
        self._state.retrieve_failed(row.candidate.series_uid, reason, retry_at)
        log.warning("event=backfill_retrieve_%s series=%s attempt=%d reason=%s", "failed" if final else "retried",
                    row.candidate.series_uid, attempts, reason)


def _int(value: object) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _float(value: object) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None
