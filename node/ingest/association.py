"""The pynetdicom adapter: every override of pynetdicom internals the receiver relies on, in one place.

pynetdicom reads a PDU by allocating whatever length its header claims, never times out a socket
that has not associated, and counts such sockets against `maximum_associations`; a C-STORE data
set is gathered in memory however large it grows. That lets six bytes cost gigabytes and ten idle
sockets lock out every sender. The overrides here bound all of it:

- PDU lengths: A-ASSOCIATE-RQ and the other short PDUs at `SMALL_PDU_LIMIT`, P-DATA-TF at the
  Maximum Length Received the node announces; a longer PDU is aborted before anything is allocated,
  and PDUs are read into one buffer of their (bounded) size.
- Time: the whole A-ASSOCIATE-RQ within `association_request_timeout_s` of connecting, each PDU within
  `pdu_timeout_s` of its first byte, and an associated peer is aborted after `idle_timeout_s` of silence.
- Slots: a connection counts against `maximum_associations` only once its A-ASSOCIATE-RQ has arrived;
  until then it is in a separate pool of `max_pending` connections, whose oldest is dropped for a newcomer.
- TLS: the handshake happens on the connection's own reactor thread, not pynetdicom's accept thread,
  within the same `association_request_timeout_s` of connecting; a peer that stalls in it is dropped
  like any other connection that does not associate. Readers waiting in `select` also ask
  `SSLSocket.pending()`: OpenSSL may already hold a decrypted PDU that the socket will never signal.
- DIMSE: a command set is capped at `SMALL_PDU_LIMIT`, a data set at `max_dataset_bytes` (beyond that
  the rest is read and dropped, so the C-STORE can still be answered), and the peer is not read from
  while a complete message waits for the handler (TCP flow control holds back a pipelining peer).

Speed, since a sender waits for each response: P-DATA fragments are passed on as views of the
received PDU (not four copies), a C-STORE-RQ primitive is read from its command bytes and a
C-STORE-RSP encoded into them directly (not through pydicom), pynetdicom's debug handlers are not
bound, and the reactors wake on data or on a queued response instead of polling.

Written against pynetdicom's private DUL, DIMSE and server internals, hence the version check below.
"""

from __future__ import annotations

import functools
import logging
import os
import queue
import select
import socket
import socketserver
import ssl
import struct
import threading
import time
import typing
from dataclasses import dataclass
from io import BytesIO

import pynetdicom
from pynetdicom import AE, evt
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom._handlers import (
    standard_dimse_recv_handler,
    standard_dimse_sent_handler,
    standard_pdu_recv_handler,
    standard_pdu_sent_handler,
)
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import DIMSEMessage
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.pdu_items import PresentationDataValueItem
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

PYNETDICOM_VERSION = "3.0.4"
if pynetdicom.__version__ != PYNETDICOM_VERSION:
    raise ImportError(
        f"node.ingest.association was written for pynetdicom {PYNETDICOM_VERSION}, found {pynetdicom.__version__}: "
        f"install pynetdicom=={PYNETDICOM_VERSION} (as pyproject.toml pins it)"
    )

log = logging.getLogger("node.ingest.receiver")

SMALL_PDU_LIMIT = 64 << 10  # A-ASSOCIATE-RQ with hundreds of contexts is ~20 KiB; RELEASE/ABORT are 4 bytes
_PDU_TYPES = frozenset(range(0x01, 0x08))
_P_DATA_TF = 0x04
_PENDING_POLL_S = 0.02  # a connection that has not associated is polled this often, not every millisecond
_C_STORE_RSP = 0x8001
_NO_DATA_SET = 0x0101
# C-STORE-RQ command elements read without pydicom: group length, SOP class, command field, message ID,
# priority, data set type, SOP instance (PS3.7 9.3.1.1); a Move Originator sends it to pynetdicom.
_STORE_RQ_ELEMENTS = frozenset((0x0000, 0x0002, 0x0100, 0x0110, 0x0700, 0x0800, 0x1000))
_IDLE_S = 0.001  # pynetdicom's own reactor period: how long a thread waits when there is nothing to do


_STANDARD_HANDLERS = (
    (evt.EVT_DIMSE_RECV, standard_dimse_recv_handler), (evt.EVT_DIMSE_SENT, standard_dimse_sent_handler),
    (evt.EVT_PDU_RECV, standard_pdu_recv_handler), (evt.EVT_PDU_SENT, standard_pdu_sent_handler),
)


@dataclass(frozen=True)
class ConnectionLimits:
    """What one peer may cost; see the module docstring."""

    max_pdu_size: int
    max_dataset_bytes: int
    max_pending: int
    association_request_timeout_s: float
    pdu_timeout_s: float
    idle_timeout_s: float


class DataSetBuffer(BytesIO):
    """A received data set that stops growing at `limit` bytes; `overflowed` tells the handler to refuse it."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.received = 0
        self.overflowed = False

    def write(self, data: bytes | bytearray | memoryview) -> int:
        size = len(data)
        self.received += size
        if not self.overflowed and self.received > self.limit:
            self.overflowed = True
            self.seek(0)
            self.truncate(0)
        if self.overflowed:
            return size
        return super().write(data)


def configure_ae(ae: AE, limits: ConnectionLimits) -> None:
    """Apply the limits pynetdicom has settings for (timers, announced PDU size)."""
    ae.maximum_pdu_size = limits.max_pdu_size
    ae.acse_timeout = limits.association_request_timeout_s  # the wait for A-ASSOCIATE-RQ, and ARTIM
    ae.network_timeout = limits.idle_timeout_s


class CountingAE(AE):
    """An AE whose association limit counts only peers that have asked to associate and are not done.

    pynetdicom's ACSE rejects when `len(ae.active_associations) > maximum_associations`, counting every
    accepted socket, so port scanners and half-open sockets used to take the slots of real senders.
    """

    @property
    def active_associations(self) -> list[Association]:
        return [a for a in super().active_associations if not a.is_acceptor or _holds_a_slot(a)]


def _holds_a_slot(assoc: Association) -> bool:
    """Asked to associate and not yet over: a released one's thread lingers briefly while its socket closes."""
    asked = assoc.requestor.primitive is not None
    return asked and not (assoc.is_released or assoc.is_aborted or assoc.is_rejected)


class TlsContextSource(typing.Protocol):
    """Where a TLS server gets the context for each new connection (node.tls.ServerTls: reloaded on change)."""

    def context(self) -> ssl.SSLContext: ...


class BoundedServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with bounded connections, owned by the Receiver rather than the AE.

    With `tls` set it is a TLS listener: connections are wrapped as they are set up and the handshake is
    left to each connection's reactor (`BoundedDUL._handshake`); pynetdicom's own `ssl_context` stays None,
    since its `get_request` would shake hands on the accept thread, where one stalled client blocks all.
    """

    daemon_threads = True
    request_queue_size = 128  # listen backlog: a burst of port probes must not overflow it (SYN retries take 1 s)
    limits: ConnectionLimits
    tls: TlsContextSource | None = None

    def _bind_defaults(self) -> None:
        """pynetdicom's default intervention handlers only: its "standard" notification handlers format
        debug lines for every PDU and DIMSE message, which cost about a millisecond per image."""
        for event in evt._INTERVENTION_EVENTS:
            self.bind(event, evt.get_default_handler(event))

    def connections(self) -> list[Association]:
        """Every acceptor thread of this server, associated or not."""
        return [t for t in threading.enumerate() if isinstance(t, Association) and getattr(t, "_server", None) is self]

    def pending(self) -> list[Association]:
        """Connections still waiting for their A-ASSOCIATE-RQ whose socket is open, oldest first."""
        waiting = [a for a in self.connections() if a.requestor.primitive is None and not a.dul._transport_closed]
        return sorted(waiting, key=lambda a: a.dul._accepted_at)

    def make_room(self) -> None:
        """Drop the oldest pending connections so that a new one fits in the pending pool."""
        pending = self.pending()
        for assoc in pending[: max(0, len(pending) - self.limits.max_pending + 1)]:
            address = assoc.requestor.address_info
            log.warning(
                "event=connection_dropped peer=%s:%s reason=no A-ASSOCIATE-RQ yet and receiver.max_pending_connections "
                "reached", address.address, address.port,
            )
            assoc.dul.close_transport()

    def drop_pending(self) -> None:
        """Close every connection that has not sent its A-ASSOCIATE-RQ (at shutdown)."""
        for assoc in self.pending():
            assoc.dul.close_transport()

    def close_listener(self) -> None:
        """Stop the accept loop and close the listening socket; open associations carry on."""
        socketserver.BaseServer.shutdown(self)  # AssociationServer.shutdown expects AE.start_server bookkeeping
        self.server_close()


class BoundedRequestHandler(RequestHandler):
    """Gives each accepted connection TCP_NODELAY and the bounded DUL and DIMSE providers."""

    server: BoundedServer

    def _create_association(self) -> Association:
        """pynetdicom's acceptor set-up, except that the supported contexts are shared, not deep-copied
        (copying ~150 contexts took ~0.1 s of CPU per connection, so a port scan cost seconds of it;
        negotiation only reads them), and without pynetdicom's per-PDU and per-message debug handlers."""
        self.server.make_room()
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        tls = self.server.tls
        if tls is not None:  # no handshake here: this thread must return for the next connection to be set up
            self.request = tls.context().wrap_socket(self.request, server_side=True, do_handshake_on_connect=False)
        assoc = Association(self.ae, MODE_ACCEPTOR)
        for event, handler in _STANDARD_HANDLERS:  # bound by every Association: see BoundedServer._bind_defaults
            assoc.unbind(event, handler)
        assoc._server = self.server
        assoc.name = f"AcceptorThread@{time.strftime('%Y%m%d%H%M%S')}"
        assoc.set_socket(AssociationSocket(assoc, client_socket=self.request))
        acceptor = assoc.acceptor
        acceptor.maximum_length = self.ae.maximum_pdu_size
        acceptor.ae_title = self.server.ae_title
        acceptor.address_info = self.local
        acceptor.implementation_class_uid = self.ae.implementation_class_uid
        acceptor.implementation_version_name = self.ae.implementation_version_name
        acceptor.supported_contexts = self.server.contexts
        assoc.requestor.address_info = self.remote
        for event, handlers in self.server._handlers.items():
            if event.is_intervention and handlers:
                assoc.bind(event, *handlers)
            elif isinstance(event, evt.NotificationEvent):
                for handler, args in handlers:
                    assoc.bind(event, handler, args)
        dul = assoc.dul
        dul.__class__ = BoundedDUL
        dul._limits = self.server.limits
        dul._accepted_at = time.monotonic()
        dul._transport_closed = False
        dul._eof_reported = False
        dul._wake_lock = threading.Lock()
        dul._wake_fd = None
        dul._handshake_pending = tls is not None
        dul._run_loop_delay = 0  # BoundedDUL._is_transport_event does the waiting
        assoc.dimse.__class__ = BoundedDIMSE
        return assoc


class BoundedDUL(DULServiceProvider):
    """The DUL with bounded PDU reads, read deadlines, back-pressure and a prompt end for dead connections."""

    _limits: ConnectionLimits
    _accepted_at: float
    _transport_closed: bool
    _eof_reported: bool
    _wake_lock: threading.Lock
    _wake_fd: int | None
    _handshake_pending: bool

    def run(self) -> None:
        """The reactor thread, with an eventfd that `send_pdu` signals: the reactor's waits end as soon as
        there is something to send (a C-STORE response waited up to `_IDLE_S` for it, ~0.5 ms per image)."""
        with self._wake_lock:
            self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            super().run()
        finally:
            with self._wake_lock:
                os.close(self._wake_fd)
                self._wake_fd = None

    def send_pdu(self, primitive) -> None:
        super().send_pdu(primitive)
        with self._wake_lock:  # the fd is closed under this lock: never signal a number reused by another file
            if self._wake_fd is not None:
                os.eventfd_write(self._wake_fd, 1)

    def _wait(self, sock: socket.socket | None, timeout: float) -> None:
        """Wait until `sock` is readable (or OpenSSL holds decrypted bytes), a primitive is queued to send,
        or `timeout` passes."""
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return
        wake = self._wake_fd
        try:
            ready, _, _ = select.select([wake] if sock is None else [sock, wake], [], [], timeout)
            if wake in ready:
                os.eventfd_read(wake)
        except (OSError, ValueError):
            pass

    def close_transport(self) -> None:
        """Shut the socket down from another thread; the reader sees end of file and the state machine ends."""
        self._transport_closed = True
        sock = self.socket.socket if self.socket is not None else None
        if sock is not None:
            _shutdown(sock, socket.SHUT_RDWR)

    def _is_transport_event(self) -> bool:
        """pynetdicom's check for incoming data, made to wait for it: the reactor loop no longer sleeps
        (`_run_loop_delay` 0), so a PDU is read, or a queued primitive sent, the moment it is there instead
        of up to 1 ms later, while an idle connection still wakes only every `_IDLE_S` (`_PENDING_POLL_S`
        before association)."""
        state = self.state_machine.current_state
        if state in ("Sta1", "Sta3") or (state == "Sta6" and not self.assoc.dimse.msg_queue.empty()):
            # Sta1: the connection is over (a read would raise Evt17 again, invalid there); Sta3: the peer
            # must wait for A-ASSOCIATE-AC/RJ (reading on races the answer); Sta6 with a whole message
            # waiting for the handler: read no more until it is taken (back-pressure on a pipelining peer).
            if self._nothing_queued():
                self._wait(None, _IDLE_S)
            return False
        sock = self.socket.socket if self.socket is not None else None
        if state != "Sta13" and sock is not None and self._nothing_queued():
            self._wait(sock, _PENDING_POLL_S if state == "Sta2" else _IDLE_S)
        return super()._is_transport_event()

    def _nothing_queued(self) -> bool:
        return self.event_queue.empty() and self.to_provider_queue.empty()

    def receive_pdu(self, wait: bool = False, timeout: float | None = None):
        """As pynetdicom's, but the acceptor's wait for A-ASSOCIATE-RQ ends as soon as the connection has."""
        if not (wait and self.assoc.is_acceptor and self.assoc.requestor.primitive is None):
            return super().receive_pdu(wait, timeout)
        deadline = time.monotonic() + (timeout if timeout is not None else self._limits.association_request_timeout_s)
        while (remaining := deadline - time.monotonic()) > 0:
            primitive = super().receive_pdu(True, min(remaining, _PENDING_POLL_S * 5))
            if primitive is not None:
                return primitive
            over = self.state_machine.current_state == "Sta1" or not self.is_alive()
            if self._transport_closed and over and self.to_user_queue.empty():
                return None
        return None

    def _read_pdu_data(self) -> None:
        """Read one PDU: its header, a length check against the limits, then its body in one buffer."""
        sock = self.socket.socket if self.socket is not None else None
        if sock is None or self._eof_reported:
            self._closed("Evt17")
            return
        associating = self.assoc.requestor.primitive is None
        deadline = (self._accepted_at + self._limits.association_request_timeout_s if associating
                    else time.monotonic() + self._limits.pdu_timeout_s)
        if self._handshake_pending:
            self._handshake(sock, deadline)
            return
        header = bytearray(6)
        if not _recv_into(sock, memoryview(header), deadline):
            self._closed("Evt17")
            return
        pdu_type, _, length = struct.unpack(">BBL", header)
        limit = self._limits.max_pdu_size if pdu_type == _P_DATA_TF and not associating else SMALL_PDU_LIMIT
        if pdu_type not in _PDU_TYPES or length > limit:
            self._refuse(pdu_type, length, limit)
            return
        pdu = bytearray(6 + length)
        pdu[:6] = header
        if not _recv_into(sock, memoryview(pdu)[6:], deadline):
            self._closed("Evt17")
            return
        sock.settimeout(self._limits.pdu_timeout_s)  # what the node's own sends may wait for a peer that stops reading
        try:
            decoded, event = self._decode_p_data(pdu) if pdu_type == _P_DATA_TF else self._decode_pdu(pdu)
        except Exception:  # a malformed PDU is the peer's problem: abort, as pynetdicom does
            self._refuse(pdu_type, length, limit, "undecodable PDU")
            return
        self.event_queue.put(event)
        self._recv_pdu.put(decoded)

    def _handshake(self, sock: ssl.SSLSocket, deadline: float) -> None:
        """The TLS handshake, bounded by the connection's deadline for its A-ASSOCIATE-RQ; a failure
        (no or untrusted client certificate, expired, plain DICOM) closes the connection with its reason."""
        self._handshake_pending = False
        try:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no handshake before receiver.association_request_timeout_s")
            sock.settimeout(remaining)
            sock.do_handshake()
        except (OSError, ValueError) as exc:  # ssl.SSLError, TimeoutError and resets are OSErrors
            address = self.assoc.requestor.address_info
            reason = getattr(exc, "reason", None) or str(exc) or type(exc).__name__
            if isinstance(exc, ssl.SSLCertVerificationError):  # which check failed: expired, unknown CA, ...
                reason = f"{reason} ({exc.verify_message})"
            log.warning("event=tls_refused peer=%s:%s reason=%s", address.address, address.port, reason)
            self._closed("Evt17")
            return
        log.debug("event=tls_established peer=%s version=%s cipher=%s", self.assoc.requestor.address_info.address,
                  sock.version(), (sock.cipher() or ("",))[0])

    def _decode_p_data(self, pdu: bytearray) -> tuple[P_DATA_TF, str]:
        """A P-DATA-TF whose PDVs are views of `pdu`, not copies: pynetdicom copies a data fragment four times
        (bytes of the PDU, each PDV, the PDV less its header, then into the data set), ~0.3 ms per 512x512 slice.
        Each PDV holds at least its message control header and lies wholly inside the PDU, or ValueError."""
        if self.assoc.get_handlers(evt.EVT_DATA_RECV) or self.assoc.get_handlers(evt.EVT_PDU_RECV):
            return self._decode_pdu(pdu)  # a handler that wants pynetdicom's own objects gets them
        decoded = P_DATA_TF()
        view, offset = memoryview(pdu), 6
        while offset < len(pdu):
            if offset + 4 > len(pdu):
                raise ValueError("PDV item header cut off")
            (length,) = struct.unpack_from(">L", pdu, offset)
            if length < 2 or offset + 4 + length > len(pdu):
                raise ValueError(f"PDV item of {length} bytes does not fit the PDU")
            item = PresentationDataValueItem()
            item.presentation_context_id = pdu[offset + 4]
            item.presentation_data_value = view[offset + 5:offset + 4 + length]
            decoded.presentation_data_value_items.append(item)
            offset += 4 + length
        return decoded, "Evt10"

    def _refuse(self, pdu_type: int, length: int, limit: int, why: str = "") -> None:
        """Abort the association (Evt19) and stop reading what the peer sends after the refused header."""
        address = self.assoc.requestor.address_info
        reason = why or (f"PDU type 0x{pdu_type:02X} unknown" if pdu_type not in _PDU_TYPES
                         else f"PDU of {length} bytes over the limit of {limit}")
        log.warning("event=pdu_refused peer=%s:%s reason=%s", address.address, address.port, reason)
        _shutdown(self.socket.socket, socket.SHUT_RD)
        self._closed("Evt19")

    def _closed(self, event: str) -> None:
        """Queue the event that ends the connection; the end of the transport (Evt17) only once."""
        self._transport_closed = True
        if event == "Evt17":
            if self._eof_reported:
                return
            self._eof_reported = True
        self.event_queue.put(event)


def _shutdown(sock: socket.socket, how: int) -> None:
    """Shut the connection down; an SSLSocket's own shutdown() also drops its TLS state, after which it
    would read raw records as PDUs and send the A-ABORT in clear text, so the TCP socket's is called."""
    try:
        socket.socket.shutdown(sock, how)
    except OSError:
        pass


def _recv_into(sock: socket.socket, view: memoryview, deadline: float) -> bool:
    """Fill `view` from `sock` before `deadline`; False on end of file, timeout or a socket error."""
    received = 0
    try:
        while received < len(view):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            sock.settimeout(remaining)
            count = sock.recv_into(view[received:])
            if count == 0:
                return False
            received += count
    except OSError:  # includes TimeoutError
        return False
    return True


class BoundedDIMSE(DIMSEServiceProvider):
    """DIMSE message assembly into capped buffers (`DataSetBuffer`), with a small cap on the command set,
    and C-STORE responses encoded directly."""

    def send_msg(self, primitive, context_id: int) -> None:
        """A C-STORE-RSP without ErrorComment or OffendingElement (every success) is encoded here: pynetdicom
        builds and encodes a pydicom Dataset twice for it, ~0.45 ms of CPU per image. Anything else, or a
        peer whose PDUs are too small for the response, or a DIMSE_SENT handler, goes through pynetdicom."""
        command = _store_response(primitive)
        limit = self.maximum_pdu_size
        if command is None or (limit and len(command) + 6 > limit) or self.assoc.get_handlers(evt.EVT_DIMSE_SENT):
            super().send_msg(primitive, context_id)
            return
        pdata = P_DATA()
        pdata.presentation_data_value_list.append((context_id, b"\x03" + command))  # command, last fragment
        self.dul.send_pdu(pdata)

    def get_msg(self, block: bool = False):
        """As pynetdicom's, but the acceptor reactor's non-blocking poll waits up to `_IDLE_S` for a message,
        so that one is served when it is complete rather than after the reactor's next 1 ms sleep."""
        if block:
            return super().get_msg(block)
        try:
            return self.msg_queue.get(timeout=_IDLE_S)
        except queue.Empty:
            return None, None

    def receive_primitive(self, primitive) -> None:
        if self.message is None:
            self.message = DIMSEMessage()
            self.message.encoded_command_set = DataSetBuffer(SMALL_PDU_LIMIT)
            self.message.data_set = DataSetBuffer(self.dul._limits.max_dataset_bytes)
            self.message.message_to_primitive = functools.partial(_lenient_primitive, self.message)
        command = self.message.encoded_command_set
        try:
            super().receive_primitive(primitive)
        except Exception:  # an empty (dropped) command set does not decode
            if not getattr(command, "overflowed", False):
                raise
        if getattr(command, "overflowed", False):
            log.warning("event=dimse_refused reason=command set over %d bytes", SMALL_PDU_LIMIT)
            self.message = None
            self.dul.event_queue.put("Evt19")


def _store_response(primitive) -> bytes | None:
    """The command set of a C-STORE-RSP, implicit VR little endian (PS3.7 9.3.1.2), as pynetdicom encodes
    it; None where the response carries more than these elements."""
    if (not isinstance(primitive, C_STORE) or primitive.MessageIDBeingRespondedTo is None or primitive.Status is None
            or primitive.ErrorComment is not None or primitive.OffendingElement is not None):
        return None
    elements = []
    if primitive.AffectedSOPClassUID is not None:
        elements.append(_implicit(0x0002, _uid_value(primitive.AffectedSOPClassUID)))
    elements += [
        _implicit(0x0100, struct.pack("<H", _C_STORE_RSP)),
        _implicit(0x0120, struct.pack("<H", primitive.MessageIDBeingRespondedTo)),
        _implicit(0x0800, struct.pack("<H", _NO_DATA_SET)),
        _implicit(0x0900, struct.pack("<H", primitive.Status)),
    ]
    if primitive.AffectedSOPInstanceUID is not None:
        elements.append(_implicit(0x1000, _uid_value(primitive.AffectedSOPInstanceUID)))
    body = b"".join(elements)
    return _implicit(0x0000, struct.pack("<L", len(body))) + body


def _implicit(element: int, value: bytes) -> bytes:
    """One group 0000 element in implicit VR little endian."""
    return struct.pack("<HHL", 0x0000, element, len(value)) + value


def _uid_value(uid: str) -> bytes:
    value = str(uid).encode("ascii")
    return value + b"\x00" if len(value) % 2 else value


def _lenient_primitive(message: DIMSEMessage):
    """A C-STORE-RQ whose Affected SOP Instance UID pynetdicom refuses to decode (over 64 characters, say)
    is passed on with the placeholder UID "0", the value kept in `invalid_instance_uid`, so that the
    handler can answer it 0xC000 with a reason instead of pynetdicom aborting the whole association.
    (The handler's answer clears the placeholder from the response: the UID is optional there.)"""
    primitive = _store_request(message)
    if primitive is not None:
        return primitive
    try:
        return type(message).message_to_primitive(message)
    except ValueError:
        if type(message).__name__ != "C_STORE_RQ" or "AffectedSOPInstanceUID" not in message.command_set:
            raise
    raw = str(message.command_set.AffectedSOPInstanceUID)
    del message.command_set.AffectedSOPInstanceUID
    primitive = type(message).message_to_primitive(message)
    primitive.AffectedSOPInstanceUID = "0"  # pynetdicom serves only requests that have one
    primitive.invalid_instance_uid = raw
    return primitive


def _store_request(message: DIMSEMessage) -> C_STORE | None:
    """A C-STORE-RQ's primitive read from its encoded command set, as pynetdicom's message_to_primitive
    makes it but without converting each element through pydicom (~0.25 ms per image). The primitive's
    own setters still validate every value. None, for pynetdicom to decode, where the command set holds
    anything else (a C-MOVE originator, a multi-valued or odd element, a value a setter refuses)."""
    if type(message).__name__ != "C_STORE_RQ":
        return None
    encoded = message.encoded_command_set.getvalue()
    values: dict[int, bytes] = {}
    offset = 0
    while offset + 8 <= len(encoded):
        group, element, length = struct.unpack_from("<HHL", encoded, offset)
        value = encoded[offset + 8:offset + 8 + length]
        if group != 0x0000 or element not in _STORE_RQ_ELEMENTS or len(value) != length or element in values:
            return None
        values[element] = value
        offset += 8 + length
    if offset != len(encoded) or any(len(values.get(e, b"")) != 2 for e in (0x0110, 0x0700)):
        return None
    uids = {key: values[element].rstrip(b"\x00 ").decode("ascii", "replace")
            for key, element in (("AffectedSOPClassUID", 0x0002), ("AffectedSOPInstanceUID", 0x1000)) if element in values}
    if any("\\" in uid for uid in uids.values()):
        return None
    primitive = C_STORE()
    try:
        primitive.MessageID = struct.unpack("<H", values[0x0110])[0]
        primitive.Priority = struct.unpack("<H", values[0x0700])[0]
        for keyword, uid in uids.items():
            setattr(primitive, keyword, uid)
    except ValueError:
        return None
    primitive.DataSet = message.data_set
    primitive._context_id = message.context_id
    primitive._dataset_path = message._data_set_path
    primitive._dataset_file = message._data_set_file
    return primitive


def invalid_instance_uid(request: object) -> str | None:
    """The undecodable Affected SOP Instance UID of a C-STORE request (see `_lenient_primitive`), if any."""
    return getattr(request, "invalid_instance_uid", None)


def dataset_overflow(dataset: BytesIO) -> int | None:
    """The bytes a C-STORE data set really had, if it was too large to keep; None if it was kept whole."""
    return dataset.received if isinstance(dataset, DataSetBuffer) and dataset.overflowed else None
