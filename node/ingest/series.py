"""Series completion and selection: when a spooled series is whole, and whether it is worth a job.

Only whole series are completed. A series is complete `completion.release_quiet_s` after the
last association that carried it was released cleanly. While any association carrying it is open
it waits, however long that association is silent (the receiver's idle timeout aborts a stuck
one). A series cut off — its association aborted, or instances of it refused (0xA700 on a full
disk, a failed write) — waits for its sender to send it again: a later association that carries
it and is released without refusals makes it whole again. `completion.idle_completes_partial`
lets the idle period complete a cut-off series anyway. A series recovered from the spool after
a restart, with no record of how it was cut off, waits `completion.idle_quiet_s`.

Why each series waits is written to <state_dir>/pending.json for `status` and for the next start,
where a series whose association was open or aborted stays waiting for the resend. Durations use
the monotonic clock, so a step of the wall clock neither completes a series early nor delays it.

Each complete series is fingerprinted over its instances, so the same content is never queued twice
while a series that grew or had an instance replaced is queued again. Series that fail a
selection rule become skipped jobs that name the rule.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pydicom

from node.config import CompletionConfig, SelectionConfig
from node.ingest.dixon import DixonPairing, DixonRole, series_role, skip_reason
from node.ingest.spool import Receipt, Spool, SpooledInstance, SpoolError, StoreOutcome, summarize
from node.state.pending import PendingSeries, WaitReason, read_pending, take_completion_requests, write_pending
from node.state.store import JobStatus, SeriesRecord, State

log = logging.getLogger(__name__)

_RECOVERED = Receipt(association_id="recovered", calling_ae="", received_at=0.0)
_RETRY_AFTER_FAILURE_S = 10.0  # a series whose job could not be recorded is tried again this much later
_RECORD_EVERY_S = 1.0  # the pending file is rewritten at most this often (and only when it changed)


@dataclass(frozen=True)
class SeriesSummary:
    """The series-level header values the selection rules test (the most common value of each)."""

    modalities: frozenset[str]
    image_types: tuple[tuple[str, ...], ...]
    slice_thicknesses: frozenset[float]
    description: str
    body_part: str
    kernel: str
    instances: int


def summarize_series(instances: list[SpooledInstance]) -> SeriesSummary:
    """Collapse instance headers; modality, ImageType and thickness keep every distinct value."""
    return SeriesSummary(
        modalities=frozenset(i.modality for i in instances),
        image_types=tuple(sorted({i.image_type for i in instances})),
        slice_thicknesses=frozenset(i.slice_thickness for i in instances if i.slice_thickness is not None),
        description=_most_common(i.series_description for i in instances),
        body_part=_most_common(i.body_part for i in instances),
        kernel=_most_common(i.convolution_kernel for i in instances),
        instances=len(instances),
    )


def selection_refusal(summary: SeriesSummary, rules: SelectionConfig) -> str | None:
    """The first rule the series fails, as a one-line reason naming the config key; None if selected."""
    allowed = {m.upper() for m in rules.modalities}
    other = sorted(m for m in summary.modalities if m.upper() not in allowed)
    if other:
        return f"modality {', '.join(other) or '(none)'} is not in selection.modalities"
    required = {v.upper() for v in rules.image_type}
    for image_type in summary.image_types:
        missing = sorted(required - {v.upper() for v in image_type})
        if missing:
            shown = "\\".join(image_type) or "(none)"
            return f"ImageType {shown} lacks {', '.join(missing)} (selection.image_type)"
    outside = sorted(t for t in summary.slice_thicknesses
                     if not rules.slice_thickness_min_mm <= t <= rules.slice_thickness_max_mm)
    if outside:
        return (f"slice thickness {outside[0]:g} mm is outside selection.slice_thickness_min_mm.."
                f"slice_thickness_max_mm ({rules.slice_thickness_min_mm:g}..{rules.slice_thickness_max_mm:g} mm)")
    if summary.instances < rules.min_slices:
        return f"{summary.instances} slices, fewer than selection.min_slices ({rules.min_slices})"
    return _pattern_refusal(summary, rules)


def _pattern_refusal(summary: SeriesSummary, rules: SelectionConfig) -> str | None:
    values = {"series_description": summary.description, "body_part": summary.body_part, "kernel": summary.kernel}
    for name, value in values.items():
        include, exclude = getattr(rules, f"{name}_include"), getattr(rules, f"{name}_exclude")
        if include and not re.search(include, value):
            return f"{name.replace('_', ' ')} {value!r} does not match selection.{name}_include"
        if exclude and re.search(exclude, value):
            return f"{name.replace('_', ' ')} {value!r} matches selection.{name}_exclude"
    return None


def fingerprint(files: list[Path]) -> str:
    """Identity of a series' content, without reading pixels: instance UIDs, sizes, mtimes.

    A corrected instance often keeps its size; the spool rewrites it (new mtime), whereas a
    byte-identical resend is not written at all. Inodes are left out on purpose: a spool restored
    or copied with its times (cp -a, rsync -t) must not look new and be sent to the PACS again.
    """
    digest = hashlib.sha256()
    for path in sorted(files, key=lambda p: p.name):
        info = path.stat()
        digest.update(f"{path.stem}:{info.st_size}:{info.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _most_common(values) -> str:
    counts = Counter(values)
    return counts.most_common(1)[0][0] if counts else ""


@dataclass
class _Pending:
    study_uid: str
    last_instance_at: float  # monotonic
    first_seen: float = field(default_factory=time.time)  # wall clock, a record for `status`
    open_associations: set[str] = field(default_factory=set)
    released_at: float | None = None  # monotonic
    cut_off: WaitReason | None = None  # ABORTED or REFUSED until a clean resend
    resent_by: set[str] = field(default_factory=set)  # associations begun since it was cut off
    open_at_cut: set[str] = field(default_factory=set)  # associations already open then: not a resend
    instances: dict[str, SpooledInstance] = field(default_factory=dict)
    recovered_files: int = 0
    not_before: float = 0.0

    @property
    def reason(self) -> WaitReason:
        if self.open_associations:
            return WaitReason.OPEN_ASSOCIATION
        return self.cut_off or WaitReason.QUIET

    def complete_at(self, periods: CompletionConfig) -> float | None:
        """When the series counts as complete if nothing more arrives; None while it must wait for more."""
        if self.open_associations:
            return None
        if self.cut_off is not None:
            if not periods.idle_completes_partial:
                return None
            due = self.last_instance_at + periods.idle_quiet_s
        elif self.released_at is not None:
            due = min(self.last_instance_at + periods.idle_quiet_s, self.released_at + periods.release_quiet_s)
        else:  # recovered after a restart with no record of its associations
            due = self.last_instance_at + periods.idle_quiet_s
        return max(due, self.not_before)

    def complete(self, now: float, periods: CompletionConfig) -> bool:
        due = self.complete_at(periods)
        return due is not None and now >= due

    def cut(self, reason: WaitReason) -> None:
        """Cut off (an abort takes precedence over refusals): only a later association can resend it."""
        if self.cut_off is not WaitReason.ABORTED:
            self.cut_off = reason
        self.resent_by.clear()
        self.open_at_cut = set(self.open_associations)

    def record(self, series_uid: str) -> PendingSeries:
        count = max(len(self.instances), self.recovered_files)
        return PendingSeries(series_uid, self.study_uid, count, self.reason, self.first_seen)


class PrunedMeanwhile(Exception):
    """An instance's file was removed by retention between its write and its report."""


class SeriesTracker:
    """The spool's listener: tracks series in flight and turns complete ones into jobs.

    Receiver threads call `instance_stored`, `instance_refused`, `association_released` and
    `association_aborted`; the scheduler thread calls `tick`. The spool is durable and the pending
    file records why each series waits, so `recover` rebuilds the pending series after a restart.
    """

    def __init__(self, spool: Spool, state: State, completion: CompletionConfig, selection: SelectionConfig,
                 clock: Callable[[], float] = time.monotonic, pending_file: Path | None = None) -> None:
        self._spool = spool
        self._state = state
        self._completion = completion
        self._selection = selection
        self._clock = clock
        self._pending_file = pending_file
        self._lock = threading.Lock()
        self._record_lock = threading.Lock()
        self._pending: dict[str, _Pending] = {}
        self._refusing: dict[str, set[str]] = {}  # association -> SOP Instance UIDs refused and not yet stored
        self._recorded: list[PendingSeries] | None = None
        self._next_record = 0.0
        self._record_failed = False
        self._dixon = DixonPairing(completion.dixon_partner_wait_s)

    def instance_stored(self, instance: SpooledInstance) -> None:
        """Raises PrunedMeanwhile when retention removed the file as it was stored: the sender must not
        be told it is safe (the receiver answers a failure and the sender sends it again)."""
        with self._lock:
            if not instance.path.exists():
                raise PrunedMeanwhile(f"{instance.path.name} was removed by retention as it arrived: send it again")
            pending = self._pending.get(instance.series_uid)
            if pending is None:
                pending = self._pending[instance.series_uid] = _Pending(instance.study_uid, self._clock())
            pending.last_instance_at = self._clock()
            pending.released_at = None
            pending.open_associations.add(instance.association_id)
            if pending.cut_off is not None and instance.association_id not in pending.open_at_cut:
                pending.resent_by.add(instance.association_id)
            pending.instances[instance.sop_instance_uid] = instance
            refused = self._refusing.get(instance.association_id)
            if refused:
                refused.discard(instance.sop_instance_uid)

    def instance_refused(self, association_id: str, series_uid: str | None, sop_instance_uid: str | None) -> None:
        """The sender was told an instance failed: unless it sends that instance again in the same
        association (some senders retry at once), every series the association carries is cut off."""
        with self._lock:
            self._refusing.setdefault(association_id, set()).add(sop_instance_uid or "")
            pending = self._pending.get(series_uid) if series_uid else None
            if pending is not None:
                pending.cut(WaitReason.REFUSED)

    def association_released(self, association_id: str) -> None:
        """A clean release completes what it carried, and makes whole a cut-off series it resent."""
        now = self._clock()
        with self._lock:
            refused = bool(self._refusing.pop(association_id, None))
            for pending in self._carried_by(association_id):
                if refused:
                    pending.cut(WaitReason.REFUSED)
                elif association_id in pending.resent_by:
                    pending.cut_off = None  # sent again in full: whole again
                if not pending.open_associations:
                    pending.released_at = now
        self.record_pending(force=True)  # now, not up to a second later: a kill -9 must not find it "open"

    def association_aborted(self, association_id: str) -> None:
        """The sender did not finish: what the association carried waits for the resend."""
        with self._lock:
            self._refusing.pop(association_id, None)
            for pending in self._carried_by(association_id):
                pending.cut(WaitReason.ABORTED)

    def _carried_by(self, association_id: str) -> list[_Pending]:
        """The pending series this association stored instances of; it is no longer open for them."""
        carried = [p for p in self._pending.values() if association_id in p.open_associations]
        for pending in carried:
            pending.open_associations.discard(association_id)
        return carried

    def prune(self, series_uid: str, folder: Path, claim: Callable[[], bool]) -> int | None:
        """Remove a settled series' spooled files; None when it is receiving again or `claim` says no.

        Holds the lock that instance_stored takes, so an instance of this series stored meanwhile is
        either seen here as in flight (nothing is removed) or finds its file gone and is refused.
        """
        if folder.parent.parent != self._spool.root:
            raise ValueError(f"{folder} is not a series folder of the spool {self._spool.root}: not removed")
        with self._lock:
            if series_uid in self._pending or not claim():
                return None
            return self._spool.remove_series(folder)

    def next_completion_at(self) -> float | None:
        """The earliest (monotonic) time a pending series completes, so the scheduler can wake for it."""
        with self._lock:
            due = [at for p in self._pending.values() if (at := p.complete_at(self._completion)) is not None]
        return min(due, default=None)

    def pending_series(self) -> int:
        with self._lock:
            return len(self._pending)

    def waiting(self) -> list[PendingSeries]:
        """Every pending series and why it waits, oldest first."""
        with self._lock:
            records = [p.record(uid) for uid, p in self._pending.items()]
        return sorted(records, key=lambda r: (r.since, r.series_uid))

    def recover(self) -> int:
        """After a restart: every spooled series whose content has no job yet is pending again.

        A series recorded as cut off, or whose association was still open when serve stopped,
        waits for its sender's resend; any other waits for the idle period.
        """
        recorded = {r.series_uid: r for r in read_pending(self._pending_file)} if self._pending_file else {}
        now = self._clock()
        recovered = 0
        for study_uid, series_uid in self._spool.series():
            files = self._spool.series_files(study_uid, series_uid)
            if not files or self._state.has_job_for(series_uid, fingerprint(files)):
                continue
            with self._lock:
                if series_uid not in self._pending:
                    self._pending[series_uid] = _recovered(study_uid, now, len(files), recorded.get(series_uid))
                    recovered += 1
        if recovered:
            cut_off = sum(1 for p in self._pending.values() if p.cut_off is not None)
            log.info("event=series_recovered count=%d waiting_for_resend=%d", recovered, cut_off)
        self.record_pending(force=True)
        return recovered

    def tick(self) -> list[int]:
        """Turn every series whose quiet period is over into a job; returns the new job IDs."""
        now = self._clock()
        with self._lock:
            done = [(uid, p) for uid, p in self._pending.items() if p.complete(now, self._completion)]
            for uid, _ in done:
                del self._pending[uid]
        jobs = [job_id for uid, pending in done if (job_id := self._try_finish(uid, pending, now)) is not None]
        self.record_pending()
        return jobs

    def complete_as_is(self, series_uid: str) -> bool:
        """An operator's `complete`: a series waiting for a resend completes after release_quiet_s as it is."""
        now = self._clock()
        with self._lock:
            pending = self._pending.get(series_uid)
            if pending is None or pending.open_associations:
                log.warning("event=series_complete_request_ignored series=%s reason=%s", series_uid,
                            "not waiting for a resend" if pending is None else "an association carrying it is open")
                return False
            pending.cut_off = None
            pending.released_at = now
        log.info("event=series_completed_as_is series=%s reason=%s", series_uid, "operator request")
        return True

    def _take_requests(self) -> None:
        for series_uid in take_completion_requests(self._pending_file.parent):
            self.complete_as_is(series_uid)

    def record_pending(self, force: bool = False) -> None:
        """Take operators' `complete` requests and rewrite the pending file when it changed
        (at most once a second unless `force`)."""
        if self._pending_file is None or (not force and self._clock() < self._next_record):
            return
        with self._record_lock:  # the scheduler and association threads both record: the later snapshot wins
            self._record(force)

    def _record(self, force: bool) -> None:
        self._next_record = self._clock() + _RECORD_EVERY_S
        try:
            self._take_requests()
            waiting = self.waiting()
            if waiting != self._recorded or force:
                write_pending(self._pending_file, waiting)
                self._recorded = waiting
        except OSError as exc:  # a full disk: say it once, keep receiving; the spool is what matters
            if not self._record_failed:
                log.error("event=pending_file_failed file=%s error=%s", self._pending_file, exc.strerror or exc)
            self._record_failed = True
            return
        self._record_failed = False

    def _try_finish(self, series_uid: str, pending: _Pending, now: float) -> int | None:
        """Finish one series; on an unexpected error keep it pending rather than forget it until a restart."""
        try:
            return self._finish(series_uid, pending)
        except Exception:
            log.exception("event=series_finish_failed series=%s retry_in_s=%.0f", series_uid, _RETRY_AFTER_FAILURE_S)
            pending.not_before = now + _RETRY_AFTER_FAILURE_S
            with self._lock:
                self._pending.setdefault(series_uid, pending)
            return None

    def _held_for_partner(self, series_uid: str, pending: _Pending, role: DixonRole) -> bool:
        """A Dixon water series waits (bounded) for its fat series, so that the pair is one job."""
        now = self._clock()
        with self._lock:
            fat_in_flight = any(other.study_uid == pending.study_uid and other.instances
                                and _role(list(other.instances.values())) is DixonRole.FAT
                                for other in self._pending.values())
            until = self._dixon.hold_until(series_uid, pending.study_uid, role, fat_in_flight, now)
            if until is None:
                return False
            pending.not_before = until
            self._pending.setdefault(series_uid, pending)
        log.info("event=dixon_waits_for_partner series=%s", series_uid)
        return True

    def _finish(self, series_uid: str, pending: _Pending) -> int | None:
        files = self._spool.series_files(pending.study_uid, series_uid)
        if not files:
            return None
        content = fingerprint(files)
        if self._state.has_job_for(series_uid, content):
            log.info("event=series_unchanged series=%s instances=%d", series_uid, len(files))
            return None
        instances = _instances_for(files, pending.instances)
        if not instances:
            log.warning("event=series_unreadable series=%s instances=%d", series_uid, len(files))
            return None
        role = _role(instances)
        if self._held_for_partner(series_uid, pending, role):
            return None
        self._state.record_series(_record(series_uid, instances, content, files[0].parent))
        reason = selection_refusal(summarize_series(instances), self._selection) or skip_reason(role)
        self._dixon.finished(pending.study_uid, role)
        status = JobStatus.SKIPPED if reason else JobStatus.QUEUED
        job = self._state.add_job(series_uid, content, str(files[0].parent), status, reason)
        if job is None:
            return None
        log.info("event=series_complete series=%s job=%d instances=%d status=%s%s", series_uid, job.id,
                 len(instances), status, f" reason={reason!r}" if reason else "")
        return job.id


def _role(instances: list[SpooledInstance]) -> DixonRole:
    first = instances[0]
    return series_role(first.modality, first.image_type, first.series_description)


def _recovered(study_uid: str, now: float, files: int, recorded: PendingSeries | None) -> _Pending:
    """A spooled series found at start; cut off if serve last saw it open, aborted or refused."""
    pending = _Pending(study_uid, now, recovered_files=files)
    if recorded is not None:
        pending.first_seen = recorded.since
        if recorded.reason is WaitReason.OPEN_ASSOCIATION:
            pending.cut_off = WaitReason.ABORTED  # serve stopped under it: the sender was cut off
        elif recorded.reason.waits_for_resend:
            pending.cut_off = recorded.reason
        else:
            pending.released_at = now
    return pending


def _instances_for(files: list[Path], known: dict[str, SpooledInstance]) -> list[SpooledInstance]:
    """The summaries of the files on disk, reading headers only for instances not seen live."""
    instances = []
    for path in files:
        instance = known.get(path.stem) or _read_instance(path)
        if instance is not None:
            instances.append(instance)
    return instances


def _read_instance(path: Path) -> SpooledInstance | None:
    try:
        header = pydicom.dcmread(path, stop_before_pixels=True)
    except (OSError, pydicom.errors.InvalidDicomError, SpoolError) as exc:
        log.warning("event=spool_unreadable file=%s error=%r", path.name, str(exc))
        return None
    return summarize(header, path, _RECOVERED, StoreOutcome.NEW)


def _record(series_uid: str, instances: list[SpooledInstance], content: str, folder: Path) -> SeriesRecord:
    first = instances[0]
    return SeriesRecord(
        series_uid=series_uid, study_uid=first.study_uid, patient_id=first.patient_id,
        accession=first.accession_number, study_date=first.study_date, modality=first.modality,
        description=first.series_description, instances=len(instances), fingerprint=content,
        series_dir=str(folder),
    )
