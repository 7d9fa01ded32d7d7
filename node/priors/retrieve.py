"""The priors' questions to the PACS: the node's SR series of a patient (C-FIND), then C-GET or C-MOVE.

Every step shares one Deadline (`[priors] timeout_s`) through node.query_retrieve, and at most
`max_series` series are retrieved. C-GET brings the SRs back on its own association; a PACS that
refuses it (Refused: no C-GET context, or a failure status) is asked for a C-MOVE to the node's
receiver, which keeps what arrives in the priors inbox. Imported only when a lookup asks a PACS, so
that a worker without `[priors]` does not load pynetdicom.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.dataset import Dataset
from pynetdicom import evt
from pynetdicom.sop_class import Comprehensive3DSRStorage, ComprehensiveSRStorage

from node.priors.inbox import PriorsInbox
from node.query_retrieve import Deadline, Pacs, PacsError, Refused, Retrieved, Service, Storage

SR_CLASSES = [Comprehensive3DSRStorage, ComprehensiveSRStorage]


@dataclass(frozen=True)
class SeriesQuery:
    """The node's own SR series of one patient: the C-FIND keys."""

    patient_id: str
    issuer_of_patient_id: str
    series_description: str
    manufacturer: str


@dataclass(frozen=True)
class FoundSeries:
    study_uid: str
    series_uid: str
    study_date: str


def find_sr_series(pacs: Pacs, query: SeriesQuery, deadline: Deadline, limit: int) -> list[FoundSeries]:
    """The patient's SR series this node wrote, newest study first, at most `limit`."""
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "SERIES"
    identifier.PatientID = query.patient_id
    if query.issuer_of_patient_id:
        identifier.IssuerOfPatientID = query.issuer_of_patient_id
    identifier.Modality = "SR"
    identifier.SeriesDescription = query.series_description
    identifier.Manufacturer = ""
    identifier.StudyInstanceUID = identifier.SeriesInstanceUID = identifier.StudyDate = ""
    answers = pacs.find(identifier, deadline)
    if not answers.complete:
        raise PacsError(f"{pacs.name} ended the C-FIND with {answers.describe()}")
    found = [FoundSeries(str(answer.StudyInstanceUID), str(answer.SeriesInstanceUID),
                         str(answer.get("StudyDate", "") or "")) for answer in answers.matches if _ours(answer, query)]
    found.sort(key=lambda s: s.study_date, reverse=True)
    return found[:limit]


def _ours(answer: Dataset, query: SeriesQuery) -> bool:
    """A PACS may ignore keys it does not match on: check the answer again."""
    manufacturer = str(answer.get("Manufacturer", "") or "")
    return (str(answer.get("PatientID", query.patient_id)) == query.patient_id
            and str(answer.get("SeriesDescription", "") or "") == query.series_description
            and manufacturer in ("", query.manufacturer) and bool(answer.get("SeriesInstanceUID")))


def get_series(pacs: Pacs, series: list[FoundSeries], deadline: Deadline) -> list[Dataset]:
    """C-GET each series' SRs on one association; Refused when the PACS does not allow C-GET."""
    received: list[Dataset] = []

    def keep(event: evt.Event) -> int:
        dataset = event.dataset
        dataset.file_meta = event.file_meta
        received.append(dataset)
        return 0x0000

    with pacs.session(Service.GET, deadline, Storage(SR_CLASSES, [(evt.EVT_C_STORE, keep)])) as session:
        for found in series:
            _check(session.get(_series_identifier(found)), "C-GET", pacs)
    return received


def move_series(pacs: Pacs, destination_ae: str, series: list[FoundSeries], deadline: Deadline,
                inbox: PriorsInbox) -> list[Dataset]:
    """C-MOVE each series' SRs to the node's receiver on one association, then take them from the priors inbox."""
    with pacs.session(Service.MOVE, deadline) as session:
        for found in series:
            _check(session.move(_series_identifier(found), destination_ae), "C-MOVE", pacs)
    return inbox.take([found.series_uid for found in series])


def _series_identifier(found: FoundSeries) -> Dataset:
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "SERIES"
    identifier.StudyInstanceUID = found.study_uid
    identifier.SeriesInstanceUID = found.series_uid
    return identifier


def _check(result: Retrieved, what: str, pacs: Pacs) -> None:
    """Success, or a warning with something retrieved, is enough; anything else is Refused with the PACS's counts."""
    if result.status == 0x0000 or (result.status == 0xB000 and result.completed):
        return
    raise Refused(f"{pacs.name} answered the {what} with {result.describe()}")
