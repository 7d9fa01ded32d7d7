"""Operations: a full disk pauses a worker with one line, and a worker that cannot be spawned does not stop serve."""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import wait_until

from node.config import Config
from node.errors import InputError
from node.service.supervisor import WorkerSupervisor
from node.service.worker import Worker
from node.state.store import JobStatus, SeriesRecord, State


@contextlib.contextmanager
def small_disk(folder: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs: a real full disk (needs root; skipped elsewhere)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small filesystem needs root")
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(folder)], check=False).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def fill(folder: Path) -> Path:
    filler = folder / "filler"
    with filler.open("wb") as out, contextlib.suppress(OSError):
        while True:
            out.write(bytes(1 << 16))
    return filler


def test_a_full_disk_pauses_the_worker_with_one_line_and_it_resumes(tmp_path: Path, caplog) -> None:
    with small_disk(tmp_path / "disk") as disk:
        config = Config()
        config.storage.state_dir = disk
        config.segmenter.backend = "precomputed"
        config.worker.poll_s = 0.02
        state = State(disk / "state.sqlite")
        state.record_series(SeriesRecord("1.2.3", "1.2", "P", "A", "20240101", "CT", "", 1, "f", str(disk)))
        job = state.add_job("1.2.3", "f", str(disk))
        ran = threading.Event()

        def pipeline(ct: Path, out: Path, cfg: Config):
            ran.set()
            raise InputError("the test's pipeline refuses every series")

        filler = fill(disk)
        stop = threading.Event()
        worker = Worker(config, state, "host:1:0", pipeline=pipeline)
        thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
        with caplog.at_level(logging.INFO, logger="node.service.worker"):
            thread.start()
            wait_until(lambda: any("event=worker_paused" in m for m in caplog.messages), "the pause logged", 30)
            time.sleep(0.5)  # several more tries while the disk stays full
            assert thread.is_alive() and not ran.is_set()
            filler.unlink()
            wait_until(ran.is_set, "the job run once there is room", 60)
            stop.set()
            thread.join(timeout=30)
        paused = [m for m in caplog.messages if "event=worker_paused" in m]
        assert len(paused) == 1 and "disk is full" in paused[0]
        assert any("event=worker_resumed" in m for m in caplog.messages)
        assert state.get_job(job.id).status is JobStatus.FAILED
        state.close()


def test_a_worker_that_cannot_be_spawned_is_logged_once_and_retried(tmp_path: Path, monkeypatch, caplog) -> None:
    state = State(tmp_path / "state.sqlite")
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-such-python"))
    supervisor = WorkerSupervisor(None, 1, state)
    with caplog.at_level(logging.ERROR, logger="node.service.supervisor"):
        supervisor.check()
        supervisor.check()  # within the back-off: not tried, not logged again
    failures = [m for m in caplog.messages if "event=worker_spawn_failed" in m]
    assert len(failures) == 1 and "retry_in_s=1" in failures[0]
    supervisor.stop(grace_s=1)
    state.close()
