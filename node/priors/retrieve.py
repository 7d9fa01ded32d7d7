"""C-FIND at series level, then C-GET, or C-MOVE to the node's own AE (pynetdicom; see node/priors/pacs.py).

Imported only when a lookup asks a PACS, so that a worker without `[priors]` does not load pynetdicom.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (
    Comprehensive3DSRStorage,
    ComprehensiveSRStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from node.priors.inbox import PriorsInbox
from node.priors.pacs import Deadline, FoundSeries, Pacs, PacsUnavailable, RetrieveRefused, SeriesQuery

PENDING = (0xFF00, 0xFF01)
SR_CLASSES = (Comprehensive3DSRStorage, ComprehensiveSRStorage)


def find_sr_series(pacs: Pacs, calling_ae: str, query: SeriesQuery, deadline: Deadline, limit: int) -> list[FoundSeries]:
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
    found = []
    with _session(pacs, calling_ae, deadline, [StudyRootQueryRetrieveInformationModelFind]) as assoc:
        for status, answer in assoc.send_c_find(identifier, StudyRootQueryRetrieveInformationModelFind):
            deadline.left()
            code = int(status.get("Status", -1)) if status else -1
            if code in PENDING and answer is not None:
                if _ours(answer, query):
                    found.append(FoundSeries(str(answer.StudyInstanceUID), str(answer.SeriesInstanceUID),
                                             str(answer.get("StudyDate", "") or "")))
            elif code != 0x0000:
                raise PacsUnavailable(_status_reason("C-FIND", code))
    found.sort(key=lambda s: s.study_date, reverse=True)
    return found[:limit]


def _ours(answer: Dataset, query: SeriesQuery) -> bool:
    """A PACS may ignore keys it does not match on: check the answer again."""
    manufacturer = str(answer.get("Manufacturer", "") or "")
    return (str(answer.get("PatientID", query.patient_id)) == query.patient_id
            and str(answer.get("SeriesDescription", "") or "") == query.series_description
            and manufacturer in ("", query.manufacturer) and bool(answer.get("SeriesInstanceUID")))


def get_series(pacs: Pacs, calling_ae: str, series: list[FoundSeries], deadline: Deadline) -> list[Dataset]:
    """C-GET each series' SRs; RetrieveRefused when the PACS does not allow C-GET."""
    received: list[Dataset] = []

    def keep(event: evt.Event) -> int:
        dataset = event.dataset
        dataset.file_meta = event.file_meta
        received.append(dataset)
        return 0x0000

    contexts = [StudyRootQueryRetrieveInformationModelGet, *SR_CLASSES]
    roles = [build_role(uid, scp_role=True) for uid in SR_CLASSES]
    with _session(pacs, calling_ae, deadline, contexts, roles, [(evt.EVT_C_STORE, keep)]) as assoc:
        if not any(cx.abstract_syntax == StudyRootQueryRetrieveInformationModelGet for cx in assoc.accepted_contexts):
            raise RetrieveRefused("the PACS accepts no C-GET")
        for found in series:
            _retrieve(assoc.send_c_get(_series_identifier(found), StudyRootQueryRetrieveInformationModelGet),
                      "C-GET", deadline, refused=RetrieveRefused)
    return received


def move_series(pacs: Pacs, calling_ae: str, destination_ae: str, series: list[FoundSeries], deadline: Deadline,
                inbox: PriorsInbox) -> list[Dataset]:
    """C-MOVE each series' SRs to the node's receiver, then take them from the priors inbox."""
    with _session(pacs, calling_ae, deadline, [StudyRootQueryRetrieveInformationModelMove]) as assoc:
        for found in series:
            _retrieve(assoc.send_c_move(_series_identifier(found), destination_ae,
                                        StudyRootQueryRetrieveInformationModelMove), "C-MOVE", deadline,
                      refused=PacsUnavailable)
    return inbox.take([found.series_uid for found in series])


def _series_identifier(found: FoundSeries) -> Dataset:
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "SERIES"
    identifier.StudyInstanceUID = found.study_uid
    identifier.SeriesInstanceUID = found.series_uid
    return identifier


def _retrieve(responses, what: str, deadline: Deadline, refused: type[Exception]) -> None:
    """Wait for the final response; a failure (or nothing retrieved with failures) raises `refused`."""
    for status, _ in responses:
        deadline.left()
        code = int(status.get("Status", -1)) if status else -1
        if code in PENDING:
            continue
        failed = int(status.get("NumberOfFailedSuboperations", 0) or 0) if status else 0
        completed = int(status.get("NumberOfCompletedSuboperations", 0) or 0) if status else 0
        if code == 0x0000 or (code == 0xB000 and completed):
            return
        raise refused(_status_reason(what, code) + (f", {failed} failed" if failed else ""))


@contextmanager
def _session(pacs: Pacs, calling_ae: str, deadline: Deadline, contexts: list[str], roles=(),
             handlers=()) -> Iterator:
    """An association released when done, aborted when anything went wrong (no half-finished retrieve lingers)."""
    assoc = _associate(pacs, calling_ae, deadline, contexts, roles, handlers)
    try:
        yield assoc
    except BaseException:
        assoc.abort()
        raise
    if assoc.is_established:
        assoc.release()


def _associate(pacs: Pacs, calling_ae: str, deadline: Deadline, contexts: list[str], roles=(), handlers=()):
    ae = AE(ae_title=calling_ae)
    for uid in contexts:
        ae.add_requested_context(uid)
    left = deadline.left()
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = left
    assoc = ae.associate(pacs.host, pacs.port, ae_title=pacs.ae_title, ext_neg=list(roles), evt_handlers=list(handlers))
    if not assoc.is_established:
        if assoc.is_rejected:
            raise PacsUnavailable(f"{pacs.describe()} rejected the association: is {calling_ae} a known modality there?")
        deadline.left()
        raise PacsUnavailable(f"{pacs.describe()} did not answer (down, or port closed)")
    return assoc


def _status_reason(what: str, code: int) -> str:
    if code == -1:
        return f"{what}: no answer within priors.timeout_s"
    return f"{what} refused with status 0x{code:04X}"
