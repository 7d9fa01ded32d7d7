"""DICOM C-ECHO/C-STORE SCP that puts every CT instance in the spool before acknowledging it.

Policy, in the order a C-STORE meets it:
- CT Image Storage is spooled as received (raw bytes, no decode) and then reported to the listener.
- Enhanced CT Image Storage is refused with status 0x0122 and an error comment: the pipeline reads
  single-frame CT only, and silently discarding the one series that matters would be worse. With
  MR selected, MR Image Storage is spooled like CT and Enhanced MR is refused the same way.
- Other storage SOP classes (scouts, dose reports) are accepted and discarded when
  `accept_other_storage` is on, so routers that forward whole studies see no failures; when it is
  off they are not offered in the presentation contexts at all.
- Below `min_free_disk_mb` free space every store is answered 0xA700 (out of resources).
- An SR from the PACS configured in [priors] (by AE title and address) is what a C-MOVE for the
  patient's earlier results brought: it goes to the priors inbox (node.priors.inbox), never the spool.
Before and after association every connection is bounded in memory and time by the pynetdicom
adapter (node/ingest/association.py). Associations are rejected when the called AE is not one of
`called_aes` (default: the node's own title), the calling AE is outside `allowed_calling_aes` (when
set) or connects from a host `calling_ae_hosts` does not give it, and beyond `max_associations`.
With [receiver.tls] a second listener speaks DICOM TLS (node.tls) under the same rules, and a calling
AE named in `calling_ae_certificates` is accepted only there, with a client certificate naming it.
A CT data set is refused, with its reason in the ErrorComment, when it is over `max_dataset_mb`
(0xA700), breaks the CT IOD or is no image the node can decode (no Pixel Data, Pixel Data length not
Rows x Columns x bits, Rows or Columns 0, BitsAllocated not 8 or 16, several frames, UIDs that
disagree with the request: 0xA900, as dcmtk's storescp answers a UID mismatch) or is not encoded as
its transfer syntax says (compressed syntax over raw pixels, truncated Pixel Data, invalid UIDs,
sequences nested too deep, lengths past the data or that never end: 0xC000).
Only a released association is reported to the listener as ended: an
abort (network drop, sender crash) means the sender did not finish, so its series must wait for
the idle period rather than complete early and be processed half sent.
"""

from __future__ import annotations

import enum
import errno
import ipaddress
import logging
import struct
import threading
import time
import uuid
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pynetdicom import (
    ALL_TRANSFER_SYNTAXES,
    PYNETDICOM_IMPLEMENTATION_UID,
    PYNETDICOM_IMPLEMENTATION_VERSION,
    StoragePresentationContexts,
    build_context,
    evt,
)
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import Verification
from pynetdicom.status import Status

from node.config import ReceiverConfig
from node.ingest.association import (
    BoundedRequestHandler,
    BoundedServer,
    ConnectionLimits,
    CountingAE,
    configure_ae,
    dataset_overflow,
    invalid_instance_uid,
)
from node.ingest.counts import ReceiverCounter
from node.ingest.dicom import CT_IMAGE_STORAGE
from node.ingest.dixon import refused_sop_classes
from node.ingest.spool import (
    DataSetMismatch,
    Receipt,
    Spool,
    SpoolError,
    SpoolListener,
    StoreOutcome,
    read_data_set_header,
)
from node.priors.inbox import SR_STORAGE, PriorsInbox
from node.tls import ServerTls, peer_names

log = logging.getLogger(__name__)

# What the CT loader can decode, in order of preference (pynetdicom accepts the first one of ours
# that the sender proposes): lossless compressed first, so data the sender holds compressed is
# sent as it is (no transcoding, which some senders cannot do); then uncompressed; lossy last,
# so an uncompressed original is never lossy-compressed on its way to a measurement.
CT_TRANSFER_SYNTAXES = [
    "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202",  # JPEG 2000 / HTJ2K lossless
    "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.5",
    "1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2",
    "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.203", "1.2.840.10008.1.2.4.81",
    "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51",
]



class StoreStatus(enum.IntEnum):
    """C-STORE response statuses the receiver answers with (PS3.4 B.2.3; pynetdicom names only success)."""

    SUCCESS = Status.SUCCESS
    OUT_OF_RESOURCES = 0xA700  # Refused: out of resources (disk, or a data set over max_dataset_mb)
    DATA_SET_MISMATCH = 0xA900  # Error: data set does not match SOP class (CT IOD rules, UIDs)
    CANNOT_UNDERSTAND = 0xC000  # Error: cannot understand (encoding, truncation, invalid UIDs)
    SOP_CLASS_NOT_SUPPORTED = 0x0122
    PROCESSING_FAILURE = 0x0110


# A-ASSOCIATE-RJ diagnostics (PS3.8 9.3.4), source 1 = service user
_CALLING_AE_NOT_RECOGNIZED = 0x03
_CALLED_AE_NOT_RECOGNIZED = 0x07
PART10_PREAMBLE = b"\x00" * 128 + b"DICM"


@dataclass
class _Tally:
    """Per-association counts, logged once at the end instead of one line per image."""

    association_id: str
    calling_ae: str
    stored: int = 0
    duplicate: int = 0
    discarded: int = 0
    refused: int = 0


def presentation_contexts(accept_other_storage: bool, spooled: tuple[str, ...] = (CT_IMAGE_STORAGE,),
                          priors: bool = False) -> list[PresentationContext]:
    """The SCP's contexts: Verification, the spooled image classes (decodable syntaxes; CT, and MR when
    selected), Enhanced CT (and MR when selected) to refuse clearly, others.

    `priors`: the SRs a C-MOVE for priors brings are offered even when other storage is not.
    """
    contexts = [
        build_context(Verification),
        *(build_context(sop_class, CT_TRANSFER_SYNTAXES) for sop_class in spooled),
        *(build_context(sop_class, ALL_TRANSFER_SYNTAXES) for sop_class in refused_sop_classes(spooled)),
    ]
    if accept_other_storage:
        own = {*spooled, *refused_sop_classes(spooled)}
        contexts += [
            build_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
            for cx in StoragePresentationContexts
            if cx.abstract_syntax not in own
        ]
    elif priors:
        contexts += [build_context(uid, ALL_TRANSFER_SYNTAXES) for uid in sorted(SR_STORAGE)]
    return contexts


def part10_head(sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str) -> bytes:
    """Preamble, "DICM" and file meta group (PS3.10 section 7.1) for a data set received in a C-STORE.

    Encoded here because it is on every image's path to its acknowledgement: pydicom's general
    writer, with the file meta dataset pynetdicom builds for it, takes about 0.4 ms of a 6 ms image.
    """
    elements = b"".join((
        _meta_element(0x0001, b"OB", b"\x00\x01"),
        _meta_element(0x0002, b"UI", _padded(sop_class_uid, b"\x00")),
        _meta_element(0x0003, b"UI", _padded(sop_instance_uid, b"\x00")),
        _meta_element(0x0010, b"UI", _padded(transfer_syntax_uid, b"\x00")),
        _meta_element(0x0012, b"UI", _padded(PYNETDICOM_IMPLEMENTATION_UID, b"\x00")),
        _meta_element(0x0013, b"SH", _padded(PYNETDICOM_IMPLEMENTATION_VERSION, b" ")),
    ))
    return PART10_PREAMBLE + _meta_element(0x0000, b"UL", struct.pack("<I", len(elements))) + elements


def _meta_element(element: int, vr: bytes, value: bytes) -> bytes:
    """One group 0002 element in explicit VR little endian (OB has the long length form)."""
    if vr == b"OB":
        return struct.pack("<HH2s2xI", 0x0002, element, vr, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def _padded(text: str, pad: bytes) -> bytes:
    try:
        value = str(text).encode("ascii")
    except UnicodeEncodeError:
        raise SpoolError(f"UID {text!r} in the C-STORE request is not ASCII: fix the sender") from None
    return value + pad if len(value) % 2 else value


class Receiver:
    """The node's storage SCP; `start()` returns once it listens, `stop()` drains it."""

    def __init__(self, config: ReceiverConfig, spool: Spool, listener: SpoolListener,
                 *, spooled: tuple[str, ...] = (CT_IMAGE_STORAGE,), priors_inbox: PriorsInbox | None = None) -> None:
        """`spooled`: the image classes kept (node.ingest.dixon.spooled_sop_classes); others are discarded."""
        self.config = config
        self.spool = spool
        self.listener = listener
        self.priors_inbox = priors_inbox
        self.spooled = spooled
        self._refused = refused_sop_classes(spooled)
        self._tallies: dict[Association, _Tally] = {}
        self.counter = ReceiverCounter()  # since start, for /metrics and the status page
        self._lock = threading.Lock()
        self._servers: dict[str, BoundedServer] = {}  # "plain" and/or "tls"
        self._ae = self._make_ae()
        self._answered = {title.strip() for title in config.answered_aes()}
        self._allowed = {title.strip() for title in config.allowed_calling_aes}
        self._networks = config.calling_ae_networks()
        self._certificate_names = config.tls.certificate_names() if config.tls is not None else {}
        self.tls: ServerTls | None = None  # made at start: a key others may read refuses it (node.tls.TlsError)

    @property
    def port(self) -> int:
        """The plain port actually listened on."""
        return self._port("plain")

    @property
    def tls_port(self) -> int:
        """The TLS port actually listened on."""
        return self._port("tls")

    def _port(self, kind: str) -> int:
        server = self._servers.get(kind)
        if server is None:
            raise RuntimeError(f"receiver is not listening for {kind} DICOM")
        return int(server.server_address[1])

    @property
    def listening(self) -> bool:
        return bool(self._servers)

    def store_handlers(self) -> list[tuple[evt.EventType, object]]:
        """The C-STORE path for an association the node requested (a backfill's C-GET): the same refusals,
        spool and listener as a received association."""
        return [(evt.EVT_C_STORE, self._on_store), (evt.EVT_RELEASED, self._on_released),
                (evt.EVT_ABORTED, self._on_aborted)]

    def reload_tls(self) -> bool:
        """Load the TLS certificate, key and CAs again (SIGHUP); open associations keep theirs."""
        return self.tls.reload() if self.tls is not None else False

    def start(self) -> None:
        """Bind and serve in background threads; raises OSError if a port is taken, node.tls.TlsError
        when the TLS files cannot be used."""
        tls_config = self.config.tls
        if tls_config is not None:
            self.tls = ServerTls(tls_config)
        try:
            if tls_config is None or tls_config.plain_listener:
                self._listen("plain", self.config.port, None)
            if tls_config is not None:
                self._listen("tls", tls_config.port, self.tls)
        except OSError:
            self._close_listeners()
            raise
        log.info(
            "event=receiver_started ae_title=%s address=%s port=%s tls_port=%s max_associations=%d "
            "accept_other_storage=%s", self.config.ae_title, self.config.bind_address,
            self.port if "plain" in self._servers else "none", self.tls_port if "tls" in self._servers else "none",
            self.config.max_associations, self.config.accept_other_storage,
        )

    def _listen(self, kind: str, port: int, tls: ServerTls | None) -> None:
        handlers = [
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_ABORTED, self._on_aborted),
        ]
        server = self._ae.make_server(
            (self.config.bind_address, port),
            ae_title=self.config.ae_title,
            evt_handlers=handlers,
            server_class=BoundedServer,
            request_handler=BoundedRequestHandler,
        )
        server.limits = self._limits()
        server.tls = tls
        self._servers[kind] = server
        threading.Thread(target=server.serve_forever, name=f"dicom-receiver-{kind}", daemon=True).start()

    def _close_listeners(self) -> None:
        for server in self._servers.values():
            server.close_listener()

    def stop(self, grace_s: float = 30.0) -> None:
        """Stop accepting, give open associations `grace_s` to finish, then abort them.

        Aborting never loses an acknowledged instance: a store that is being written finishes
        (its thread is joined) and anything not yet acknowledged will be resent by the peer.
        """
        if not self._servers:
            return
        self._close_listeners()
        for server in self._servers.values():
            server.drop_pending()  # not associated: nothing can have been acknowledged on them
        deadline = time.monotonic() + grace_s
        while self._active() and time.monotonic() < deadline:
            time.sleep(0.05)
        for assoc in self._active():
            log.warning("event=association_aborted_at_shutdown association=%s", self._tally(assoc).association_id)
            assoc.abort()
        for assoc in self._active():
            assoc.join(timeout=grace_s)
        self._servers = {}
        log.info("event=receiver_stopped ae_title=%s", self.config.ae_title)

    def _limits(self) -> ConnectionLimits:
        return ConnectionLimits(
            max_pdu_size=self.config.max_pdu_size,
            max_dataset_bytes=self.config.max_dataset_mb << 20,
            max_pending=self.config.max_pending_connections,
            association_request_timeout_s=self.config.association_request_timeout_s,
            pdu_timeout_s=self.config.pdu_timeout_s,
            idle_timeout_s=self.config.idle_timeout_s,
        )

    def _make_ae(self) -> CountingAE:
        ae = CountingAE(ae_title=self.config.ae_title)
        ae.maximum_associations = self.config.max_associations
        configure_ae(ae, self._limits())
        ae.supported_contexts = presentation_contexts(self.config.accept_other_storage, self.spooled,
                                                      self.priors_inbox is not None)
        return ae

    def _active(self) -> list[Association]:
        return [a for server in self._servers.values() for a in server.connections() if a.is_alive()]

    def _tally(self, assoc: Association) -> _Tally:
        with self._lock:
            tally = self._tallies.get(assoc)
            if tally is None:
                tally = _Tally(f"assoc:{uuid.uuid4().hex[:16]}", assoc.requestor.ae_title)
                self._tallies[assoc] = tally
                assoc.name = tally.association_id  # the log names held-back lines by their thread's name
            return tally

    def _on_echo(self, event: evt.Event) -> int:
        return StoreStatus.SUCCESS

    def _on_requested(self, event: evt.Event) -> None:
        """Reject an A-ASSOCIATE-RQ whose called AE, calling AE or host the node does not answer."""
        request = event.assoc.requestor.primitive
        called, calling = str(request.called_ae_title).strip(), str(request.calling_ae_title).strip()
        address = event.assoc.requestor.address_info
        refusal = self._refusal(called, calling, address.address) or self._certificate_refusal(event.assoc, calling)
        if refusal is None:
            return
        diagnostic, reason = refusal
        log.warning(
            "event=association_rejected calling_ae=%s called_ae=%s peer=%s:%s reason=%s",
            calling, called, address.address, address.port, reason,
        )
        self.counter.association(accepted=False)
        event.assoc.acse.send_reject(0x01, 0x01, diagnostic)  # rejected-permanent, by the service user
        event.assoc.kill()  # as pynetdicom does after its own rejections: waits until the RJ is sent

    def _refusal(self, called: str, calling: str, host: str) -> tuple[int, str] | None:
        """(A-ASSOCIATE-RJ diagnostic, reason) when the request must be rejected, else None."""
        if called not in self._answered:
            return _CALLED_AE_NOT_RECOGNIZED, "called AE not in receiver.called_aes (default: receiver.ae_title)"
        if self._allowed and calling not in self._allowed:
            return _CALLING_AE_NOT_RECOGNIZED, "calling AE not in receiver.allowed_calling_aes"
        networks = self._networks.get(calling)
        if networks is not None and not _from_any(host, networks):
            return _CALLING_AE_NOT_RECOGNIZED, "calling AE connected from a host receiver.calling_ae_hosts does not give it"
        return None

    def _certificate_refusal(self, assoc: Association, calling: str) -> tuple[int, str] | None:
        """A calling AE tied to a certificate name must come over TLS with a client certificate naming it."""
        wanted = self._certificate_names.get(calling)
        if wanted is None:
            return None
        socket = assoc.dul.socket.socket if assoc.dul.socket is not None else None
        if wanted not in peer_names(socket):
            return (_CALLING_AE_NOT_RECOGNIZED, "calling AE not presented with the client certificate "
                    "receiver.tls.calling_ae_certificates gives it")
        return None

    def _on_accepted(self, event: evt.Event) -> None:
        tally = self._tally(event.assoc)
        self.counter.association(accepted=True)
        address = event.assoc.requestor.address_info
        log.info(
            "event=association_accepted association=%s calling_ae=%s peer=%s:%s",
            tally.association_id, tally.calling_ae, address.address, address.port,
        )

    def _on_rejected(self, event: evt.Event) -> None:
        """pynetdicom's own rejections; the only one the node leaves to it is the association limit."""
        calling = event.assoc.requestor.ae_title
        reason = "receiver.max_associations reached"
        self.counter.association(accepted=False)
        address = event.assoc.requestor.address_info
        log.warning(
            "event=association_rejected calling_ae=%s peer=%s:%s reason=%s",
            calling, address.address, address.port, reason,
        )

    def _on_released(self, event: evt.Event) -> None:
        tally = self._end(event, "released")
        if tally is not None:
            self.listener.association_released(tally.association_id)

    def _on_aborted(self, event: evt.Event) -> None:
        tally = self._end(event, "aborted")
        if tally is not None:
            self.listener.association_aborted(tally.association_id)

    def _end(self, event: evt.Event, how: str) -> _Tally | None:
        """Forget the association and log its counts; None if it never got as far as a tally."""
        with self._lock:
            tally = self._tallies.pop(event.assoc, None)
        if tally is not None:
            self.counter.association_ended()
            log.info(
                "event=association_%s association=%s calling_ae=%s stored=%d duplicate=%d discarded=%d refused=%d",
                how, tally.association_id, tally.calling_ae, tally.stored, tally.duplicate, tally.discarded,
                tally.refused,
            )
        return tally

    def _on_store(self, event: evt.Event) -> int | Dataset:
        tally = self._tally(event.assoc)
        sop_class = event.context.abstract_syntax
        sop_uid = event.request.AffectedSOPInstanceUID
        refusal = self._refused.get(sop_class)
        if refusal is not None:
            return self._refuse(tally, sop_uid, StoreStatus.SOP_CLASS_NOT_SUPPORTED, refusal)
        inbox = self.priors_inbox
        if inbox is not None and inbox.accepts(tally.calling_ae, event.assoc.requestor.address, sop_class):
            return self._keep_prior(event, tally, inbox, sop_uid)
        if sop_class not in self.spooled:  # kept or not, a discarded instance is answered as stored
            tally.discarded += 1
            self.counter.discarded()
            log.debug("event=instance_discarded association=%s sop=%s sop_class=%s", tally.association_id, sop_uid, sop_class)
            return StoreStatus.SUCCESS
        bad_uid = invalid_instance_uid(event.request)
        if bad_uid is not None:
            answer = self._refuse(tally, bad_uid, StoreStatus.CANNOT_UNDERSTAND,
                                  f"AffectedSOPInstanceUID invalid ({len(bad_uid)} chars): fix the sender")
            answer.AffectedSOPInstanceUID = ""  # not the adapter's placeholder: the response may omit it
            return answer
        oversize = dataset_overflow(event.request.DataSet)
        if oversize is not None:
            return self._refuse(tally, sop_uid, StoreStatus.OUT_OF_RESOURCES,
                                f"data set of {oversize >> 20} MiB over receiver.max_dataset_mb")
        if self.spool.free_disk_mb() < self.config.min_free_disk_mb:
            return self._refuse(tally, sop_uid, StoreStatus.OUT_OF_RESOURCES, "spool disk below receiver.min_free_disk_mb")
        return self._spool(event, tally, sop_uid)

    def _spool(self, event: evt.Event, tally: _Tally, sop_uid: str) -> int | Dataset:
        receipt = Receipt(tally.association_id, tally.calling_ae, time.time())
        body = event.request.DataSet
        transfer_syntax = event.context.transfer_syntax
        try:
            head = part10_head(event.context.abstract_syntax, sop_uid, transfer_syntax)
            header = read_data_set_header(head, body, transfer_syntax, self.config.max_dataset_mb << 20)
            _check_request_uids(event.request, header)
            with body.getbuffer() as data_set:
                instance = self.spool.store_parts([head, data_set], header, receipt)
        except DataSetMismatch as exc:
            return self._refuse(tally, sop_uid, StoreStatus.DATA_SET_MISMATCH, str(exc))
        except SpoolError as exc:
            return self._refuse(tally, sop_uid, StoreStatus.CANNOT_UNDERSTAND, str(exc))
        except OSError as exc:
            full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
            status = StoreStatus.OUT_OF_RESOURCES if full else StoreStatus.PROCESSING_FAILURE
            return self._refuse(tally, sop_uid, status, f"spool write failed: {exc.strerror or exc}")
        try:
            self.listener.instance_stored(instance)
        except Exception as exc:  # the state store failed: do not acknowledge what is not recorded
            log.exception("event=listener_failed association=%s sop=%s", tally.association_id, sop_uid)
            return self._refuse(tally, sop_uid, StoreStatus.PROCESSING_FAILURE, f"state update failed: {exc}")
        if instance.outcome is StoreOutcome.DUPLICATE:
            tally.duplicate += 1
        else:
            tally.stored += 1
        self.counter.stored(duplicate=instance.outcome is StoreOutcome.DUPLICATE)
        log.debug(
            "event=instance_stored association=%s series=%s sop=%s outcome=%s",
            tally.association_id, instance.series_uid, instance.sop_instance_uid, instance.outcome.value,
        )
        return StoreStatus.SUCCESS

    def _keep_prior(self, event: evt.Event, tally: _Tally, inbox: PriorsInbox, sop_uid: str) -> int | Dataset:
        """A retrieved earlier SR: into the priors inbox for the worker that asked; no series, no job."""
        if dataset_overflow(event.request.DataSet) is not None:
            return _prior_refused(tally, sop_uid, StoreStatus.OUT_OF_RESOURCES, "data set over receiver.max_dataset_mb")
        try:
            head = part10_head(event.context.abstract_syntax, sop_uid, event.context.transfer_syntax)
            with event.request.DataSet.getbuffer() as data_set:
                inbox.put(sop_uid, [head, data_set])
        except (SpoolError, ValueError, OSError) as exc:
            return _prior_refused(tally, sop_uid, StoreStatus.PROCESSING_FAILURE, f"prior SR not kept: {exc}")
        tally.stored += 1
        log.debug("event=prior_received association=%s sop=%s", tally.association_id, sop_uid)
        return StoreStatus.SUCCESS

    def _refuse(self, tally: _Tally, sop_uid: str, status: int, reason: str) -> Dataset:
        tally.refused += 1
        self.counter.refused(StoreStatus(status).name.lower())
        if status != StoreStatus.SOP_CLASS_NOT_SUPPORTED:  # a CT instance missing: its series must wait for the resend
            self.listener.instance_refused(tally.association_id, None, sop_uid)
        log.warning(
            "event=instance_refused association=%s sop=%s status=0x%04X reason=%s",
            tally.association_id, sop_uid, int(status), reason,
        )
        answer = Dataset()
        answer.Status = int(status)
        answer.ErrorComment = reason[:64]
        return answer


def _prior_refused(tally: _Tally, sop_uid: str, status: int, reason: str) -> Dataset:
    """Refused without telling the listener: no series waits for a prior SR."""
    tally.refused += 1
    log.warning("event=prior_refused association=%s sop=%s status=0x%04X reason=%s", tally.association_id, sop_uid,
                int(status), reason)
    answer = Dataset()
    answer.Status, answer.ErrorComment = int(status), reason[:64]
    return answer


def _check_request_uids(request: object, header: Dataset) -> None:
    """The C-STORE request must name the instance it carries, or the file meta would contradict the data set."""
    for keyword, affected in (("SOPInstanceUID", "AffectedSOPInstanceUID"), ("SOPClassUID", "AffectedSOPClassUID")):
        if str(header.get(keyword, "")).strip() != str(getattr(request, affected)).strip():
            raise DataSetMismatch(f"{affected} differs from the data set's {keyword}")


def _from_any(host: str, networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in networks)
