"""Watch folder: DICOM files or folders dropped into an inbox take the same path as received instances.

A file is read only after its size and mtime have stayed unchanged for `watch_stable_s`, so a
copy in progress is never spooled half-written; names starting with "." are skipped (the
temp-file convention of rsync and most copy tools). A file leaves the inbox only after it is
in the spool (then it is deleted) or in the rejected folder with `<name>.reason.txt` beside it.
Everything processed while the inbox had unsettled files is one batch ("watch:<n>"); the
listener hears `association_released` when the inbox has settled, as after an association.
watchdog events only wake the loop early: it also rescans periodically, so a missed event
(inotify overflow, network file systems) delays a file but never loses it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import pydicom

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from .config import ReceiverConfig
from .receiver import CT_IMAGE_STORAGE
from .spool import Receipt, Spool, SpoolError, SpoolListener, read_header

log = logging.getLogger(__name__)

CALLING_AE = "WATCH"
_SEQUENCE_DELIMITER = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
RESCAN_S = 30.0


@dataclass
class _Seen:
    size: int
    mtime_ns: int
    unchanged_since: float


class StabilityTracker:
    """Decides which files have stopped changing (pure: the caller supplies stats and the clock)."""

    def __init__(self, stable_s: float) -> None:
        self.stable_s = stable_s
        self._seen: dict[Path, _Seen] = {}

    def observe(self, stats: dict[Path, tuple[int, int]], now: float) -> list[Path]:
        """Record the current (size, mtime_ns) of every file; return those stable for `stable_s`."""
        self._seen = {path: self._update(path, stat, now) for path, stat in stats.items()}
        return sorted(p for p, seen in self._seen.items() if now - seen.unchanged_since >= self.stable_s)

    def forget(self, path: Path) -> None:
        self._seen.pop(path, None)

    @property
    def pending(self) -> int:
        return len(self._seen)

    def _update(self, path: Path, stat: tuple[int, int], now: float) -> _Seen:
        previous = self._seen.get(path)
        if previous is not None and (previous.size, previous.mtime_ns) == stat:
            return previous
        return _Seen(stat[0], stat[1], now)


class Watcher:
    """Runs the inbox loop in a background thread; `start()`/`stop()` like the Receiver."""

    def __init__(self, config: ReceiverConfig, spool: Spool, listener: SpoolListener) -> None:
        if config.watch_dir is None:
            raise ValueError("receiver.watch_dir is not set: set it to the inbox folder to enable the watch folder")
        self.inbox = Path(config.watch_dir)
        self.rejected = Path(config.watch_rejected_dir or f"{self.inbox}-rejected")
        self.config = config
        self.spool = spool
        self.listener = listener
        self._tracker = StabilityTracker(config.watch_stable_s)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._observer: Observer | None = None
        self._batch = 0
        self._batch_files = 0
        self._paused = ""

    def start(self) -> None:
        self.inbox.mkdir(parents=True, exist_ok=True)
        self.rejected.mkdir(parents=True, exist_ok=True)
        self._observer = Observer()
        self._observer.schedule(_Wake(self._wake), str(self.inbox), recursive=True)
        self._observer.start()
        self._thread = threading.Thread(target=self._run, name="watch-folder", daemon=True)
        self._thread.start()
        log.info("event=watch_started inbox=%s rejected=%s stable_s=%s", self.inbox, self.rejected, self.config.watch_stable_s)

    def stop(self) -> None:
        """Stop after the file being processed (if any); unsettled files stay in the inbox."""
        self._stop.set()
        self._wake.set()
        if self._observer is not None:
            self._observer.stop()
            self._observer.join()
        if self._thread is not None:
            self._thread.join()
        log.info("event=watch_stopped inbox=%s", self.inbox)

    def _run(self) -> None:
        tick = max(0.05, min(0.5, self.config.watch_stable_s / 4))
        while not self._stop.is_set():
            busy = True
            try:
                busy = self._pass()
            except Exception:  # keep watching: a bad pass must not end the watch folder for good
                log.exception("event=watch_pass_failed inbox=%s", self.inbox)
            self._wake.wait(tick if busy else RESCAN_S)
            self._wake.clear()

    def _pass(self) -> bool:
        """One pass: spool or reject every stable file; returns whether work is left for soon."""
        ready = self._tracker.observe(self._scan(), time.monotonic())
        for path in ready:
            if self._stop.is_set():
                break
            if self.spool.free_disk_mb() < self.config.min_free_disk_mb:
                self._pause("spool disk below receiver.min_free_disk_mb: free disk space")
                break
            self._paused = ""
            self._batch_files += self._process(path)
        if self._batch_files and self._tracker.pending == 0:
            self._release_batch()
        return self._remove_empty_folders() or self._tracker.pending > 0

    def _pause(self, reason: str) -> None:
        """Log a pause once, not on every pass."""
        if reason != self._paused:
            log.error("event=watch_paused inbox=%s reason=%s", self.inbox, reason)
        self._paused = reason

    def _scan(self) -> dict[Path, tuple[int, int]]:
        stats = {}
        for folder, dirs, names in os.walk(self.inbox):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            for name in names:
                if name.startswith("."):
                    continue
                path = Path(folder) / name
                try:
                    stat = path.stat()
                except FileNotFoundError:
                    continue
                stats[path] = (stat.st_size, stat.st_mtime_ns)
        return stats

    def _process(self, path: Path) -> bool:
        """Spool, reject or (on a transient error) leave one file; True if it was spooled."""
        try:
            before = path.stat()
            raw = path.read_bytes()
            after = path.stat()
        except FileNotFoundError:  # taken away by someone else meanwhile
            self._tracker.forget(path)
            return False
        if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
            return False  # changed while read: the tracker sees the change on the next pass
        try:
            header = read_header(raw)
            if str(header.SOPClassUID) != CT_IMAGE_STORAGE:
                raise SpoolError(f"SOP class {header.SOPClassUID} is not CT Image Storage: only CT series are measured")
            check_complete(raw)
            instance = self.spool.store(raw, Receipt(self._batch_id(), CALLING_AE, time.time()))
            self.listener.instance_stored(instance)
        except SpoolError as exc:
            self._reject(path, str(exc))
            return False
        except Exception:  # disk or state trouble: keep the file and try again on the next pass
            log.exception("event=watch_file_failed file=%s", path.relative_to(self.inbox))
            return False
        path.unlink()
        self._tracker.forget(path)
        log.debug(
            "event=instance_stored association=%s series=%s sop=%s",
            instance.association_id, instance.series_uid, instance.sop_instance_uid,
        )
        return True

    def _reject(self, path: Path, reason: str) -> None:
        relative = path.relative_to(self.inbox)
        target = _free_name(self.rejected / relative)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)
        target.with_name(f"{target.name}.reason.txt").write_text(reason + "\n", encoding="utf-8")
        self._tracker.forget(path)
        log.warning("event=watch_file_rejected file=%s moved_to=%s reason=%s", relative, target, reason)

    def _batch_id(self) -> str:
        return f"watch:{self._batch}"

    def _release_batch(self) -> None:
        log.info("event=watch_batch_done association=%s files=%d", self._batch_id(), self._batch_files)
        self.listener.association_released(self._batch_id())
        self._batch += 1
        self._batch_files = 0

    def _remove_empty_folders(self) -> bool:
        """Remove dropped folders once emptied (never the inbox itself, never one just created).

        Returns whether an empty folder was left for later because it changed too recently.
        """
        if self._tracker.pending:
            return False
        left = False
        settled_before = time.time() - self.config.watch_stable_s
        for folder, _, _ in sorted(os.walk(self.inbox), key=lambda entry: -len(entry[0])):
            path = Path(folder)
            with contextlib.suppress(OSError):  # refilled or removed meanwhile: leave it to the next pass
                if path == self.inbox or os.listdir(path):
                    continue
                if path.stat().st_mtime < settled_before:
                    path.rmdir()
                else:
                    left = True
        return left


class _Wake(FileSystemEventHandler):
    """Any change in the inbox wakes the loop early."""

    def __init__(self, wake: threading.Event) -> None:
        self._wake = wake

    def on_any_event(self, event: FileSystemEvent) -> None:
        self._wake.set()


def check_complete(raw: bytes) -> None:
    """Refuse a CT file whose pixel data is missing or cut short (pydicom reads truncated files silently)."""
    try:
        dataset = pydicom.dcmread(BytesIO(raw))
    except Exception as exc:  # any parse failure means the file cannot be measured
        raise SpoolError(f"unreadable DICOM file: {exc}") from None
    if "PixelData" not in dataset:
        raise SpoolError("CT image has no pixel data: export the images, not only their headers")
    if dataset.file_meta.TransferSyntaxUID.is_encapsulated:
        if not raw.endswith(_SEQUENCE_DELIMITER):
            raise SpoolError("compressed pixel data is cut short (no sequence delimiter at the end): copy the file again")
        return
    try:
        frames = int(dataset.get("NumberOfFrames", 1) or 1)
        expected = dataset.Rows * dataset.Columns * dataset.SamplesPerPixel * frames * dataset.BitsAllocated // 8
    except (AttributeError, TypeError, ValueError):
        raise SpoolError("image pixel module incomplete (Rows, Columns, SamplesPerPixel, BitsAllocated)") from None
    if len(dataset.PixelData) < expected:
        raise SpoolError(f"pixel data is cut short ({len(dataset.PixelData)} of {expected} bytes): copy the file again")


def _free_name(path: Path) -> Path:
    """`path`, or `path.1`, `path.2`, … so a rejected file never overwrites an earlier one."""
    candidate, n = path, 0
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}.{n}")
    return candidate
