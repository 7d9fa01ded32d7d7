"""Watch folder: DICOM files or folders dropped into an inbox take the same path as received instances.

A file is read once its size and mtime have stayed unchanged for `watch_stable_s` and, with
`watch_close_write` (inotify), no writer still has it open: a file whose content was written
(IN_MODIFY, or created empty) counts as open until its writer closes it (IN_CLOSE_WRITE) or it is
renamed in. Changes of times or permissions after the close (`cp -p`, `cp -a`, `tar x`, `unzip`,
`shutil.copy2` set the source's mtime back) only restart the stable period. A file no event was ever
seen for (there at start, in a folder moved in, events lost) is read by stability alone, so neither
a copy in progress nor a slow writer that pauses is spooled half-written, and a lost event costs
`watch_stable_s`, not `UNCLOSED_S` (the wait for a file still open and unchanged that long).
Records are kept until the file is gone, whatever a scan saw, so one closed after its folder was
listed is never forgotten. The rule is re-evaluated on every pass.
Names starting with "." are skipped (the temp-file convention of rsync and most copy tools).
Only regular files are read: a FIFO, socket, device or symlink is moved aside with a reason and
never opened, and a file over `watch_max_file_mb` or sparse is rejected before it is read. A file leaves the inbox only after it is
in the spool (then it is deleted) or in the rejected folder with `<name>.reason.txt` beside it.
A file that fails for another reason (permissions, disk) stays and is tried again `RETRY_S` later,
logged once; the listener hears of each instance once, never again for an identical copy.
Logs name a file by its SOP Instance UID, or a hash of its path: exporters name folders after patients.
Everything processed while the inbox had files still being written is one batch ("watch:<n>"); the
listener hears `association_released` when the inbox has settled, as after an association.
watchdog events only wake the loop early: it also rescans periodically, so a missed event
(inotify overflow, network file systems) delays a file but never loses it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import stat
import threading
import time
from collections.abc import Collection
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import pydicom
from watchdog.events import (
    DirDeletedEvent,
    DirMovedEvent,
    EventsLostEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer

from node.config import ConfigError, ReceiverConfig
from node.ingest.dataset import DataSetProblem, check_pixel_module
from node.ingest.dicom import CT_IMAGE_STORAGE
from node.ingest.spool import Receipt, Spool, SpooledInstance, SpoolError, SpoolListener, StoreOutcome, read_header

log = logging.getLogger(__name__)

CALLING_AE = "WATCH"
_SEQUENCE_DELIMITER = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
RESCAN_S = 30.0
RETRY_S = 60.0  # a file that failed for a reason other than its content waits this long before the next try
UNCLOSED_S = 600.0  # a file never seen closed (events lost, network filesystem) is read after this long unchanged
_SPARSE_RATIO = 8  # a file with less than 1/8 of its size on disk is sparse: never a real export
_SPARSE_MIN_BYTES = 1 << 20
NAME_MAX = 255  # bytes in one file name (Linux and most filesystems)
_REASON_SUFFIX = ".reason.txt"
Stat = tuple[int, int]  # (size, mtime_ns)


class WatchFolderError(ConfigError):
    """The inbox or rejected folder is unusable; a ConfigError so `serve` ends with this one line."""


@dataclass(frozen=True)
class _Retry:
    at: float
    announced: bool  # the listener already heard of this file's instance


@dataclass
class _Seen:
    size: int
    mtime_ns: int
    unchanged_since: float


class StabilityTracker:
    """Decides which files are complete (pure: the caller supplies stats, the files open for writing and the clock)."""

    def __init__(self, stable_s: float, unclosed_s: float = UNCLOSED_S) -> None:
        self.stable_s = stable_s
        self.unclosed_s = unclosed_s
        self._seen: dict[Path, _Seen] = {}

    def observe(self, stats: dict[Path, Stat], now: float, writing: Collection[Path] = ()) -> list[Path]:
        """Record the current (size, mtime_ns) of every file; return those complete.

        Complete: unchanged for `stable_s` and not in `writing` (written and not closed since), or
        unchanged for `unclosed_s` whatever the events said (a close event lost).
        """
        self._seen = {path: self._update(path, stat, now) for path, stat in stats.items()}
        return sorted(p for p, seen in self._seen.items() if self._ready(now - seen.unchanged_since, p in writing))

    def _ready(self, quiet: float, open_for_writing: bool) -> bool:
        return quiet >= self.stable_s and (not open_for_writing or quiet >= self.unclosed_s)

    def forget(self, path: Path) -> None:
        self._seen.pop(path, None)

    @property
    def pending(self) -> int:
        return len(self._seen)

    def _update(self, path: Path, stat: Stat, now: float) -> _Seen:
        previous = self._seen.get(path)
        if previous is not None and (previous.size, previous.mtime_ns) == stat:
            return previous
        return _Seen(stat[0], stat[1], now)


class WriteRecords:
    """The files a writer has written and not yet closed, from inotify events; fed by watchdog's thread.

    A record is dropped only when its file is closed, renamed or deleted, or (`open_files`) when a scan
    that started after the record no longer finds the file: never because a scan that started before
    the file appeared missed it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: dict[Path, float] = {}  # path -> when the write was seen (monotonic)

    def written(self, path: Path) -> None:
        with self._lock:
            self._open[path] = time.monotonic()

    def created(self, path: Path) -> None:
        """A new empty file is about to be written; one with content was moved in or written before we looked."""
        with contextlib.suppress(OSError):
            if os.lstat(path).st_size == 0:
                self.written(path)

    def closed(self, path: Path) -> None:
        with self._lock:
            self._open.pop(path, None)

    def closed_tree(self, folder: Path) -> None:
        """Forget everything under a folder renamed or deleted: nothing is written at those paths any more."""
        with self._lock:
            self._open = {p: t for p, t in self._open.items() if not p.is_relative_to(folder)}

    def lost(self) -> None:
        """Events were dropped (inotify overflow): no record can be trusted, stability alone decides."""
        with self._lock:
            self._open.clear()

    def open_files(self, present: Collection[Path], scan_started: float) -> set[Path]:
        """The files open for writing; records of files a scan begun after them did not find are dropped."""
        with self._lock:
            self._open = {p: t for p, t in self._open.items() if p in present or t >= scan_started}
            return set(self._open)


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
        self._writes = WriteRecords() if config.watch_close_write else None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._observer: Observer | None = None
        self._batch = 0
        self._batch_files = 0
        self._paused = ""
        self._retries: dict[Path, _Retry] = {}

    def start(self) -> None:
        _require_writable(self.inbox, "watch folder")
        _require_writable(self.rejected, "watch rejected folder")
        self._observer = Observer()
        if self._writes is not None and type(self._observer).__name__ != "InotifyObserver":
            log.warning("event=watch_close_write_unavailable observer=%s reason=%s", type(self._observer).__name__,
                        "no close-write events here: files are read by receiver.watch_stable_s alone")
            self._writes = None
        self._observer.schedule(_Wake(self._wake, self._writes), str(self.inbox), recursive=True)
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
        now = time.monotonic()
        stats, others = self._scan()
        self._retries = {path: retry for path, retry in self._retries.items() if path in stats or path in others}
        for path, reason in others.items():
            if path not in self._retries or self._retries[path].at <= now:
                self._reject(path, _path_label(path.relative_to(self.inbox)), reason)
        writing = self._writes.open_files(stats, now) if self._writes is not None else set()
        ready = [p for p in self._tracker.observe(stats, now, writing)
                 if p not in self._retries or self._retries[p].at <= now]
        for path in ready:
            if self._stop.is_set():
                break
            if self.spool.free_disk_mb() < self.config.min_free_disk_mb:
                self._pause("spool disk below receiver.min_free_disk_mb: free disk space")
                break
            self._paused = ""
            self._batch_files += self._process(path)
        unsettled = self._tracker.pending - len(self._retries)  # files waiting for a retry do not hold the batch
        if self._batch_files and unsettled == 0:
            self._release_batch()
        return self._remove_empty_folders() or unsettled > 0

    def _pause(self, reason: str) -> None:
        """Log a pause once, not on every pass."""
        if reason != self._paused:
            log.error("event=watch_paused inbox=%s reason=%s", self.inbox, reason)
        self._paused = reason

    def _scan(self) -> tuple[dict[Path, Stat], dict[Path, str]]:
        """(size, mtime) of every regular file; and every other kind of entry with why it is refused.

        lstat only: nothing is opened here, so a FIFO cannot block the loop.
        """
        stats, others = {}, {}
        for folder, dirs, names in os.walk(self.inbox):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            for name in names:
                if name.startswith("."):
                    continue
                path = Path(folder) / name
                try:
                    info = os.lstat(path)
                except OSError:  # removed meanwhile, or not ours to read
                    continue
                if stat.S_ISREG(info.st_mode):
                    stats[path] = (info.st_size, info.st_mtime_ns)
                else:
                    others[path] = f"not a regular file ({_kind(info.st_mode)}): drop DICOM files, not {_kind(info.st_mode)}s"
        return stats, others

    def _process(self, path: Path) -> bool:
        """Spool, reject or (on a non-input error) keep one file for a retry; True if the listener heard of it."""
        label = _path_label(path.relative_to(self.inbox))
        retry = self._retries.get(path)
        heard = False
        try:
            raw = _read_unchanged(path, self.config.watch_max_file_mb)
            if raw is None:
                return False  # changed while read: the tracker sees the change on the next pass
            instance = self._store(raw)
            label = instance.sop_instance_uid
            if instance.outcome is not StoreOutcome.DUPLICATE or (retry is not None and not retry.announced):
                self.listener.instance_stored(instance)
                heard = True
            path.unlink()
        except FileNotFoundError:  # taken away by someone else meanwhile
            self._forget(path)
            return heard
        except SpoolError as exc:
            self._reject(path, label, str(exc))
            return False
        except Exception as exc:  # disk, permissions or state trouble: keep the file and try again later
            self._retry_later(path, label, exc, announced=heard or (retry is not None and retry.announced))
            return heard
        self._forget(path)
        log.debug("event=instance_stored association=%s series=%s sop=%s outcome=%s",
                  instance.association_id, instance.series_uid, instance.sop_instance_uid, instance.outcome.value)
        return heard

    def _store(self, raw: bytes) -> SpooledInstance:
        header = read_header(raw)
        if str(header.SOPClassUID) != CT_IMAGE_STORAGE:
            raise SpoolError(f"SOP class {header.SOPClassUID} is not CT Image Storage: only CT series are measured")
        check_complete(raw)
        return self.spool.store_parts([raw], header, Receipt(self._batch_id(), CALLING_AE, time.time()))

    def _reject(self, path: Path, label: str, reason: str) -> None:
        """Move the file aside with its reason beside it (the reason file may name the patient: it is on disk)."""
        target = _free_name(self.rejected / path.relative_to(self.inbox))
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
            target.with_name(fit_name(target.name, _REASON_SUFFIX)).write_text(reason + "\n", encoding="utf-8")
        except OSError as exc:
            self._retry_later(path, label, exc, announced=False)
            return
        self._forget(path)
        log.warning("event=watch_file_rejected file=%s reason=%s", label, reason)

    def _retry_later(self, path: Path, label: str, exc: Exception, announced: bool) -> None:
        """Back off, and log only the first failure: a stuck file must not flood the log every pass."""
        if path not in self._retries:
            log.error("event=watch_file_failed file=%s retry_in_s=%.0f error=%s", label, RETRY_S, _describe(exc))
        self._retries[path] = _Retry(time.monotonic() + RETRY_S, announced)

    def _forget(self, path: Path) -> None:
        self._tracker.forget(path)
        self._retries.pop(path, None)

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
    """Any change in the inbox wakes the loop early; writes, closes, renames and deletions are recorded."""

    def __init__(self, wake: threading.Event, writes: WriteRecords | None) -> None:
        self._wake = wake
        self._writes = writes

    def on_any_event(self, event: FileSystemEvent) -> None:
        if self._writes is not None:
            _record(self._writes, event)
        self._wake.set()


def _record(writes: WriteRecords, event: FileSystemEvent) -> None:
    """Keep `writes` up to date with one event (a change of times or permissions is not a write)."""
    path = Path(os.fsdecode(event.src_path))
    if isinstance(event, FileModifiedEvent):
        writes.written(path)
    elif isinstance(event, FileCreatedEvent):
        writes.created(path)
    elif isinstance(event, (FileClosedEvent, FileDeletedEvent)):
        writes.closed(path)
    elif isinstance(event, FileMovedEvent):  # rsync and mv finish with a rename: written and closed
        writes.closed(path)
        writes.closed(Path(os.fsdecode(event.dest_path)))
    elif isinstance(event, (DirMovedEvent, DirDeletedEvent)):
        writes.closed_tree(path)
    elif isinstance(event, EventsLostEvent):
        writes.lost()


def check_complete(raw: bytes) -> None:
    """Refuse a CT file whose pixel data is missing or cut short (pydicom reads truncated files silently)."""
    try:
        dataset = pydicom.dcmread(BytesIO(raw))
    except Exception as exc:  # any parse failure means the file cannot be measured
        raise SpoolError(f"unreadable DICOM file: {exc}") from None
    if "PixelData" not in dataset:
        raise SpoolError("CT image has no pixel data: export the images, not only their headers")
    try:
        check_pixel_module(dataset)
    except DataSetProblem as exc:
        raise SpoolError(str(exc)) from None
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


def _require_writable(folder: Path, role: str) -> None:
    """Refuse a folder files cannot leave: every pass would read, spool and announce them again, forever."""
    with contextlib.suppress(OSError):  # a folder that cannot be made is reported below
        folder.mkdir(parents=True, exist_ok=True)
    if not (folder.is_dir() and os.access(folder, os.W_OK | os.X_OK)):
        raise WatchFolderError(
            f"{role} {folder} is not writable by this user: fix its permissions, or under systemd add "
            f"ReadWritePaths={folder} with `systemctl edit paraspinal-node`"
        )


def _read_unchanged(path: Path, max_mb: int) -> bytes | None:
    """The file's bytes, or None when it changed while being read; SpoolError before reading anything
    that is not a regular file, is over `max_mb` or is sparse.

    Opened non-blocking and without following a symlink, so a FIFO swapped in after the scan cannot block.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    try:
        before = os.fstat(fd)
        _check_readable(before, max_mb)
        chunks, left = [], before.st_size + 1  # one byte more shows a file that grew
        while left > 0 and (chunk := os.read(fd, min(left, 1 << 20))):
            chunks.append(chunk)
            left -= len(chunk)
        after = os.fstat(fd)
    finally:
        os.close(fd)
    raw = b"".join(chunks)
    unchanged = (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    return raw if unchanged and len(raw) == before.st_size else None


def _check_readable(info: os.stat_result, max_mb: int) -> None:
    if not stat.S_ISREG(info.st_mode):
        kind = _kind(info.st_mode)
        raise SpoolError(f"not a regular file ({kind}): drop DICOM files, not {kind}s")
    allocated = info.st_blocks * 512
    if info.st_size >= _SPARSE_MIN_BYTES and allocated * _SPARSE_RATIO < info.st_size:
        raise SpoolError(f"sparse file ({allocated >> 10} KiB on disk for {info.st_size >> 10} KiB): "
                         "not an exported image; copy the real file")
    if info.st_size > max_mb << 20:
        raise SpoolError(f"{info.st_size >> 20} MB is over receiver.watch_max_file_mb ({max_mb}): "
                         "a single CT image is a few MB; raise the limit only for a real need")


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISLNK, "symlink"), (stat.S_ISDIR, "folder")):
        if test(mode):
            return name
    return "special file"


def fit_name(name: str, suffix: str) -> str:
    """`name + suffix`, shortened with a hash of the name when that would not fit in NAME_MAX bytes."""
    if len(os.fsencode(name + suffix)) <= NAME_MAX:
        return name + suffix
    digest = hashlib.sha256(os.fsencode(name)).hexdigest()[:12]
    room = NAME_MAX - len(os.fsencode(f"~{digest}{suffix}"))
    head = os.fsencode(name)[:room].decode("utf-8", "ignore") if room > 0 else ""
    return f"{head}~{digest}{suffix}"


def _path_label(relative: Path) -> str:
    """A stable name for a file in logs that cannot carry the patient name its folders may have."""
    return "path-" + hashlib.sha256(str(relative).encode()).hexdigest()[:12]


def _describe(exc: Exception) -> str:
    """The error without the file name an OSError's text would carry."""
    if isinstance(exc, OSError):
        return exc.strerror or type(exc).__name__
    return f"{type(exc).__name__}: {exc}"


def _free_name(path: Path) -> Path:
    """`path`, or `path.1`, `path.2`, … so a rejected file never overwrites an earlier one."""
    candidate, n = path, 0
    while candidate.exists() or candidate.is_symlink():
        n += 1
        candidate = path.with_name(fit_name(path.name, f".{n}"))
    return candidate
