"""The PACS as a query/retrieve SCP (Study Root): C-FIND, C-MOVE and C-GET, one association per call.

TLS comes from the peer's `tls` settings through node.delivery.sender.tls_args (node.tls), as for every
outgoing association. A C-FIND that ends in anything but success is reported as incomplete, so the
caller can split the query (a PACS at its answer limit answers A700 or cancels, or just stops).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pynetdicom import AE, StoragePresentationContexts, build_role, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from node.config import DestinationConfig
from node.delivery.sender import tls_args

log = logging.getLogger(__name__)

_PENDING = (0xFF00, 0xFF01)
_MAX_GET_CONTEXTS = 127  # one context is the C-GET model's


class PacsError(Exception):
    """The PACS could not be reached or refused the association; the message names the fix."""


@dataclass(frozen=True)
class Answers:
    """C-FIND matches, and whether the PACS said it sent them all."""

    matches: list[Dataset]
    complete: bool
    status: int | None


@dataclass(frozen=True)
class Retrieved:
    """A C-MOVE or C-GET's final counts as the PACS reported them."""

    status: int | None
    completed: int
    failed: int
    warning: int

    @property
    def ok(self) -> bool:
        return self.status == 0x0000 and self.failed == 0

    def describe(self) -> str:
        status = "no final response" if self.status is None else f"status 0x{self.status:04X}"
        return f"{status}, {self.completed} completed, {self.failed} failed, {self.warning} warnings"


StoreHandlers = list[tuple[evt.EventType, Callable]]


class Pacs:
    """Query/retrieve calls on one peer, each on an association of its own."""

    def __init__(self, peer: DestinationConfig, calling_ae: str, timeout_s: float) -> None:
        self.peer = peer
        self.calling_ae = calling_ae
        self.timeout_s = timeout_s

    @property
    def name(self) -> str:
        return f"{self.peer.ae_title}@{self.peer.host}:{self.peer.port}"

    def find(self, identifier: Dataset) -> Answers:
        """C-FIND at the identifier's QueryRetrieveLevel."""
        assoc = self._associate(AE(ae_title=self.calling_ae), [StudyRootQueryRetrieveInformationModelFind])
        matches: list[Dataset] = []
        status: int | None = None
        try:
            for answer, found in assoc.send_c_find(identifier, StudyRootQueryRetrieveInformationModelFind):
                status = int(answer.Status) if answer is not None and "Status" in answer else None
                if status in _PENDING and found is not None:
                    matches.append(found)
        finally:
            _release(assoc)
        return Answers(matches, status == 0x0000, status)

    def move(self, identifier: Dataset, destination_ae: str) -> Retrieved:
        """C-MOVE to `destination_ae` (the node's receiver, registered at the PACS)."""
        assoc = self._associate(AE(ae_title=self.calling_ae), [StudyRootQueryRetrieveInformationModelMove])
        try:
            return _final(assoc.send_c_move(identifier, destination_ae, StudyRootQueryRetrieveInformationModelMove))
        finally:
            _release(assoc)

    def get(self, identifier: Dataset, storage_classes: list[str], handlers: StoreHandlers) -> Retrieved:
        """C-GET; the PACS's C-STOREs on this association go to `handlers` (the receiver's own)."""
        ae = AE(ae_title=self.calling_ae)
        classes = storage_classes[:_MAX_GET_CONTEXTS]
        others = [c.abstract_syntax for c in StoragePresentationContexts if c.abstract_syntax not in classes]
        classes += others[:_MAX_GET_CONTEXTS - len(classes)]
        roles = [build_role(uid, scp_role=True) for uid in classes]
        assoc = self._associate(ae, [StudyRootQueryRetrieveInformationModelGet, *classes], roles, handlers)
        try:
            return _final(assoc.send_c_get(identifier, StudyRootQueryRetrieveInformationModelGet))
        finally:
            _release(assoc)

    def _associate(self, ae: AE, abstract_syntaxes: list[str], roles=None, handlers: StoreHandlers | None = None
                   ) -> Association:
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = self.timeout_s
        for syntax in abstract_syntaxes:
            ae.add_requested_context(syntax)
        assoc = ae.associate(self.peer.host, self.peer.port, ae_title=self.peer.ae_title, ext_neg=roles,
                             evt_handlers=handlers or [], tls_args=tls_args(self.peer))
        if not assoc.is_established:
            how = "rejected" if assoc.is_rejected else "not established (unreachable, TLS failure or aborted)"
            raise PacsError(f"association with the PACS {self.name} {how}: check backfill.pacs (host, port, AE title, "
                            f"tls) and that the PACS lists this node's AE title {self.calling_ae}")
        return assoc


def _final(responses) -> Retrieved:
    """The last response of a C-MOVE/C-GET, whose sub-operation counts are the totals."""
    status, counts = None, (0, 0, 0)
    for answer, _ in responses:
        if answer is None or "Status" not in answer:
            continue
        status = int(answer.Status)
        counts = tuple(int(answer.get(k, 0) or 0) for k in ("NumberOfCompletedSuboperations",
                                                              "NumberOfFailedSuboperations",
                                                              "NumberOfWarningSuboperations"))
    return Retrieved(status, *counts)


def _release(assoc: Association) -> None:
    if assoc.is_established:
        assoc.release()
