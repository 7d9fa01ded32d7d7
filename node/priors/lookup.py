"""Find a new result's priors (the I/O half of change over time) and compare (node.priors.change).

The node's own state is searched first: every done result of the same Patient ID. With a PACS in
[priors], its SRs of this node for the patient are then found by C-FIND and retrieved (C-GET,
else C-MOVE), skipping SR series the state already holds, and read back by code
(dicom_sr.read). A source that cannot be searched is recorded with its reason ("not checked");
the job always goes on.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from node.config import Config, PriorsConfig
from node.priors.change import (
    LeastSignificantChange,
    Longitudinal,
    Origin,
    Snapshot,
    SourceCheck,
    compare,
    snapshot_from_result,
)
from node.priors.inbox import PriorsInbox

if TYPE_CHECKING:
    from node.priors.retrieve import FoundSeries
    from node.query_retrieve import Deadline, Pacs

log = logging.getLogger(__name__)
MANUFACTURER = "paraspinal-node"  # dicom_sr.options writes it into every result object
STATE = "state"


class PatientResults(Protocol):
    """The part of the state a lookup reads (node.state.store.State, JobStore)."""

    def patient_results(self, patient_id: str, limit: int = 100) -> list[tuple[Any, int, dict[str, Any]]]: ...


@dataclass(frozen=True)
class PriorSources:
    """Where a job's priors are looked for: the state (None: a run without one) and the [priors] PACS."""

    state: PatientResults | None
    settings: PriorsConfig
    calling_ae: str  # the node's receiver.ae_title: who asks, and where a C-MOVE sends
    sr_description: str  # results.sr_series_description: the node's SR series at the PACS
    inbox: PriorsInbox | None

    @classmethod
    def from_config(cls, config: Config, state: PatientResults | None) -> PriorSources:
        return cls(state, config.priors, config.receiver.ae_title, config.results.sr_series_description,
                   PriorsInbox.from_config(config))

    @property
    def lsc(self) -> LeastSignificantChange:
        s = self.settings
        return LeastSignificantChange(s.lsc_muscle_hu, s.lsc_muscle_volume_percent, s.lsc_bone_hu, s.lsc_liver_hu)

    def look_up(self, result: dict[str, Any]) -> Longitudinal:
        """Every prior of this result's patient, judged, and the change against the one used."""
        current = snapshot_from_result(result, Origin.CURRENT)
        if not current.subject.patient_id:
            return Longitudinal((SourceCheck(STATE, False, 0, 0.0, "the series has no Patient ID"),))
        priors, checks, known_srs = self._from_state(current)
        if self.settings.pacs:
            found, check = self._from_pacs(current, known_srs)
            priors += found
            checks.append(check)
        longitudinal = compare(current, priors, self.lsc, tuple(checks))
        used = longitudinal.used
        log.info("event=priors_looked_up series=%s found=%d used=%s comparable=%s not_checked=%s", current.series_uid,
                 len(longitudinal.priors), used.snapshot.series_uid if used else "none",
                 used.comparable if used else "-",
                 ",".join(c.source for c in checks if not c.checked) or "none")
        return longitudinal

    def _from_state(self, current: Snapshot) -> tuple[list[Snapshot], list[SourceCheck], set[str]]:
        if self.state is None:
            return [], [SourceCheck(STATE, False, 0, 0.0, "no node state in this run")], set()
        started = time.perf_counter()
        rows = self.state.patient_results(current.subject.patient_id)
        priors = [snapshot_from_result(result, Origin.STATE) for _, _, result in rows]
        priors = [prior for prior in priors if prior.series_uid != current.series_uid]
        known = {prior.sr.series_uid for prior in priors if prior.sr is not None}
        return priors, [SourceCheck(STATE, True, len(priors), time.perf_counter() - started)], known

    def _from_pacs(self, current: Snapshot, known_srs: set[str]) -> tuple[list[Snapshot], SourceCheck]:
        from node.priors import retrieve  # pynetdicom: loaded only by a worker that asks a PACS
        from node.query_retrieve import Deadline, Pacs, PacsError

        settings = self.settings
        pacs = Pacs(settings.peer, self.calling_ae, "priors", settings.timeout_s)
        started = time.perf_counter()
        deadline = Deadline(settings.timeout_s, "priors.timeout_s")
        query = retrieve.SeriesQuery(current.subject.patient_id, current.subject.issuer_of_patient_id,
                                     self.sr_description, MANUFACTURER)
        source = f"pacs {pacs.name}"
        try:
            found = retrieve.find_sr_series(pacs, query, deadline, settings.max_series)
            wanted = [series for series in found if series.series_uid not in known_srs]
            datasets, how = self._retrieve(pacs, wanted, deadline) if wanted else ([], "")
        except PacsError as exc:
            log.warning("event=priors_not_checked source=%s reason=%r", source, str(exc))
            return [], SourceCheck(source, False, 0, time.perf_counter() - started, str(exc))
        priors = _read(datasets)
        return priors, SourceCheck(source, True, len(priors), time.perf_counter() - started, retrieve=how)

    def _retrieve(self, pacs: Pacs, wanted: list[FoundSeries], deadline: Deadline) -> tuple[list, str]:
        """C-GET unless configured to move; a refused C-GET falls back to C-MOVE."""
        from node.priors import retrieve
        from node.query_retrieve import PacsError, Refused

        if self.settings.retrieve == "get":
            try:
                return retrieve.get_series(pacs, wanted, deadline), "get"
            except Refused as exc:
                log.info("event=priors_get_refused source=%s reason=%r: trying C-MOVE", pacs.name, str(exc))
        if self.inbox is None:
            raise PacsError("C-MOVE needs the priors inbox: [priors] ae_title and host")
        return retrieve.move_series(pacs, self.calling_ae, wanted, deadline, self.inbox), "move"


def _read(datasets: list) -> list[Snapshot]:
    """Each retrieved SR by code; one that is no TID 1500 report of this node is skipped."""
    from dicom_sr.read import snapshot_from_sr  # loads highdicom's codes: only when a PACS sent SRs

    priors = []
    for dataset in datasets:
        try:
            priors.append(snapshot_from_sr(dataset, Origin.PACS))
        except (ValueError, AttributeError, KeyError) as exc:
            log.warning("event=prior_unreadable sop=%s reason=%r", dataset.get("SOPInstanceUID", "?"), str(exc))
    return priors
