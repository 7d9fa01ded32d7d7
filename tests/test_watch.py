"""The watch folder with a real inbox on disk: drops, slow copies, rejects; bounded waits only."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from dicom_peers import RecordingListener, ct_dataset, free_port, write_ct_series
from pydicom.uid import SecondaryCaptureImageStorage, generate_uid
from support import wait_until

from node.config import CompletionConfig, ReceiverConfig, SelectionConfig
from node.ingest.series import SeriesTracker
from node.ingest.spool import Spool
from node.ingest.watch import StabilityTracker, Watcher, WatchFolderError
from node.state.store import State

ROOT = Path(__file__).resolve().parents[1]
PATIENT_FOLDER = "MUELLER_JOERG"  # exporters name folders after the patient

STABLE_S = 0.5
WAIT_S = 20.0


class Inbox:
    def __init__(self, tmp_path: Path, **settings: object) -> None:
        self.dir = tmp_path / "inbox"
        self.rejected = tmp_path / "rejected"
        self.spool = Spool(tmp_path / "spool")
        self.listener = RecordingListener()
        config = ReceiverConfig(watch_dir=self.dir, watch_rejected_dir=self.rejected, watch_stable_s=STABLE_S,
                                min_free_disk_mb=1, **settings)
        self.watcher = Watcher(config, self.spool, self.listener)

    def spooled(self) -> list[Path]:
        return sorted(self.spool.root.glob("*/*/*.dcm"))


@contextlib.contextmanager
def read_only(folder: Path) -> Iterator[None]:
    """Make `folder` unwritable even for root (immutable flag), as a read-only mount would."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(0o755)
        return
    if subprocess.run(["chattr", "+i", str(folder)], check=False, capture_output=True).returncode != 0:
        pytest.skip("cannot make a folder read-only for root here (chattr +i failed)")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


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


@pytest.mark.parametrize("which", ["dir", "rejected"])
def test_a_folder_files_cannot_leave_is_refused_at_start_naming_the_fix(inbox: Inbox, which: str) -> None:
    folder = getattr(inbox, which)
    folder.mkdir(exist_ok=True)

    with read_only(folder), pytest.raises(WatchFolderError) as refused:
        inbox.watcher.start()

    assert f"{folder} is not writable" in str(refused.value)
    assert f"ReadWritePaths={folder} with `systemctl edit paraspinal-node`" in str(refused.value)


def test_serve_with_a_read_only_watch_folder_ends_with_one_line_naming_the_fix(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    config = tmp_path / "node.toml"
    config.write_text(f"""
[receiver]
port = {free_port()}
bind_address = "127.0.0.1"
watch_dir = "{inbox}"
[storage]
state_dir = "{tmp_path / 'state'}"
[worker]
count = 0
""")
    with read_only(inbox):
        result = subprocess.run([sys.executable, "-m", "node.cli.main", "serve", "--config", str(config)], check=False,
                                cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                                timeout=120)

    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"paraspinal-node serve: watch folder {inbox} is not writable by this user: fix its permissions, "
        f"or under systemd add ReadWritePaths={inbox} with `systemctl edit paraspinal-node`"
    )


def test_a_file_that_cannot_be_removed_is_announced_once_and_logged_once(
    inbox: Inbox, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="node")
    stuck_folder = inbox.dir / PATIENT_FOLDER
    stuck_folder.mkdir()
    (stuck,) = write_ct_series(tmp_path / "first", 1)
    shutil.copy(stuck, stuck_folder / "IM0001")
    (later,) = write_ct_series(tmp_path / "second", 1)

    with read_only(stuck_folder):  # it can be read and spooled, but not removed
        inbox.watcher.start()
        assert inbox.listener.wait_released(1) == ["watch:0"]  # a stuck file does not hold the batch
        shutil.copy(later, inbox.dir / "later.dcm")
        inbox.listener.wait_released(2)  # the stuck file has been seen by several passes since
        assert (stuck_folder / "IM0001").exists()

    assert [i.path.read_bytes() for i in inbox.listener.instances] == [stuck.read_bytes(), later.read_bytes()]
    failures = [r.getMessage() for r in caplog.records if "event=watch_file_failed" in r.getMessage()]
    assert len(failures) == 1
    assert PATIENT_FOLDER not in caplog.text


def test_names_of_dropped_folders_never_reach_the_log(
    inbox: Inbox, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="node")
    staging = tmp_path / "staging" / PATIENT_FOLDER
    (good,) = write_ct_series(staging, 1)
    good.rename(staging / "IM0001")
    (staging / "IM0002").write_text("not an image")
    inbox.watcher.start()

    shutil.move(staging, inbox.dir / PATIENT_FOLDER)

    inbox.listener.wait_released(1)
    assert "not a DICOM" in (inbox.rejected / PATIENT_FOLDER / "IM0002.reason.txt").read_text()
    assert "event=watch_file_rejected" in caplog.text and "event=instance_stored" in caplog.text
    assert PATIENT_FOLDER not in caplog.text


def test_fifo_and_socket_are_rejected_without_blocking_and_later_drops_still_arrive(inbox: Inbox,
                                                                                    tmp_path: Path) -> None:
    os.mkfifo(inbox.dir / "x")
    with contextlib.closing(socket.socket(socket.AF_UNIX)) as unix:
        unix.bind(str(inbox.dir / "s"))
        inbox.watcher.start()
        wait_until(lambda: len(list(inbox.rejected.glob("*.reason.txt"))) == 2, "FIFO and socket rejected", WAIT_S)
    reasons = {p.name: p.read_text() for p in inbox.rejected.glob("*.reason.txt")}
    assert "not a regular file (FIFO)" in reasons["x.reason.txt"]
    assert "not a regular file (socket)" in reasons["s.reason.txt"]
    write_ct_series(tmp_path / "staging", 2)
    shutil.move(tmp_path / "staging", inbox.dir / "study")
    inbox.listener.wait_released(1)
    assert len(inbox.spooled()) == 2


def test_sparse_and_oversized_files_are_rejected_before_being_read(tmp_path: Path) -> None:
    box = Inbox(tmp_path, watch_max_file_mb=1)
    box.dir.mkdir()
    with (box.dir / "a.dcm").open("wb") as sparse:
        sparse.truncate(4 << 30)  # 4 GiB that takes no disk space
    (box.dir / "big.dcm").write_bytes(os.urandom(2 << 20))
    box.watcher.start()
    try:
        wait_until(lambda: len(list(box.rejected.glob("*.reason.txt"))) == 2, "both rejected", WAIT_S)
    finally:
        box.watcher.stop()
    assert "sparse file" in (box.rejected / "a.dcm.reason.txt").read_text()
    assert "over receiver.watch_max_file_mb (1)" in (box.rejected / "big.dcm.reason.txt").read_text()


def test_a_writer_that_pauses_longer_than_the_stable_period_is_waited_for(inbox: Inbox, tmp_path: Path) -> None:
    (source,) = write_ct_series(tmp_path / "staging", 1)
    raw = source.read_bytes()
    inbox.watcher.start()
    with (inbox.dir / "slow.dcm").open("wb") as handle:
        handle.write(raw[: len(raw) // 2])
        handle.flush()
        time.sleep(STABLE_S * 4)  # the writer stalls (a slow network share) with the file open
        assert inbox.listener.instances == [] and list(inbox.rejected.iterdir()) == []
        handle.write(raw[len(raw) // 2:])
    inbox.listener.wait_released(1)
    (spooled,) = inbox.spooled()
    assert spooled.read_bytes() == raw


def test_a_rejected_file_with_a_250_character_name_keeps_its_reason(inbox: Inbox) -> None:
    name = "n" * 246 + ".txt"
    (inbox.dir / name).write_text("not an image")
    inbox.watcher.start()
    wait_until(lambda: list(inbox.rejected.glob("*.reason.txt")), "the reason written", WAIT_S)
    (reason,) = inbox.rejected.glob("*.reason.txt")
    assert len(reason.name.encode()) <= 255 and "not a DICOM" in reason.read_text()
    assert (inbox.rejected / name).read_text() == "not an image"


def test_a_stable_file_waits_for_its_close_unless_it_stays_unclosed_for_long() -> None:
    tracker = StabilityTracker(stable_s=2, unclosed_s=60)
    path = Path("inbox/a.dcm")
    assert tracker.observe({path: (100, 1)}, 0.0) == []
    assert tracker.observe({path: (100, 1)}, 5.0, writing={path}) == []  # stable, but its writer still has it open
    assert tracker.observe({path: (100, 1)}, 5.0) == [path]  # closed (or never seen written)
    assert tracker.observe({path: (100, 1)}, 61.0, writing={path}) == [path]  # the close event never came


def test_an_mtime_set_back_after_the_close_only_restarts_the_stable_period() -> None:
    tracker = StabilityTracker(stable_s=2, unclosed_s=60)
    path = Path("inbox/a.dcm")
    assert tracker.observe({path: (100, 5_000)}, 0.0) == []
    assert tracker.observe({path: (100, 1_000)}, 1.0) == []  # cp -p: the source's older mtime, after the close
    assert tracker.observe({path: (100, 1_000)}, 2.5) == []
    assert tracker.observe({path: (100, 1_000)}, 3.0) == [path]


SERIES_FILES = 136  # one chest CT series as exported, as in the report of issue 22
EXPORTED_AT = time.time() - 86_400  # the exporter wrote the files yesterday: -p, -a and tar set that mtime back


def exported_series(folder: Path, count: int = SERIES_FILES, seed: int = 0) -> list[Path]:
    """A series as an exporter leaves it: files (and their folder) last changed a day ago."""
    files = write_ct_series(folder, count, size=512, seed=seed)
    for path in (*files, folder):
        os.utime(path, (EXPORTED_AT, EXPORTED_AT))
    return files


def copy_folder(tool: str, source: Path, inbox: Path, tmp_path: Path) -> None:
    """Copy `source` into `inbox` with an everyday tool, as an operator would."""
    target = inbox / source.name
    commands = {"cp -r": ["cp", "-r"], "cp -p": ["cp", "-r", "-p"], "cp -a": ["cp", "-a"]}
    if tool in commands:
        subprocess.run([*commands[tool], str(source), str(target)], check=True, timeout=60)
    elif tool == "tar x":
        archive = tmp_path / f"{source.name}.tar"
        subprocess.run(["tar", "-cf", str(archive), "-C", str(source.parent), source.name], check=True, timeout=60)
        subprocess.run(["tar", "-xf", str(archive), "-C", str(inbox)], check=True, timeout=60)
    else:
        shutil.copytree(source, target)


@pytest.mark.parametrize("tool", ["cp -r", "cp -p", "tar x", "cp -a", "shutil.copytree"])
def test_every_copy_tool_is_read_in_full_within_the_stable_period_and_five_seconds(inbox: Inbox, tmp_path: Path,
                                                                                   tool: str) -> None:
    files = exported_series(tmp_path / "export" / "series1")
    expected = {p.read_bytes() for p in files}
    inbox.watcher.start()

    copy_folder(tool, files[0].parent, inbox.dir, tmp_path)

    assert inbox.listener.wait_released(1, timeout_s=STABLE_S + 5) == ["watch:0"]
    assert {p.read_bytes() for p in inbox.spooled()} == expected
    assert list(inbox.rejected.iterdir()) == []


def test_a_file_whose_mtime_is_set_back_after_its_close_is_read(inbox: Inbox, tmp_path: Path) -> None:
    (source,) = write_ct_series(tmp_path / "staging", 1)
    raw = source.read_bytes()
    inbox.watcher.start()
    target = inbox.dir / "IM0001"
    target.write_bytes(raw)  # written and closed ...
    time.sleep(STABLE_S / 2)  # (the close event is handled meanwhile)
    os.utime(target, (EXPORTED_AT, EXPORTED_AT))  # ... then given the source's mtime, as copy2 and unzip do

    inbox.listener.wait_released(1, timeout_s=STABLE_S + 5)
    assert [p.read_bytes() for p in inbox.spooled()] == [raw]


def test_five_folders_copied_two_seconds_apart_complete_five_series(tmp_path: Path) -> None:
    box = Inbox(tmp_path)
    box.dir.mkdir()
    state = State(tmp_path / "state.sqlite")
    tracker = SeriesTracker(box.spool, state, CompletionConfig(release_quiet_s=0.5, idle_quiet_s=600),
                            SelectionConfig(min_slices=1))
    box.watcher = Watcher(box.watcher.config, box.spool, tracker)
    sources = [exported_series(tmp_path / "export" / f"study{n}", seed=n)[0].parent for n in range(5)]
    box.watcher.start()
    try:
        for n, source in enumerate(sources):
            if n:
                time.sleep(2)
            copy_folder("cp -r", source, box.dir, tmp_path)
        jobs: list[int] = []
        deadline = time.monotonic() + STABLE_S + 5 + 0.5  # read in full, then the series' release period
        while len(jobs) < 5 and time.monotonic() < deadline:
            jobs += tracker.tick()
            time.sleep(0.1)
    finally:
        box.watcher.stop()
        state.close()
    assert len(jobs) == 5
    assert len(box.spooled()) == 5 * SERIES_FILES


def test_images_the_node_cannot_read_are_rejected_with_the_receivers_reasons(inbox: Inbox, tmp_path: Path) -> None:
    (good,) = write_ct_series(tmp_path / "staging", 1)
    raw = good.read_bytes()
    pixel_data = raw.index(struct.pack("<HH", 0x7FE0, 0x0010))
    nested = (struct.pack("<HH2s2xL", 0x0040, 0xA730, b"SQ", 0xFFFFFFFF) + struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF))
    ends = struct.pack("<HHL", 0xFFFE, 0xE00D, 0) + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    (inbox.dir / "deep.dcm").write_bytes(raw[:pixel_data] + nested * 5000 + ends * 5000 + raw[pixel_data:])
    (inbox.dir / "syntax.dcm").write_bytes(raw.replace(b"1.2.840.10008.1.2.1\x00", b"1.2.3.4.5.6.7.8.9.1\x00"))
    frames = ct_dataset(generate_uid(), generate_uid(), 0, size=16)
    frames.NumberOfFrames, frames.PixelData = 2, bytes(2 * 16 * 16 * 2)
    frames.save_as(inbox.dir / "frames.dcm", enforce_file_format=True)

    inbox.watcher.start()

    wait_until(lambda: len(list(inbox.rejected.glob("*.reason.txt"))) == 3, "all three rejected", WAIT_S)
    reasons = {p.name.removesuffix(".reason.txt"): p.read_text().strip() for p in inbox.rejected.glob("*.reason.txt")}
    assert reasons == {
        "deep.dcm": "sequences nested over 32 deep",
        "syntax.dcm": "file meta TransferSyntaxUID '1.2.3.4.5.6.7.8.9.1' is no transfer syntax: re-export the file",
        "frames.dcm": "CT image with NumberOfFrames 2: classic is 1 frame",
    }
    assert inbox.spooled() == []
