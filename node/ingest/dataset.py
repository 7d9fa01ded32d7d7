"""Cheap checks of a received data set, on the path to its acknowledgement: no pixel decoding.

- A deflated data set is inflated in bounded steps: its header is kept, the rest only counted,
  and one that inflates past its limit (a deflate bomb) is refused before it is held in memory.
- The element headers before Pixel Data are walked (no values read) before pydicom parses them:
  pydicom recurses once per sequence level (5,000 levels raised RecursionError) and reads a
  length that runs past the data, or an undefined length that never ends, as a file error, so
  nesting is bounded at `MAX_NESTING` and a broken length is refused naming its element.
- The image pixel module is checked against what the node can decode for its SOP class
  (`PIXEL_RULES`: Rows and Columns at least 1, BitsAllocated, frames), and Pixel Data is located
  from its element header and checked against those attributes and the transfer syntax, so a
  sender learns at once that an image is unusable instead of believing it succeeded while the
  job fails later.
"""

from __future__ import annotations

import enum
import functools
import struct
import zlib
from dataclasses import dataclass

from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pydicom.uid import UID

from node.ingest.dicom import CT_IMAGE_STORAGE

HEADER_LIMIT = 4 << 20  # inflated bytes kept for parsing: CT headers, private blocks included, are far smaller
_INFLATE_STEP = 1 << 20
_PIXEL_DATA = 0x7FE00010
_ITEM, _SEQUENCE_DELIMITER = 0xFFFEE000, 0xFFFEE0DD
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_UNDEFINED = 0xFFFFFFFF
_ITEM_DELIMITER = 0xFFFEE00D
MAX_NESTING = 32  # sequence levels; CT headers nest a handful, and pydicom copes with about 150


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
class PixelRules:
    """What the node can decode for one SOP class, checked from the header alone."""

    name: str  # as an ErrorComment names the image ("CT image")
    bits_allocated: frozenset[int]
    single_frame: bool  # classic IODs: NumberOfFrames absent or 1


# One row per SOP class the node stores; MR Image Storage gets its row when MR is measured.
PIXEL_RULES: dict[str, PixelRules] = {
    CT_IMAGE_STORAGE: PixelRules("CT image", frozenset({8, 16}), single_frame=True),
}


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
    check_pixel_module(header)
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


def check_pixel_module(header: Dataset) -> None:
    """Refuse an image whose pixel module the node cannot decode for its SOP class (see PIXEL_RULES)."""
    rules = PIXEL_RULES.get(str(header.get("SOPClassUID", "")).strip(), PIXEL_RULES[CT_IMAGE_STORAGE])
    missing = [k for k in ("Rows", "Columns", "BitsAllocated") if not isinstance(header.get(k), int)]
    if missing:
        raise DataSetProblem(Problem.MISMATCH, f"{rules.name} without {', '.join(missing)}")
    if header.Rows < 1 or header.Columns < 1:
        raise DataSetProblem(Problem.MISMATCH, f"{rules.name} of {header.Rows} x {header.Columns} pixels: needs at least 1 x 1")
    if header.BitsAllocated not in rules.bits_allocated:
        allowed = " or ".join(str(bits) for bits in sorted(rules.bits_allocated))
        raise DataSetProblem(Problem.MISMATCH, f"{rules.name} with BitsAllocated {header.BitsAllocated}: needs {allowed}")
    frames = header.get("NumberOfFrames")
    if rules.single_frame and frames not in (None, "") and str(frames).strip() != "1":
        raise DataSetProblem(Problem.MISMATCH, f"{rules.name} with NumberOfFrames {str(frames)[:8]}: classic is 1 frame")


def check_structure(data: bytes | memoryview, total: int, syntax: UID, limit: int = MAX_NESTING) -> None:
    """Walk the element headers of a data set up to its top-level Pixel Data, without reading values.

    `data` may be only the start of a data set `total` bytes long (a deflated one's inflated head).
    Refuses sequences nested deeper than `limit`, a length that runs past the data or its item,
    and an undefined length that is not a sequence's or never ends. On every image's path to its
    acknowledgement, so the common element takes one unpack and no other check: in explicit VR a
    top-level one with a 2-byte length, in implicit VR one of defined length at the top level
    (pydicom steps over a top-level sequence of defined length that it was not asked for, unread).
    """
    order = "<" if syntax.is_little_endian else ">"
    explicit_header, implicit_header, long_length = (struct.Struct(order + f) for f in ("HH2sH", "HHL", "L"))
    explicit = not syntax.is_implicit_VR
    open_: list[tuple[int, int | None]] = []  # (tag, end) of each open sequence and item; end None: at its delimiter
    at, last, size = 0, 0, len(data)
    while at + 8 <= size:
        if explicit and not open_:  # the bulk of a header: checked against `total` once the walk ends
            group, element, vr, length = explicit_header.unpack_from(data, at)
            if vr not in _LONG_VRS and group != 0xFFFE:
                last, at = at, at + 8 + length
                continue
        while open_ and open_[-1][1] is not None and at >= open_[-1][1]:
            open_.pop()
        if explicit:
            group, element, vr, length = explicit_header.unpack_from(data, at)
            plain = vr not in _LONG_VRS
        else:
            group, element, length = implicit_header.unpack_from(data, at)
            vr, plain = b"", length != _UNDEFINED and not open_  # not a sequence pydicom would read
        if plain and group != 0xFFFE:
            last, at = at, at + 8 + length
            if at > total or (open_ and open_[-1][1] is not None and at > open_[-1][1]):
                raise DataSetProblem(Problem.UNREADABLE, f"{_tag(group << 16 | element)} claims {length} bytes, more than sent")
            continue
        tag = group << 16 | element
        if group == 0xFFFE:
            at = _item_header(open_, tag, long_length.unpack_from(data, at + 4)[0], at, total)
            continue
        if not open_ and group == 0x7FE0:
            return
        at = _open_element(data, open_, tag, vr, at, total, long_length, explicit)
        if len(open_) > 2 * limit:
            raise DataSetProblem(Problem.UNREADABLE, f"sequences nested over {limit} deep")
    if at > total:
        group, element, _, length = explicit_header.unpack_from(data, last)
        raise DataSetProblem(Problem.UNREADABLE, f"{_tag(group << 16 | element)} claims {length} bytes, more than sent")
    if size >= total and any(end is None for _, end in open_):
        tag = next(tag for tag, end in open_ if end is None)  # the outermost: a sequence
        raise DataSetProblem(Problem.UNREADABLE, f"{_tag(tag)} of undefined length never ends")


def _item_header(open_: list[tuple[int, int | None]], tag: int, length: int, at: int, total: int) -> int:
    """Open an item or close an undefined-length item or sequence; where the next header starts."""
    if tag == _ITEM:
        if not open_ or open_[-1][0] == _ITEM:
            raise DataSetProblem(Problem.UNREADABLE, "item (FFFE,E000) outside a sequence")
        end = None if length == _UNDEFINED else at + 8 + length
        if end is not None and (end > total or (open_[-1][1] is not None and end > open_[-1][1])):
            raise DataSetProblem(Problem.UNREADABLE, f"{_tag(tag)} claims {length} bytes, more than sent")
        open_.append((tag, end))
    elif tag in (_ITEM_DELIMITER, _SEQUENCE_DELIMITER) and open_ and open_[-1][1] is None:
        open_.pop()
    else:
        raise DataSetProblem(Problem.UNREADABLE, f"{_tag(tag)} where no item or sequence is open")
    return at + 8


def _open_element(data: bytes | memoryview, open_: list[tuple[int, int | None]], tag: int, vr: bytes, at: int,
                  total: int, long_length: struct.Struct, explicit: bool) -> int:
    """Step over an element with a 4-byte length, or into it when it is a sequence; where the next header starts."""
    if explicit:
        if at + 12 > len(data):
            raise DataSetProblem(Problem.UNREADABLE, f"data set ends inside the header of {_tag(tag)}")
        length, value_at = long_length.unpack_from(data, at + 8)[0], at + 12
        sequence = vr == b"SQ" or (vr == b"UN" and length == _UNDEFINED)
    else:
        length, value_at = long_length.unpack_from(data, at + 4)[0], at + 8
        sequence = length == _UNDEFINED or _dictionary_sequence(tag)
    end = None if length == _UNDEFINED else value_at + length
    if end is not None and (end > total or (open_ and open_[-1][1] is not None and end > open_[-1][1])):
        raise DataSetProblem(Problem.UNREADABLE, f"{_tag(tag)} claims {length} bytes, more than sent")
    if not sequence:
        if end is None:
            raise DataSetProblem(Problem.UNREADABLE, f"{_tag(tag)} has an undefined length but is no sequence")
        return end
    open_.append((tag, end))
    return value_at


@functools.lru_cache(maxsize=4096)
def _dictionary_sequence(tag: int) -> bool:
    try:
        return dictionary_VR(tag) == "SQ"
    except KeyError:  # private or unknown: read as UN, not as a sequence
        return False


def _tag(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _expected_length(header: Dataset) -> int:
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
