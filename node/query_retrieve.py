"""Query/retrieve SCU (Study Root C-FIND, C-MOVE, C-GET) for every PACS the node asks: backfill and priors.

Every wait (TCP connect with the TLS handshake, association, each DIMSE message, release) is bounded by
the client's `timeout_s`; a caller with a budget for a whole exchange (a priors lookup) passes a
Deadline too, and each wait then gets at most the time left. A PACS that cannot be reached, refuses
the association or the service, falls silent past a deadline, or whose TLS settings cannot be used
raises PacsError with the reason and what to check. Final statuses come back for the caller to
judge: a C-FIND that ends in anything but success is incomplete (a PACS at its answer limit answers
A700, cancels, or just stops), and a retrieve's counts are the PACS's totals. TLS comes from the
peer's `tls` settings (node.tls.tls_args), as for every outgoing association.

pynetdicom is imported here: callers that may run without it (a worker without [priors]) import this
module only when they ask a PACS.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum

from pydicom.dataset import Dataset
from pynetdicom import AE, StoragePresentationContexts, build_role, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from node.config import DestinationConfig
from node.tls import TlsError, tls_args

PENDING = (0xFF00, 0xFF01)
MAX_GET_STORAGE_CLASSES = 127  # 128 presentation contexts at most, one is the C-GET model's

StoreHandlers = list[tuple[evt.EventType, Callable]]


class PacsError(Exception):
    """The PACS could not be asked, or did not answer in time; the message says why and what to check."""


class Refused(PacsError):
    """The PACS refused this service (no presentation context for it, or a failure status): another may work."""


class Service(Enum):
    """The Study Root information model an association is for."""

    FIND = StudyRootQueryRetrieveInformationModelFind
    MOVE = StudyRootQueryRetrieveInformationModelMove
    GET = StudyRootQueryRetrieveInformationModelGet


class Deadline:
    """The time a whole exchange may take (`setting` names the key that sets it, for the message)."""

    def __init__(self, seconds: float, setting: str) -> None:
        self._end = time.monotonic() + seconds
        self.setting = setting

    def left(self) -> float:
        """Seconds left; PacsError once there are none."""
        left = self._end - time.monotonic()
        if left <= 0:
            raise PacsError(f"no answer within {self.setting}")
        return left


@dataclass(frozen=True)
class Answers:
    """C-FIND matches, and whether the PACS said it sent them all."""

    matches: list[Dataset]
    complete: bool
    status: int | None

    def describe(self) -> str:
        return "no final C-FIND response" if self.status is None else f"C-FIND status 0x{self.status:04X}"


@dataclass(frozen=True)
class Retrieved:
    """A C-MOVE or C-GET's final status and sub-operation counts as the PACS reported them."""

    status: int | None
    completed: int
    failed: int
    warning: int

    def describe(self) -> str:
        status = "no final response" if self.status is None else f"status 0x{self.status:04X}"
        return f"{status}, {self.completed} completed, {self.failed} failed, {self.warning} warnings"


@dataclass(frozen=True)
class Storage:
    """What a C-GET may bring back on its own association, and who keeps it (the receiver's handlers, say)."""

    classes: list[str]
    handlers: StoreHandlers = field(default_factory=list)


def storage_classes(first: Iterable[str]) -> list[str]:
    """`first`, then pynetdicom's other storage classes, as many as a C-GET association can offer."""
    classes = list(dict.fromkeys(first))[:MAX_GET_STORAGE_CLASSES]
    others = [c.abstract_syntax for c in StoragePresentationContexts if c.abstract_syntax not in classes]
    return classes + others[:MAX_GET_STORAGE_CLASSES - len(classes)]


class Pacs:
    """One query/retrieve peer; `setting` is its config section (backfill.pacs, priors), named in errors."""

    def __init__(self, peer: DestinationConfig, calling_ae: str, setting: str, timeout_s: float) -> None:
        self.peer = peer
        self.calling_ae = calling_ae
        self.setting = setting
        self.timeout_s = timeout_s

    @property
    def name(self) -> str:
        return f"{self.peer.ae_title}@{self.peer.host}:{self.peer.port}"

    def find(self, identifier: Dataset, deadline: Deadline | None = None) -> Answers:
        """One C-FIND on an association of its own."""
        with self.session(Service.FIND, deadline) as session:
            return session.find(identifier)

    def move(self, identifier: Dataset, destination_ae: str, deadline: Deadline | None = None) -> Retrieved:
        """One C-MOVE to `destination_ae` (registered at the PACS) on an association of its own."""
        with self.session(Service.MOVE, deadline) as session:
            return session.move(identifier, destination_ae)

    def get(self, identifier: Dataset, storage: Storage, deadline: Deadline | None = None) -> Retrieved:
        """One C-GET on an association of its own; the PACS's C-STOREs go to `storage.handlers`."""
        with self.session(Service.GET, deadline, storage) as session:
            return session.get(identifier)

    @contextmanager
    def session(self, service: Service, deadline: Deadline | None = None,
                storage: Storage | None = None) -> Iterator[Session]:
        """An association for several calls: released when done, aborted on any error (no retrieve lingers)."""
        assoc = self._associate(service, deadline, storage or Storage([]))
        try:
            yield Session(self, assoc, deadline)
        except BaseException:
            assoc.abort()
            raise
        if assoc.is_established:
            assoc.release()

    def _associate(self, service: Service, deadline: Deadline | None, storage: Storage) -> Association:
        ae = AE(ae_title=self.calling_ae)
        ae.add_requested_context(service.value)
        classes = storage.classes[:MAX_GET_STORAGE_CLASSES] if service is Service.GET else []
        for uid in classes:
            ae.add_requested_context(uid)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = self.wait(deadline)
        connected: list[bool] = []
        handlers = [(evt.EVT_CONN_OPEN, lambda event: connected.append(True)), *storage.handlers]
        try:
            tls = tls_args(self.peer, f"{self.setting}.tls")
        except TlsError as exc:
            raise PacsError(str(exc)) from None
        assoc = ae.associate(self.peer.host, self.peer.port, ae_title=self.peer.ae_title, evt_handlers=handlers,
                             ext_neg=[build_role(uid, scp_role=True) for uid in classes], tls_args=tls)
        if not assoc.is_established:
            raise PacsError(self._failure(assoc, bool(connected), deadline))
        if not any(cx.abstract_syntax == service.value for cx in assoc.accepted_contexts):
            assoc.release()
            raise Refused(f"{self.name} accepts no C-{service.name} from {self.calling_ae}")
        return assoc

    def wait(self, deadline: Deadline | None) -> float:
        """The longest one wait may take now."""
        return self.timeout_s if deadline is None else min(self.timeout_s, deadline.left())

    def _failure(self, assoc: Association, connected: bool, deadline: Deadline | None) -> str:
        if assoc.is_rejected:
            return (f"{self.name} rejected the association: is {self.calling_ae} a known modality there? "
                    f"(check {self.setting} ae_title, and the PACS's list of modalities)")
        if deadline is not None:
            deadline.left()  # a wait that took the time left is reported as the deadline's
        if connected:
            return (f"{self.name} accepted the connection but no association (aborted, or no answer within "
                    f"{self.timeout_s:g} s): check {self.setting} ae_title, and tls if the port speaks DICOM TLS only, "
                    "and the PACS's log")
        if self.peer.tls is not None:
            return (f"no TLS connection to {self.name}: check that it is running and speaks DICOM TLS on that port, "
                    f"and that its certificate is signed by {self.setting}.tls.ca_certificates and names the host")
        return f"{self.name} did not answer (down, or port closed): check {self.setting} host and port"


class Session:
    """Calls on one open association; every response received renews its waits from the deadline."""

    def __init__(self, pacs: Pacs, assoc: Association, deadline: Deadline | None) -> None:
        self._pacs = pacs
        self._assoc = assoc
        self._deadline = deadline

    def find(self, identifier: Dataset) -> Answers:
        """Complete only with a final success: anything else may have left matches out."""
        matches: list[Dataset] = []
        status: int | None = None
        for status, _, found in self._responses(self._assoc.send_c_find(identifier, Service.FIND.value)):
            if status in PENDING and found is not None:
                matches.append(found)
        return Answers(matches, status == 0x0000, status)

    def move(self, identifier: Dataset, destination_ae: str) -> Retrieved:
        """The PACS opens its own association to `destination_ae`; only the counts come back here."""
        return self._final(self._assoc.send_c_move(identifier, destination_ae, Service.MOVE.value))

    def get(self, identifier: Dataset) -> Retrieved:
        """The instances come back on this association, to the session's storage handlers."""
        return self._final(self._assoc.send_c_get(identifier, Service.GET.value))

    def _final(self, responses) -> Retrieved:
        """The last response of a C-MOVE/C-GET, whose sub-operation counts are the totals."""
        final = Retrieved(None, 0, 0, 0)
        for status, answer, _ in self._responses(responses):
            if status is not None:
                final = Retrieved(status, *(int(answer.get(k, 0) or 0) for k in (
                    "NumberOfCompletedSuboperations", "NumberOfFailedSuboperations", "NumberOfWarningSuboperations")))
        return final

    def _responses(self, responses) -> Iterator[tuple[int | None, Dataset, Dataset | None]]:
        """(status code or None, status data set, identifier) per response, each wait renewed from the deadline."""
        self._renew()
        for answer, identifier in responses:
            self._renew()
            status = int(answer.Status) if answer is not None and "Status" in answer else None
            yield status, answer, identifier

    def _renew(self) -> None:
        """The next wait gets at most the time left (PacsError when none is)."""
        wait = self._pacs.wait(self._deadline)
        self._assoc.acse_timeout = self._assoc.dimse_timeout = self._assoc.network_timeout = wait
