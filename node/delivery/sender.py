"""C-STORE SCU for results (SEG, Comprehensive 3D SR, Secondary Capture) and C-ECHO for `echo`.

One association per call. A file counts as sent only on status 0x0000; warnings are reported
as not ok, so the caller's delivery bookkeeping decides what to do with them. Retries belong to
the caller too.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_context, evt
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import Verification

from node.config import DestinationConfig
from node.tls import tls_args

log = logging.getLogger(__name__)

MAX_CONTEXTS = 128  # the DICOM limit on presentation contexts in one association request


@dataclass(frozen=True)
class SendOutcome:
    """What happened to one file: `ok` only when the peer answered 0x0000."""

    path: Path
    sop_instance_uid: str | None
    ok: bool
    status: int | None  # the peer's status; None when no response came back
    message: str  # empty on success; otherwise the warning or failure, in one line

    @property
    def is_warning(self) -> bool:
        return self.status is not None and (self.status == 0x0001 or 0xB000 <= self.status <= 0xBFFF)


@dataclass(frozen=True)
class EchoOutcome:
    ok: bool
    status: int | None
    message: str  # empty on success

    def describe(self) -> str:
        """One line for the `echo` command."""
        return "C-ECHO succeeded" if self.ok else f"C-ECHO failed: {self.message}"


@dataclass(frozen=True)
class _Item:
    path: Path
    dataset: Dataset
    sop_class: str
    transfer_syntax: str


def send_files(destination: DestinationConfig, files: list[Path], calling_ae: str, timeout_s: float) -> list[SendOutcome]:
    """C-STORE `files` to `destination` over one association; one outcome per file, in order."""
    outcomes: dict[Path, SendOutcome] = {}
    items = []
    for path in files:
        item = _read(path)
        if isinstance(item, SendOutcome):
            outcomes[path] = item
        else:
            items.append(item)
    contexts = _contexts(items)
    if len(contexts) > MAX_CONTEXTS:
        reason = f"{len(contexts)} SOP class/transfer syntax combinations exceed one association's {MAX_CONTEXTS}: send fewer files per call"
        outcomes.update({item.path: _failed(item, None, reason) for item in items})
    elif items:
        outcomes.update(_send(destination, items, contexts, calling_ae, timeout_s))
    return [outcomes[path] for path in files]


def echo(destination: DestinationConfig, calling_ae: str, timeout_s: float = 10.0) -> EchoOutcome:
    """C-ECHO the destination: proves network, AE titles and allowlists are set up."""
    assoc, connected = _associate(destination, [build_context(Verification)], calling_ae, timeout_s)
    if not assoc.is_established:
        return EchoOutcome(False, None, _association_failure(assoc, connected, destination))
    try:
        status = assoc.send_c_echo()
    finally:
        _close(assoc)
    code = int(status.Status) if "Status" in status else None
    if code == 0x0000:
        return EchoOutcome(True, code, "")
    message = "no C-ECHO response (timeout or abort)" if code is None else f"C-ECHO status 0x{code:04X}"
    return EchoOutcome(False, code, message)


def _read(path: Path) -> _Item | SendOutcome:
    try:
        dataset = pydicom.dcmread(path)
        sop_class = str(dataset.SOPClassUID)
        transfer_syntax = str(dataset.file_meta.TransferSyntaxUID)
    except (OSError, InvalidDicomError, AttributeError, ValueError) as exc:
        return SendOutcome(path, None, False, None, f"cannot read {path.name} as DICOM: {exc}")
    return _Item(path, dataset, sop_class, transfer_syntax)


def _contexts(items: list[_Item]) -> list[PresentationContext]:
    """One context per SOP class and stored transfer syntax; uncompressed files may also go as LE."""
    wanted: dict[tuple[str, str], None] = {}
    for item in items:
        syntaxes = [item.transfer_syntax]
        if not UID(item.transfer_syntax).is_compressed:
            syntaxes += [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
        wanted[(item.sop_class, item.transfer_syntax)] = None
        for syntax in syntaxes[1:]:
            wanted.setdefault((item.sop_class, str(syntax)), None)
    return [build_context(sop_class, [syntax]) for sop_class, syntax in wanted]


def _send(
    destination: DestinationConfig, items: list[_Item], contexts: list[PresentationContext], calling_ae: str, timeout_s: float
) -> dict[Path, SendOutcome]:
    assoc, connected = _associate(destination, contexts, calling_ae, timeout_s)
    if not assoc.is_established:
        reason = _association_failure(assoc, connected, destination)
        log.warning("event=send_failed destination=%s files=%d reason=%s", _name(destination), len(items), reason)
        return {item.path: _failed(item, None, reason) for item in items}
    try:
        return {item.path: _store(assoc, item, destination) for item in items}
    finally:
        _close(assoc)


def _store(assoc: Association, item: _Item, destination: DestinationConfig) -> SendOutcome:
    if not assoc.is_established:
        return _failed(item, None, "association ended before this file was sent")
    try:
        status = assoc.send_c_store(item.dataset)
    except ValueError as exc:  # no accepted presentation context for this SOP class/transfer syntax
        return _failed(item, None, f"{destination.ae_title} does not accept it: {exc}")
    code = int(status.Status) if "Status" in status else None
    sop = str(item.dataset.SOPInstanceUID)
    if code == 0x0000:
        log.info("event=instance_sent destination=%s sop=%s sop_class=%s", _name(destination), sop, item.sop_class)
        return SendOutcome(item.path, sop, True, code, "")
    comment = str(status.get("ErrorComment", "")).strip()
    if code is None:
        message = "no C-STORE response (timeout, abort or invalid response)"
    else:
        message = f"C-STORE status 0x{code:04X}" + (f": {comment}" if comment else "")
    outcome = SendOutcome(item.path, sop, False, code, message)
    log.warning(
        "event=%s destination=%s sop=%s reason=%s",
        "instance_sent_with_warning" if outcome.is_warning else "instance_send_failed", _name(destination), sop, message,
    )
    return outcome


def _failed(item: _Item, status: int | None, message: str) -> SendOutcome:
    return SendOutcome(item.path, str(item.dataset.get("SOPInstanceUID", "")) or None, False, status, message)


def _associate(
    destination: DestinationConfig, contexts: list[PresentationContext], calling_ae: str, timeout_s: float
) -> tuple[Association, bool]:
    """Request an association; also say whether the TCP connection opened, to word failures right."""
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout_s
    opened: list[bool] = []
    assoc = ae.associate(
        destination.host, destination.port, contexts, ae_title=destination.ae_title,
        evt_handlers=[(evt.EVT_CONN_OPEN, lambda event: opened.append(True))], tls_args=tls_args(destination),
    )
    return assoc, bool(opened)


def _association_failure(assoc: Association, connected: bool, destination: DestinationConfig) -> str:
    where = _name(destination)
    if not connected:
        if destination.tls is not None:
            return (f"no TLS connection to {where}: check that it is running and reachable, that it speaks DICOM TLS "
                    "on that port, and that its certificate is signed by tls.ca_certificates and names the host "
                    "(see the log for the TLS error)")
        return f"no connection to {where}: check that it is running and reachable (host, port, firewall)"
    if assoc.is_rejected:
        primitive = assoc.acceptor.primitive
        detail = f"{primitive.result_str}, {primitive.reason_str}" if primitive is not None else "no reason given"
        return f"association rejected by {where} ({detail}): check the AE titles and the peer's allowlist"
    return f"association aborted or timed out by {where}: check that it accepts these SOP classes and this calling AE"


def _close(assoc: Association) -> None:
    if assoc.is_established:
        assoc.release()


def _name(destination: DestinationConfig) -> str:
    return f"{destination.ae_title}@{destination.host}:{destination.port}"
