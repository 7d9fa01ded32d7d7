"""Durable spool of received instances: root/<StudyUID>/<SeriesUID>/<SOPInstanceUID>.dcm.

An instance is acknowledged to a sender only after `Spool.store` returns, so every write is
temp file → fsync → rename → fsync of the directory, with O_DIRECT where the filesystem takes it
unless `storage.spool_direct_io` is off (see `durable.write_atomic`). The bytes are written as they arrived (no decode/re-encode): that
keeps the original encoding for audit and keeps the receive path fast.
"""

from __future__ import annotations

import enum
import logging
import re
import shutil
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Protocol

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_dataset
from pydicom.tag import BaseTag, Tag
from pydicom.uid import UID, ExplicitVRLittleEndian

from node.durable import TEMP_SUFFIX, Bytes, make_dirs, supports_direct_io, write_atomic
from node.ingest.dataset import DataSetProblem, Problem, check_pixel_data, check_structure, inflate_head
from node.ingest.dicom import multi_values

log = logging.getLogger(__name__)

_PIXEL_DATA_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)
_UNREADABLE = (InvalidDicomError, ValueError, EOFError, KeyError, TypeError, OSError)  # pydicom: OSError at a cut
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_SUMMARY_TAGS = (
    "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality",
    "ImageType", "SliceThickness", "SeriesDescription", "BodyPartExamined", "ConvolutionKernel",
    "PatientID", "AccessionNumber", "StudyDate", "InstanceNumber",
)
MAX_INFLATED_BYTES = 64 << 20  # a deflated file from the watch folder; the receiver passes max_dataset_mb
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_PIXEL_TAGS = ("Rows", "Columns", "BitsAllocated", "SamplesPerPixel", "NumberOfFrames")
_DATA_SET_TAGS = [Tag(keyword) for keyword in (*_SUMMARY_TAGS, *_PIXEL_TAGS, "SpecificCharacterSet")]


class SpoolError(Exception):
    """Input that cannot be spooled; the message says why in one line."""


class DataSetMismatch(SpoolError):
    """A data set that breaks its SOP class's rules (no or inconsistent Pixel Data, UIDs that disagree)."""


class StoreOutcome(enum.Enum):
    """What `Spool.store` did, so callers can tell a resend from changed content."""

    NEW = "new"
    DUPLICATE = "duplicate"  # identical bytes were already spooled: nothing written
    REPLACED = "replaced"  # same SOP Instance UID, different bytes: replaced atomically


@dataclass(frozen=True)
class Receipt:
    """How an instance reached the node (an association or a watch-folder batch)."""

    association_id: str
    calling_ae: str
    received_at: float


@dataclass(frozen=True)
class SpooledInstance:
    """One durable instance plus the header fields series selection needs (never the patient name)."""

    path: Path
    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    association_id: str
    calling_ae: str
    received_at: float
    modality: str
    image_type: tuple[str, ...]
    slice_thickness: float | None
    series_description: str
    body_part: str
    convolution_kernel: str
    patient_id: str
    accession_number: str
    study_date: str
    instance_number: int | None
    outcome: StoreOutcome = StoreOutcome.NEW


class SpoolListener(Protocol):
    """Told about every spooled instance; implemented by the series/job state."""

    def instance_stored(self, instance: SpooledInstance) -> None: ...

    def association_released(self, association_id: str) -> None: ...

    def association_aborted(self, association_id: str) -> None:
        """The association ended without a release: what it carried may be incomplete."""

    def instance_refused(self, association_id: str, series_uid: str | None, sop_instance_uid: str | None) -> None:
        """An instance was answered with a failure (a UID None when it is not known)."""


class Spool:
    """The on-disk spool; safe for concurrent stores from several associations."""

    def __init__(self, root: Path, direct_io: bool = True) -> None:
        """`direct_io`: write with O_DIRECT where the filesystem takes it (storage.spool_direct_io)."""
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.direct_io = direct_io and supports_direct_io(self.root)
        log.info("event=spool_opened root=%s write_mode=%s", self.root, "direct" if self.direct_io else "page_cache")

    def store(self, data: bytes | bytearray | memoryview | Path, receipt: Receipt) -> SpooledInstance:
        """Durably spool one DICOM Part 10 file given as its bytes (or a file to copy them from)."""
        raw = Path(data).read_bytes() if isinstance(data, Path) else bytes(data)
        return self.store_parts([raw], read_header(raw), receipt)

    def store_parts(self, parts: Sequence[Bytes], header: Dataset, receipt: Receipt) -> SpooledInstance:
        """Durably spool a Part 10 file given as consecutive byte ranges and its header, as read (and
        checked) by read_header or read_data_set_header.

        The receiver's path: file meta and data set are written as they are, never joined or copied.
        """
        sop_uid = _checked_uid(header.SOPInstanceUID, "SOPInstanceUID")
        target = self.series_dir(header.StudyInstanceUID, header.SeriesInstanceUID) / f"{sop_uid}.dcm"
        outcome = self._write(target, parts)
        instance = summarize(header, target, receipt, outcome)
        if outcome is StoreOutcome.REPLACED:
            log.warning(
                "event=instance_replaced series=%s sop=%s association=%s reason=\"same SOP Instance UID with different content\"",
                instance.series_uid, instance.sop_instance_uid, receipt.association_id,
            )
        return instance

    def series_dir(self, study_uid: str, series_uid: str) -> Path:
        """Where one series' instances live (the UIDs are checked so they cannot escape the root)."""
        return self.root / _checked_uid(study_uid, "StudyInstanceUID") / _checked_uid(series_uid, "SeriesInstanceUID")

    def series_files(self, study_uid: str, series_uid: str) -> list[Path]:
        """The spooled instance files of a series, sorted by name for stable ordering."""
        folder = self.series_dir(study_uid, series_uid)
        return sorted(folder.glob("*.dcm")) if folder.is_dir() else []

    def series(self) -> Iterator[tuple[str, str]]:
        """Every (study UID, series UID) present, for rebuilding state after a restart."""
        for study in sorted(p for p in self.root.iterdir() if p.is_dir()):
            for series in sorted(p for p in study.iterdir() if p.is_dir()):
                yield study.name, series.name

    def remove_series(self, folder: Path) -> int:
        """Delete a series folder's files, then the folder and its study folder once empty; returns files removed."""
        if folder.parent.parent != self.root:
            raise ValueError(f"{folder} is not a series folder of the spool {self.root}: not removed")
        removed = 0
        for path in folder.glob("*"):
            if path.is_file():
                path.unlink(missing_ok=True)
                removed += 1
        for empty in (folder, folder.parent):  # the study folder too, once its last series is gone
            try:
                empty.rmdir()
            except OSError:
                break
        return removed

    def remove_partial_files(self) -> int:
        """Delete temp files left by writes that a crash interrupted (never acknowledged)."""
        removed = 0
        for partial in self.root.glob(f"*/*/.*{TEMP_SUFFIX}"):
            partial.unlink(missing_ok=True)
            removed += 1
        return removed

    def free_disk_mb(self) -> int:
        """Free space for the spool's filesystem, for the receiver's watermark."""
        return shutil.disk_usage(self.root).free // (1024 * 1024)

    def _write(self, target: Path, parts: Sequence[Bytes]) -> StoreOutcome:
        if target.exists():
            if _same_content(target, parts):
                return StoreOutcome.DUPLICATE
            write_atomic(target, parts, self.direct_io)
            return StoreOutcome.REPLACED
        make_dirs(target.parent, self.root)
        write_atomic(target, parts, self.direct_io)
        return StoreOutcome.NEW


def read_header(raw: bytes, max_inflated: int = MAX_INFLATED_BYTES) -> Dataset:
    """Parse only the header of a Part 10 file; refuse anything the spool could not file.

    A deflated file is inflated in bounded steps (pydicom would inflate all of it to read its header).
    """
    if len(raw) < 132 or raw[128:132] != b"DICM":
        raise SpoolError("not a DICOM Part 10 file (no 'DICM' prefix at byte 128): send DICOM files, or convert with dcmconv")
    meta_end, syntax = _file_meta(raw)
    if syntax is not None and not UID(syntax).is_transfer_syntax:
        raise SpoolError(f"file meta TransferSyntaxUID {syntax[:64]!r} is no transfer syntax: re-export the file")
    if syntax is not None and UID(syntax).is_deflated:
        return read_data_set_header(raw[:meta_end], BytesIO(raw[meta_end:]), syntax, max_inflated, check_pixels=False)
    if syntax is not None:
        try:
            check_structure(memoryview(raw)[meta_end:], len(raw) - meta_end, UID(syntax))
        except DataSetProblem as exc:
            raise SpoolError(str(exc)) from None
    try:
        header = pydicom.dcmread(BytesIO(raw), stop_before_pixels=True, specific_tags=list(_SUMMARY_TAGS))
    except _UNREADABLE as exc:
        raise SpoolError(f"unreadable DICOM header: {exc}") from None
    check_header(header)
    return header


def read_data_set_header(head: bytes, body: BytesIO, transfer_syntax_uid: str, max_inflated: int,
                         check_pixels: bool = True) -> Dataset:
    """Parse and check the header of a received CT data set, given apart from its encoded file meta `head`.

    Reading the data set where it lies saves joining and copying half a megabyte per image. A deflated
    one is inflated in bounded steps (at most `max_inflated` bytes counted, its header kept); its Pixel
    Data is checked against Rows, Columns and the transfer syntax without decoding it.
    """
    syntax = UID(transfer_syntax_uid)
    try:
        if syntax.is_deflated:
            with body.getbuffer() as deflated:
                inflated = inflate_head(deflated, max_inflated)
            source, total = BytesIO(inflated.head), inflated.total
            plain = UID(ExplicitVRLittleEndian)
        else:
            source, total, plain = body, body.getbuffer().nbytes, syntax
        with source.getbuffer() as data:
            check_structure(data, total, plain)
        source.seek(0)
        try:
            header = read_dataset(source, plain.is_implicit_VR, plain.is_little_endian, stop_when=_at_pixel_data,
                                  specific_tags=_DATA_SET_TAGS)
        except _UNREADABLE as exc:
            raise SpoolError(f"unreadable DICOM header: {exc}") from None
        header.file_meta = FileMetaDataset()
        header.file_meta.TransferSyntaxUID = syntax
        check_header(header)
        if check_pixels:
            with source.getbuffer() as data:
                check_pixel_data(data, source.tell(), total, header, plain)
    except DataSetProblem as exc:
        raise (DataSetMismatch if exc.problem is Problem.MISMATCH else SpoolError)(str(exc)) from None
    return header


def _file_meta(raw: bytes) -> tuple[int, str | None]:
    """(where the file meta group ends, its TransferSyntaxUID) from the explicit VR little endian elements
    after "DICM", without pydicom reading on into the data set."""
    at, syntax = 132, None
    while at + 8 <= len(raw):
        group, element, vr = struct.unpack_from("<HH2s", raw, at)
        if group != 0x0002:
            break
        if vr in _LONG_VRS:
            if at + 12 > len(raw):
                break
            length, value_at = struct.unpack_from("<L", raw, at + 8)[0], at + 12
        else:
            length, value_at = struct.unpack_from("<H", raw, at + 6)[0], at + 8
        if element == 0x0010:
            syntax = raw[value_at:value_at + length].rstrip(b"\x00 ").decode("ascii", "replace")
        at = value_at + length
    return at, syntax


def check_header(header: Dataset) -> None:
    """Refuse a header the spool could not file, naming what is missing."""
    if "TransferSyntaxUID" not in header.file_meta:
        raise SpoolError("DICOM file meta has no TransferSyntaxUID: re-export the file with a complete file meta header")
    for keyword in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID"):
        if not str(header.get(keyword, "")).strip():
            raise SpoolError(f"DICOM file has no {keyword}: the sender must supply it")


def _at_pixel_data(tag: BaseTag, vr: str | None, length: int) -> bool:
    return tag >> 16 == 0x7FE0 and tag in _PIXEL_DATA_TAGS  # int arithmetic first: BaseTag's == is Python code


def summarize(header: Dataset, path: Path, receipt: Receipt, outcome: StoreOutcome) -> SpooledInstance:
    """Reduce a header to the fields the node keeps (no patient name)."""
    return SpooledInstance(
        path=path,
        study_uid=str(header.StudyInstanceUID),
        series_uid=str(header.SeriesInstanceUID),
        sop_instance_uid=str(header.SOPInstanceUID),
        sop_class_uid=str(header.SOPClassUID),
        transfer_syntax_uid=str(header.file_meta.TransferSyntaxUID),
        association_id=receipt.association_id,
        calling_ae=receipt.calling_ae,
        received_at=receipt.received_at,
        modality=_text(header, "Modality"),
        image_type=tuple(str(v).strip() for v in multi_values(header.get("ImageType"))),
        slice_thickness=_float_or_none(header.get("SliceThickness")),
        series_description=_text(header, "SeriesDescription"),
        body_part=_text(header, "BodyPartExamined"),
        convolution_kernel="\\".join(str(v) for v in multi_values(header.get("ConvolutionKernel"))),
        patient_id=_text(header, "PatientID"),
        accession_number=_text(header, "AccessionNumber"),
        study_date=_text(header, "StudyDate"),
        instance_number=_int_or_none(header.get("InstanceNumber")),
        outcome=outcome,
    )


def _checked_uid(uid: str, keyword: str) -> str:
    uid = str(uid).strip()
    if len(uid) > 64 or not _UID.match(uid):
        raise SpoolError(f"{keyword} {uid[:70]!r} is not a valid UID (digits and dots, at most 64 characters): fix the sender")
    return uid


def _text(header: Dataset, keyword: str) -> str:
    value = header.get(keyword)
    return "" if value is None else str(value).strip()


def _float_or_none(value: object) -> float | None:
    try:
        return None if value in (None, "") else float(value)
    except (TypeError, ValueError):
        return None


def _int_or_none(value: object) -> int | None:
    try:
        return None if value in (None, "") else int(value)
    except (TypeError, ValueError):
        return None


def _same_content(path: Path, parts: Sequence[Bytes]) -> bool:
    """Compare in 1 MiB steps: neither the spooled file nor the received parts are copied whole."""
    step = 1 << 20
    try:
        if path.stat().st_size != sum(len(p) for p in parts):
            return False
        with path.open("rb") as spooled:
            for part in parts:
                view = memoryview(part).cast("B")
                for offset in range(0, len(view), step):
                    chunk = view[offset:offset + step]
                    if spooled.read(len(chunk)) != chunk:
                        return False
    except FileNotFoundError:
        return False
    return True
