"""Cheap checks of a received data set, on the path to its acknowledgement: no pixel decoding.

- A deflated data set is inflated in bounded steps: its header is kept, the rest only counted,
  and one that inflates past its limit (a deflate bomb) is refused before it is held in memory.
- Pixel Data is located from its element header and checked against the image attributes and
  the transfer syntax, so a sender learns at once that an image is unusable instead of
  believing it succeeded while the job fails later.
"""

from __future__ import annotations

import enum
import struct
import zlib
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.uid import UID

HEADER_LIMIT = 4 << 20  # inflated bytes kept for parsing: CT headers, private blocks included, are far smaller
_INFLATE_STEP = 1 << 20
_PIXEL_DATA = 0x7FE00010
_ITEM, _SEQUENCE_DELIMITER = 0xFFFEE000, 0xFFFEE0DD
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_UNDEFINED = 0xFFFFFFFF


class Problem(enum.Enum):
    """Which family of C-STORE failure a problem belongs to (see receiver.StoreStatus)."""

    MISMATCH = "data set does not match SOP class"  # the IOD's rules: missing or inconsistent attributes
    UNREADABLE = "cannot understand"  # the encoding: truncated, or not what the transfer syntax says


class DataSetProblem(ValueError):
    """An unusable data set; the message (at most 64 characters: it becomes the ErrorComment) says why."""

    def __init__(self, problem: Problem, reason: str) -> None:
        super().__init__(reason)
        self.problem = problem


@dataclass(frozen=True)
class Inflated:
    """The start of an inflated data set, and how long the whole of it is."""

    head: bytes
    total: int


def inflate_head(deflated: bytes | memoryview, limit: int) -> Inflated:
    """Inflate a Deflated Explicit VR data set, keeping `HEADER_LIMIT` bytes and counting the rest up to `limit`."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    kept, total = bytearray(), 0
    pending = memoryview(deflated)
    try:
        while True:
            chunk = inflater.decompress(pending, _INFLATE_STEP)
            total += len(chunk)
            if total > limit:
                raise DataSetProblem(Problem.UNREADABLE, f"deflated data set inflates past {limit >> 20} MiB")
            if len(kept) < HEADER_LIMIT:
                kept += chunk[: HEADER_LIMIT - len(kept)]
            pending = memoryview(inflater.unconsumed_tail)
            if not pending and (not chunk or inflater.eof):
                break
    except zlib.error:
        raise DataSetProblem(Problem.UNREADABLE, "deflated data set does not inflate") from None
    return Inflated(bytes(kept), total)


def check_pixel_data(data: bytes | memoryview, position: int, total: int, header: Dataset, syntax: UID) -> None:
    """Check the Pixel Data element found at `position` of a data set `total` bytes long (`data` may be its start)."""
    if position + 8 > len(data):
        raise DataSetProblem(Problem.MISMATCH, "no Pixel Data (7FE0,0010) in the CT image")
    little = syntax.is_little_endian
    group, element = struct.unpack_from("<HH" if little else ">HH", data, position)
    tag = group << 16 | element
    if tag != _PIXEL_DATA:
        raise DataSetProblem(Problem.MISMATCH, f"CT image has ({group:04X},{element:04X}), not Pixel Data")
    length, value_at = _element_length(data, position, syntax)
    if syntax.is_encapsulated:
        if length != _UNDEFINED:
            raise DataSetProblem(Problem.UNREADABLE, f"{_short(syntax)} declared, Pixel Data not encapsulated")
        _check_fragments(data, value_at, total, little)
        return
    if length == _UNDEFINED:
        raise DataSetProblem(Problem.UNREADABLE, "Pixel Data encapsulated in an uncompressed syntax")
    if value_at + length > total:
        raise DataSetProblem(Problem.UNREADABLE, f"Pixel Data claims {length} bytes, {max(0, total - value_at)} sent")
    expected = _expected_length(header)
    if length not in (expected, expected + expected % 2):
        raise DataSetProblem(Problem.MISMATCH, f"Pixel Data has {length} bytes, Rows x Columns need {expected}")


def _element_length(data: bytes | memoryview, position: int, syntax: UID) -> tuple[int, int]:
    """(value length, where the value starts) of the element whose tag is at `position`."""
    order = "<" if syntax.is_little_endian else ">"
    if syntax.is_implicit_VR:
        return struct.unpack_from(order + "L", data, position + 4)[0], position + 8
    vr = bytes(data[position + 4:position + 6])
    if vr in _LONG_VRS:
        if position + 12 > len(data):
            raise DataSetProblem(Problem.UNREADABLE, "data set ends inside the Pixel Data header")
        return struct.unpack_from(order + "L", data, position + 8)[0], position + 12
    return struct.unpack_from(order + "H", data, position + 6)[0], position + 8


def _check_fragments(data: bytes | memoryview, at: int, total: int, little: bool) -> None:
    """Walk the item headers of encapsulated Pixel Data (a handful per image) up to its delimiter."""
    layout = "<HHL" if little else ">HHL"
    items = 0
    while at + 8 <= len(data):
        group, element, length = struct.unpack_from(layout, data, at)
        tag = group << 16 | element
        if tag == _SEQUENCE_DELIMITER:
            if items > 1:  # the offset table and at least one fragment
                return
            break
        if tag != _ITEM:
            raise DataSetProblem(Problem.UNREADABLE, "encapsulated Pixel Data has no item tag")
        if length == _UNDEFINED or at + 8 + length > total:
            raise DataSetProblem(Problem.UNREADABLE, f"Pixel Data fragment claims {length} bytes, more than sent")
        at += 8 + length
        items += 1
    raise DataSetProblem(Problem.UNREADABLE, "encapsulated Pixel Data has no frames or no end")


def _expected_length(header: Dataset) -> int:
    missing = [k for k in ("Rows", "Columns", "BitsAllocated") if not isinstance(header.get(k), int)]
    if missing:
        raise DataSetProblem(Problem.MISMATCH, f"CT image without {', '.join(missing)}")
    frames = _positive(header.get("NumberOfFrames"), 1)
    samples = _positive(header.get("SamplesPerPixel"), 1)
    return (header.Rows * header.Columns * frames * samples * header.BitsAllocated + 7) // 8


def _positive(value: object, default: int) -> int:
    try:
        number = int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return default
    return number if number > 0 else default


def _short(syntax: UID) -> str:
    """A transfer syntax name short enough for an ErrorComment."""
    name = syntax.name.replace(" Image Compression", "").replace("(Lossless Only)", "Lossless")
    return name[:26]  # + " declared, Pixel Data not encapsulated" fits the 64 characters of ErrorComment
