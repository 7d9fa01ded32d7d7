"""Hostile and careless network peers against the real Receiver on loopback (issue 9).

Each attack is made with raw sockets or a pynetdicom SCU driven below its public API; a real dcmtk
storescu checks that senders keep working during the attack. Memory is this process's resident set
(the Receiver runs in it), read from /proc/self/status.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import struct
import time
import zlib
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from dicom_peers import RecordingListener, ct_dataset, free_port, storescu, write_ct_series
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    generate_uid,
)
from pynetdicom import AE, PYNETDICOM_IMPLEMENTATION_UID, build_context
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, ImplementationClassUIDNotification, MaximumLengthNotification
from pynetdicom.sop_class import Verification

from node.config import ReceiverConfig
from node.ingest.receiver import Receiver
from node.ingest.spool import Spool, SpoolError, read_data_set_header

AE_TITLE = "NODE"
# What the attacks in one test may add to this process's resident memory. A pending connection
# costs a 64 KiB PDU buffer at most plus two threads; the bound leaves room for the storescu
# association that runs meanwhile and for the allocator's slack.
RSS_BOUND_MB = 96
PEER_TIMEOUT_S = 20


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/self/status")


@pytest.fixture
def make_receiver(tmp_path: Path) -> Iterator:
    receivers: list[Receiver] = []

    def make(**overrides: object) -> Receiver:
        config = ReceiverConfig(ae_title=AE_TITLE, port=free_port(), bind_address="127.0.0.1", min_free_disk_mb=1)
        for key, value in overrides.items():
            setattr(config, key, value)
        receiver = Receiver(config, Spool(tmp_path / f"spool{len(receivers)}"), RecordingListener())
        receiver.start()
        receivers.append(receiver)
        return receiver

    yield make
    for receiver in receivers:
        receiver.stop(grace_s=2)


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=PEER_TIMEOUT_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def associate_rq(called: str = AE_TITLE, calling: str = "HOSTILE") -> bytes:
    """An encoded A-ASSOCIATE-RQ proposing Verification and CT Image Storage."""
    request = A_ASSOCIATE()
    request.application_context_name = "1.2.840.10008.3.1.1.1"
    request.calling_ae_title, request.called_ae_title = calling, called
    contexts = [build_context(Verification), build_context(CTImageStorage, ExplicitVRLittleEndian)]
    for number, context in enumerate(contexts):
        context.context_id = 2 * number + 1
    request.presentation_context_definition_list = contexts
    length, implementation = MaximumLengthNotification(), ImplementationClassUIDNotification()
    length.maximum_length_received = 16384
    implementation.implementation_class_uid = PYNETDICOM_IMPLEMENTATION_UID
    request.user_information = [length, implementation]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(request)
    return pdu.encode()


def read_pdu(sock: socket.socket) -> tuple[int, bytes]:
    """(type, body) of the next PDU from the node; (0, b"") when it closed the connection."""
    header = _read_exactly(sock, 6)
    if len(header) < 6:
        return 0, b""
    pdu_type, _, length = struct.unpack(">BBL", header)
    return pdu_type, _read_exactly(sock, length)


def _read_exactly(sock: socket.socket, count: int) -> bytes:
    data = bytearray()
    with contextlib.suppress(ConnectionResetError):
        while len(data) < count:
            chunk = sock.recv(count - len(data))
            if not chunk:
                break
            data += chunk
    return bytes(data)


def closed_by_node(sock: socket.socket) -> bool:
    """Read until the node closes the connection (bounded by the socket timeout); A-ABORT may come first."""
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


def associated(port: int) -> socket.socket:
    """A raw connection whose A-ASSOCIATE-RQ the node accepted."""
    sock = connect(port)
    sock.sendall(associate_rq())
    pdu_type, _ = read_pdu(sock)
    assert pdu_type == 0x02, f"association not accepted (PDU type 0x{pdu_type:02X})"
    return sock


def send_series(port: int, folder: Path, count: int = 3) -> None:
    """A real sender: dcmtk storescu with its own network timeouts, which must succeed."""
    files = write_ct_series(folder, count, size=16)
    result = storescu(port, files, AE_TITLE, "MODALITY", "-to", "10", "-ta", "10", "-td", "10", timeout_s=60)
    assert result.returncode == 0, result.stderr


def scu_association(port: int, syntax: str = ExplicitVRLittleEndian, calling: str = "PYSCU"):
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = PEER_TIMEOUT_S
    assoc = ae.associate("127.0.0.1", port, [build_context(CTImageStorage, syntax)], ae_title=AE_TITLE)
    assert assoc.is_established
    return assoc


def encode(dataset: pydicom.Dataset, syntax: str = ExplicitVRLittleEndian) -> bytes:
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, dataset)
    data = buffer.getvalue()
    if syntax == DeflatedExplicitVRLittleEndian:
        deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        data = deflater.compress(data) + deflater.flush()
    return data


def raw_store(assoc, body: bytes, sop_uid: str, sop_class: str = CTImageStorage) -> pydicom.Dataset:
    """Send a C-STORE-RQ with exactly these data set bytes and request UID (pynetdicom's SCU would
    re-encode the data set and validate the UID); returns the response as a status data set."""
    request = C_STORE()
    request.MessageID, request.Priority = 1, 2
    request.AffectedSOPClassUID = sop_class
    request._affected_sop_instance_uid = sop_uid  # past pynetdicom's validation, as a careless sender would
    request.DataSet = BytesIO(body)
    context = assoc.accepted_contexts[0]
    assoc._reactor_checkpoint.clear()  # pause the SCU's reactor as its send_c_store does, so we get the answer
    while not assoc._is_paused:
        time.sleep(0.001)
    try:
        assoc.dimse.send_msg(request, context.context_id)
        _, response = assoc.dimse.get_msg(block=True)
    finally:
        assoc._reactor_checkpoint.set()
    assert response is not None, "no C-STORE response"
    answer = pydicom.Dataset()
    answer.Status = int(response.Status)
    answer.ErrorComment = response.ErrorComment or ""
    return answer


def six_byte_pdu(port: int) -> socket.socket:
    sock = connect(port)
    sock.sendall(b"\x01\x00\xff\xff\xff\xff")
    return sock


def random_bytes(port: int) -> socket.socket:
    sock = connect(port)
    sock.sendall(random.Random(9).randbytes(4096))
    return sock


def request_then_garbage(port: int) -> socket.socket:
    sock = associated(port)
    sock.sendall(b"\x04\x00\xf0\x00\x00\x00" + random.Random(10).randbytes(1024))
    return sock


def test_hostile_sockets_leave_memory_bounded_while_storescu_keeps_working(make_receiver, tmp_path: Path) -> None:
    receiver = make_receiver()
    send_series(receiver.port, tmp_path / "warm-up")  # the first association's one-time costs
    before = rss_mb()

    attackers = [attack(receiver.port) for attack in (six_byte_pdu, random_bytes, request_then_garbage) for _ in range(3)]
    send_series(receiver.port, tmp_path / "during")
    grown = rss_mb() - before

    try:
        assert grown < RSS_BOUND_MB, f"resident memory grew {grown:.0f} MB under nine hostile sockets"
        assert all(closed_by_node(sock) for sock in attackers), "a hostile socket was left open"
    finally:
        for sock in attackers:
            sock.close()


def test_half_open_sockets_and_a_port_scan_do_not_lock_out_a_sender(make_receiver, tmp_path: Path) -> None:
    receiver = make_receiver(max_associations=2)
    half_open = []
    for _ in range(10):
        sock = connect(receiver.port)
        sock.sendall(b"\x01")
        half_open.append(sock)
    for _ in range(100):
        connect(receiver.port).close()
    try:
        send_series(receiver.port, tmp_path / "series")
    finally:
        for sock in half_open:
            sock.close()


def test_the_oldest_pending_connection_makes_room_for_a_new_one(make_receiver, tmp_path: Path) -> None:
    receiver = make_receiver(max_pending_connections=4, association_request_timeout_s=60.0)
    idle = [connect(receiver.port) for _ in range(8)]
    try:
        send_series(receiver.port, tmp_path / "series")
        assert closed_by_node(idle[0]), "the oldest pending connection was not dropped"
    finally:
        for sock in idle:
            sock.close()


def test_a_stalled_association_request_and_a_stalled_pdu_are_timed_out(make_receiver) -> None:
    receiver = make_receiver(association_request_timeout_s=1.0, pdu_timeout_s=1.0)
    stalled_request = connect(receiver.port)
    stalled_request.sendall(associate_rq()[:20])
    stalled_pdu = associated(receiver.port)
    stalled_pdu.sendall(b"\x04\x00\x00\x00\x10\x00" + b"\x00" * 100)
    try:
        assert closed_by_node(stalled_request)
        assert closed_by_node(stalled_pdu)
    finally:
        stalled_request.close()
        stalled_pdu.close()


def test_an_idle_association_is_aborted(make_receiver) -> None:
    receiver = make_receiver(idle_timeout_s=1.0)
    sock = associated(receiver.port)
    try:
        assert read_pdu(sock)[0] in (0x07, 0), "the node did not abort the idle association"
    finally:
        sock.close()


def test_a_p_data_pdu_over_the_announced_maximum_is_aborted_unread(make_receiver) -> None:
    receiver = make_receiver(max_pdu_size=16384)
    sock = associated(receiver.port)
    sock.sendall(struct.pack(">BBL", 0x04, 0, 16385))
    try:
        assert read_pdu(sock)[0] == 0x07
    finally:
        sock.close()


def test_called_ae_titles_and_calling_ae_hosts_are_checked(make_receiver) -> None:
    receiver = make_receiver(called_aes=["NODE", "NODE2"], calling_ae_hosts=["CT1@10.9.9.9", "CT2@127.0.0.0/8"])
    answers = {}
    for called, calling in (("NODE", "ANY"), ("NODE2", "CT2"), ("OTHER", "ANY"), ("NODE", "CT1")):
        sock = connect(receiver.port)
        sock.sendall(associate_rq(called, calling))
        pdu_type, body = read_pdu(sock)
        answers[called, calling] = (pdu_type, body[-1] if pdu_type == 0x03 else None)
        sock.close()
    assert answers == {
        ("NODE", "ANY"): (0x02, None),
        ("NODE2", "CT2"): (0x02, None),
        ("OTHER", "ANY"): (0x03, 0x07),  # called AE not recognised
        ("NODE", "CT1"): (0x03, 0x03),  # calling AE not recognised (from the wrong host)
    }


def _image(**changes: object) -> pydicom.Dataset:
    dataset = ct_dataset(generate_uid(), generate_uid(), 0, size=16)
    for keyword, value in changes.items():
        if value is None:
            delattr(dataset, keyword)
        else:
            setattr(dataset, keyword, value)
    return dataset


@pytest.mark.parametrize(
    ("changes", "syntax", "cut", "status", "reason"),
    [
        ({"PixelData": None}, ExplicitVRLittleEndian, 0, 0xA900, "no Pixel Data (7FE0,0010) in the CT image"),
        ({"Rows": 512}, ExplicitVRLittleEndian, 0, 0xA900, "Pixel Data has 512 bytes, Rows x Columns need 16384"),
        ({}, JPEG2000Lossless, 0, 0xC000, "JPEG 2000 Lossless declared, Pixel Data not encapsulated"),
        ({}, ExplicitVRLittleEndian, 500, 0xC000, "Pixel Data claims 512 bytes, 12 sent"),
        ({"Rows": 0, "Columns": 0, "PixelData": b""}, ExplicitVRLittleEndian, 0, 0xA900,
         "CT image of 0 x 0 pixels: needs at least 1 x 1"),
        ({"BitsAllocated": 12, "BitsStored": 12, "HighBit": 11, "PixelData": bytes(16 * 16 * 12 // 8)},
         ExplicitVRLittleEndian, 0, 0xA900, "CT image with BitsAllocated 12: needs 8 or 16"),
        ({"NumberOfFrames": 2, "PixelData": bytes(2 * 16 * 16 * 2)}, ExplicitVRLittleEndian, 0, 0xA900,
         "CT image with NumberOfFrames 2: classic is 1 frame"),
    ],
    ids=["missing", "rows-columns", "jpeg2000-over-raw", "claims-more-than-sent", "no-pixels", "12-bit-packed",
         "two-frames"],
)
def test_unusable_pixel_data_is_refused_with_its_reason(make_receiver, changes, syntax, cut, status, reason) -> None:
    receiver = make_receiver()
    image = _image(**changes)
    body = encode(image)
    assoc = scu_association(receiver.port, syntax)
    try:
        answer = raw_store(assoc, body[:len(body) - cut], image.SOPInstanceUID)
    finally:
        assoc.release()
    assert (answer.Status, answer.ErrorComment) == (status, reason)
    assert not list(receiver.spool.root.glob("*/*/*.dcm"))


def _before_pixel_data(body: bytes, inserted: bytes) -> bytes:
    """`body` with `inserted` just before its Pixel Data element (tags stay in ascending order)."""
    at = body.index(struct.pack("<HH", 0x7FE0, 0x0010))
    return body[:at] + inserted + body[at:]


_SEQUENCE = struct.pack("<HH2s2xL", 0x0040, 0xA730, b"SQ", 0xFFFFFFFF)  # Content Sequence, undefined length
_ITEM = struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF)
_ITEM_END, _SEQUENCE_END = struct.pack("<HHL", 0xFFFE, 0xE00D, 0), struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)


@pytest.mark.parametrize(
    ("inserted", "reason"),
    [
        ((_SEQUENCE + _ITEM) * 5000 + (_ITEM_END + _SEQUENCE_END) * 5000, "sequences nested over 32 deep"),
        (_SEQUENCE + _ITEM, "(0040,A730) of undefined length never ends"),
        (struct.pack("<HH2s2xL", 0x0040, 0xA160, b"UT", 0xFFFFFFFF) + b"abcd",
         "(0040,A160) has an undefined length but is no sequence"),
        (_SEQUENCE + struct.pack("<HHL", 0xFFFE, 0xE000, 0x7FFFFFF0), "(FFFE,E000) claims 2147483632 bytes, more than sent"),
        (struct.pack("<HH2sH", 0x0040, 0xA160, b"LO", 0xFFFF), "(0040,A160) claims 65535 bytes, more than sent"),
    ],
    ids=["nested-5000-deep", "undefined-length-never-ends", "undefined-length-text", "item-longer-than-sent",
         "element-longer-than-sent"],
)
def test_deep_nesting_and_broken_lengths_are_refused_naming_the_problem(make_receiver, inserted, reason) -> None:
    receiver = make_receiver()
    image = _image()
    assoc = scu_association(receiver.port)
    try:
        answer = raw_store(assoc, _before_pixel_data(encode(image), inserted), image.SOPInstanceUID)
        assert assoc.is_established, "the association did not survive the refusal"
        assert raw_store(assoc, encode(image), image.SOPInstanceUID).Status == 0x0000
    finally:
        assoc.release()
    assert (answer.Status, answer.ErrorComment) == (0xC000, reason)


def test_a_good_image_sent_raw_is_spooled_byte_for_byte(make_receiver) -> None:
    receiver = make_receiver()
    image = _image()
    body = encode(image)
    assoc = scu_association(receiver.port)
    try:
        assert raw_store(assoc, body, image.SOPInstanceUID).Status == 0x0000
    finally:
        assoc.release()
    (spooled,) = receiver.spool.root.glob("*/*/*.dcm")
    assert spooled.read_bytes().endswith(body)


def test_a_deflate_bomb_is_refused_without_inflating_it(make_receiver) -> None:
    receiver = make_receiver(max_dataset_mb=1)
    image = _image(Rows=2048, Columns=2048, PixelData=bytes(2048 * 2048 * 2))  # 8 MiB of zeros
    body = encode(image, DeflatedExplicitVRLittleEndian)
    assert len(body) < 64 << 10
    assoc = scu_association(receiver.port, DeflatedExplicitVRLittleEndian)
    try:
        before = rss_mb()
        answer = raw_store(assoc, body, image.SOPInstanceUID)
        grown = rss_mb() - before
    finally:
        assoc.release()
    assert (answer.Status, answer.ErrorComment) == (0xC000, "deflated data set inflates past 1 MiB")
    assert grown < 8, f"inflating the bomb's header took {grown:.0f} MB"


@pytest.mark.filterwarnings("ignore:The value length")  # pydicom, encoding the 65-character UID
def test_invalid_and_mismatched_request_uids_are_refused(make_receiver) -> None:
    receiver = make_receiver()
    image = _image()
    assoc = scu_association(receiver.port)
    try:
        too_long = raw_store(assoc, encode(image), "1." * 32 + "1")
        mismatch = raw_store(assoc, encode(image), generate_uid())
        assert assoc.is_established, "the association did not survive the refusals"
    finally:
        assoc.release()
    assert too_long.Status == 0xC000 and "AffectedSOPInstanceUID invalid (65 chars)" in too_long.ErrorComment
    assert mismatch.Status == 0xA900 and "AffectedSOPInstanceUID differs" in mismatch.ErrorComment


def test_a_data_set_over_the_limit_is_refused_not_held(make_receiver) -> None:
    receiver = make_receiver(max_dataset_mb=1)
    image = _image(Rows=1024, Columns=1024, PixelData=os.urandom(1024 * 1024 * 2))
    assoc = scu_association(receiver.port)
    try:
        answer = raw_store(assoc, encode(image), image.SOPInstanceUID)
    finally:
        assoc.release()
    assert (answer.Status, "over receiver.max_dataset_mb" in answer.ErrorComment) == (0xA700, True)


# Fuzz passes: fixed seed (derandomize), bounded examples, no example database; the property is that
# the parsers answer or refuse with their own error, never crash or hang, and the node keeps serving.
def fuzz(examples: int) -> settings:
    return settings(derandomize=True, max_examples=examples, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


_FUZZ_IMAGE = encode(ct_dataset("1.2.3", "1.2.3.4", 0, size=4))


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom on the fuzzed values
@fuzz(200)
@given(st.integers(0, len(_FUZZ_IMAGE)), st.binary(max_size=512),
       st.sampled_from([ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, JPEG2000Lossless, "1.2.840.10008.1.2"]))
def test_fuzz_data_set_header_parser(keep: int, tail: bytes, syntax: str) -> None:
    with contextlib.suppress(SpoolError):
        read_data_set_header(b"", BytesIO(_FUZZ_IMAGE[:keep] + tail), syntax, 1 << 20)


def test_fuzz_pdu_reader(make_receiver, tmp_path: Path) -> None:
    receiver = make_receiver(association_request_timeout_s=2.0, pdu_timeout_s=2.0)
    request = associate_rq()

    @fuzz(60)
    @given(st.booleans(), st.lists(st.binary(min_size=1, max_size=300), min_size=1, max_size=4))
    def one_connection(after_request: bool, chunks: list[bytes]) -> None:
        with connect(receiver.port) as sock:
            with contextlib.suppress(OSError):
                if after_request:
                    sock.sendall(request)
                for chunk in chunks:
                    sock.sendall(chunk)
                sock.shutdown(socket.SHUT_WR)
            assert closed_by_node(sock)

    one_connection()
    send_series(receiver.port, tmp_path / "after")
