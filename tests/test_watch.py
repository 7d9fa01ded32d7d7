"""The watch folder with a real inbox on disk: drops, slow copies, rejects; bounded waits only."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydicom.uid import SecondaryCaptureImageStorage, generate_uid

from dicom_peers import RecordingListener, ct_dataset, write_ct_series
from node.config import ReceiverConfig
from node.spool import Spool
from node.watch import StabilityTracker, Watcher

STABLE_S = 0.5
WAIT_S = 20.0


def wait_until(condition: Callable[[], bool], timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout_s} s")
        time.sleep(0.05)


class Inbox:
    def __init__(self, tmp_path: Path) -> None:
        self.dir = tmp_path / "inbox"
        self.rejected = tmp_path / "rejected"
        self.spool = Spool(tmp_path / "spool")
        self.listener = RecordingListener()
        config = ReceiverConfig(watch_dir=self.dir, watch_rejected_dir=self.rejected, watch_stable_s=STABLE_S, min_free_disk_mb=1)
        self.watcher = Watcher(config, self.spool, self.listener)

    def spooled(self) -> list[Path]:
        return sorted(self.spool.root.glob("*/*/*.dcm"))


@pytest.fixture
def inbox(tmp_path: Path) -> Iterator[Inbox]:
    box = Inbox(tmp_path)
    box.dir.mkdir()
    yield box
    box.watcher.stop()


def test_dropped_folder_is_spooled_as_one_batch_and_removed(inbox: Inbox, tmp_path: Path) -> None:
    inbox.watcher.start()
    staging = tmp_path / "staging" / "study1"
    files = write_ct_series(staging, 3)
    expected = {p.read_bytes() for p in files}

    shutil.move(staging, inbox.dir / "study1")

    assert inbox.listener.wait_released(1) == ["watch:0"]
    assert {p.read_bytes() for p in inbox.spooled()} == expected
    assert {i.calling_ae for i in inbox.listener.instances} == {"WATCH"}
    wait_until(lambda: not any(inbox.dir.iterdir()))


def test_file_being_written_is_read_only_when_complete(inbox: Inbox, tmp_path: Path) -> None:
    (source,) = write_ct_series(tmp_path / "staging", 1)
    raw = source.read_bytes()
    inbox.watcher.start()
    target = inbox.dir / "slow.dcm"

    def slow_copy() -> None:
        with target.open("wb") as handle:
            for start in range(0, len(raw), 1024):
                handle.write(raw[start:start + 1024])
                handle.flush()
                time.sleep(STABLE_S / 5)

    writer = threading.Thread(target=slow_copy)
    writer.start()
    writer.join(timeout=60)

    inbox.listener.wait_released(1)
    (spooled,) = inbox.spooled()
    assert spooled.read_bytes() == raw
    assert list(inbox.rejected.iterdir()) == []


def test_bad_files_are_rejected_with_a_reason_and_good_ones_kept(inbox: Inbox, tmp_path: Path) -> None:
    (good,) = write_ct_series(tmp_path / "staging", 1)
    shutil.copy(good, inbox.dir / "good.dcm")
    (inbox.dir / "notes.txt").write_text("not an image")
    raw = good.read_bytes()
    (inbox.dir / "truncated.dcm").write_bytes(raw[: len(raw) // 2])
    scout = ct_dataset(generate_uid(), generate_uid(), 0, sop_class=SecondaryCaptureImageStorage)
    scout.save_as(inbox.dir / "capture.dcm", enforce_file_format=True)

    inbox.watcher.start()  # files already in the inbox at start are picked up too

    inbox.listener.wait_released(1)
    assert [p.read_bytes() for p in inbox.spooled()] == [raw]
    reasons = {p.name: p.read_text() for p in inbox.rejected.glob("*.reason.txt")}
    assert set(reasons) == {"notes.txt.reason.txt", "truncated.dcm.reason.txt", "capture.dcm.reason.txt"}
    assert "not a DICOM" in reasons["notes.txt.reason.txt"]
    assert "cut short" in reasons["truncated.dcm.reason.txt"]
    assert "not CT Image Storage" in reasons["capture.dcm.reason.txt"]
    assert (inbox.rejected / "notes.txt").read_text() == "not an image"
    assert list(inbox.dir.iterdir()) == []


def test_stability_needs_an_unchanged_size_and_mtime_for_the_whole_period() -> None:
    tracker = StabilityTracker(stable_s=2.0)
    path = Path("a.dcm")

    assert tracker.observe({path: (10, 1)}, now=0.0) == []
    assert tracker.observe({path: (20, 2)}, now=1.5) == []
    assert tracker.observe({path: (20, 2)}, now=3.0) == []
    assert tracker.observe({path: (20, 2)}, now=3.5) == [path]
    assert tracker.observe({}, now=4.0) == []
    assert tracker.pending == 0
