"""The spool on a real folder: layout, refusals, duplicates and crash leftovers."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from dicom_peers import ct_dataset, write_ct_series
from pydicom.uid import DeflatedExplicitVRLittleEndian, generate_uid

from node.durable import make_dirs, supports_direct_io, write_atomic
from node.ingest.spool import Receipt, Spool, SpoolError, StoreOutcome, read_header

RECEIPT = Receipt("assoc:test", "MODALITY", time.time())


def test_layout_and_summary_without_patient_name(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    (path,) = write_ct_series(tmp_path / "in", 1)

    instance = spool.store(path, RECEIPT)

    assert instance.path == spool.series_dir(instance.study_uid, instance.series_uid) / f"{instance.sop_instance_uid}.dcm"
    assert instance.path.read_bytes() == path.read_bytes()
    assert list(spool.series()) == [(instance.study_uid, instance.series_uid)]
    assert spool.series_files(instance.study_uid, instance.series_uid) == [instance.path]
    assert "Test^Patient" not in repr(instance)


def test_identical_resend_writes_nothing(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    (path,) = write_ct_series(tmp_path / "in", 1)
    first = spool.store(path, RECEIPT)
    written = first.path.stat().st_mtime_ns

    again = spool.store(path, RECEIPT)

    assert again.outcome is StoreOutcome.DUPLICATE
    assert again.path.stat().st_mtime_ns == written


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"plain text, not an image", "not a DICOM Part 10 file"),
        (b"\0" * 128 + b"DICM" + b"\x02\x00", "no TransferSyntaxUID"),
    ],
)
def test_non_dicom_is_refused_with_a_reason(tmp_path: Path, raw: bytes, reason: str) -> None:
    with pytest.raises(SpoolError, match=reason):
        Spool(tmp_path / "spool").store(raw, RECEIPT)


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
@pytest.mark.parametrize("keyword", ["SeriesInstanceUID", "SOPInstanceUID"])
def test_a_uid_that_would_leave_the_spool_is_refused(tmp_path: Path, keyword: str) -> None:
    dataset = ct_dataset(generate_uid(), generate_uid(), 0)
    setattr(dataset, keyword, "../../../etc")
    dataset.save_as(tmp_path / "evil.dcm", enforce_file_format=True)

    with pytest.raises(SpoolError, match=f"{keyword} .* is not a valid UID"):
        Spool(tmp_path / "spool").store(tmp_path / "evil.dcm", RECEIPT)
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["evil.dcm"]


def test_partial_files_from_a_crash_are_removed(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    (path,) = write_ct_series(tmp_path / "in", 1)
    instance = spool.store(path, RECEIPT)
    leftover = instance.path.parent / ".1.2.3.dcm.abcd1234.partial"
    leftover.write_bytes(b"half")

    assert spool.remove_partial_files() == 1
    assert spool.series_files(instance.study_uid, instance.series_uid) == [instance.path]


def test_spooled_files_are_the_bytes_sent_whatever_their_length(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    sent = write_ct_series(tmp_path / "in", 3, size=37)  # file lengths that are not whole blocks
    stored = [spool.store(path, RECEIPT) for path in sent]
    assert [i.path.read_bytes() for i in stored] == [p.read_bytes() for p in sent]
    assert not list(spool.root.rglob("*.partial"))


@pytest.mark.parametrize("direct", [False, True], ids=["page-cache", "o-direct"])
def test_write_atomic_joins_parts_without_padding(tmp_path: Path, direct: bool) -> None:
    """With O_DIRECT the file is written in whole blocks, then cut to length (tmpfs refuses O_DIRECT)."""
    parts = [b"head", memoryview(bytes(range(256)) * 40)[3:], bytearray(b"tail")]
    target = tmp_path / "file"
    try:
        write_atomic(target, parts, direct)
    except OSError:
        pytest.skip("this filesystem refuses O_DIRECT")
    assert target.read_bytes() == b"".join(bytes(p) for p in parts)
    assert not list(tmp_path.glob("*.partial"))


def test_the_write_mode_follows_the_setting_and_the_probe_leaves_nothing_behind(tmp_path: Path) -> None:
    assert Spool(tmp_path / "cache", direct_io=False).direct_io is False
    assert Spool(tmp_path / "direct").direct_io is supports_direct_io(tmp_path)
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_make_dirs_creates_only_below_its_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    make_dirs(root / "study" / "series", root)
    make_dirs(tmp_path / "a" / "b")
    assert (root / "study" / "series").is_dir() and (tmp_path / "a" / "b").is_dir()


def test_a_deflated_file_is_read_without_inflating_all_of_it(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    image = ct_dataset(generate_uid(), generate_uid(), 0, size=16)
    image.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    small = tmp_path / "small.dcm"
    image.save_as(small, enforce_file_format=True)
    assert spool.store(small, RECEIPT).sop_instance_uid == image.SOPInstanceUID
    image.Rows = image.Columns = 4096
    image.PixelData = bytes(4096 * 4096 * 2)  # 32 MiB of zeros, a few KB deflated
    bomb = tmp_path / "bomb.dcm"
    image.save_as(bomb, enforce_file_format=True)
    with pytest.raises(SpoolError, match="inflates past 1 MiB"):
        read_header(bomb.read_bytes(), max_inflated=1 << 20)
