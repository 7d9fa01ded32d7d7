"""Keeps N worker processes alive: restarts the dead ones, hands their jobs back, stops them on exit.

Workers run as separate processes so that a crash or a leak in the segmentation never takes the
receiver down, and so that nnU-Net (which starts its own processes with "spawn") has a normal
`__main__`. A worker that dies, or cannot be started at all, is restarted with a growing delay
(1 s up to 60 s) and its jobs are requeued at once instead of waiting for their leases to run out.
"""

from __future__ import annotations

import functools
import logging
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from node.process import die_with_parent
from node.service.ids import worker_id
from node.state.store import JobStore

log = logging.getLogger(__name__)

_MAX_RESTART_DELAY_S = 60.0


@dataclass
class _Slot:
    index: int
    process: subprocess.Popen | None = None
    started_at: float = 0.0
    restart_delay_s: float = 1.0
    restart_at: float = 0.0


class WorkerSupervisor:
    """Starts `paraspinal-node worker --index I` N times with the same config file."""

    def __init__(self, config_path: Path | None, count: int, store: JobStore) -> None:
        self._config_path = config_path
        self._store = store
        self._slots = [_Slot(index) for index in range(count)]

    def check(self) -> None:
        """Start missing workers and restart dead ones; call it often from one thread."""
        now = time.monotonic()
        for slot in self._slots:
            if slot.process is not None and slot.process.poll() is not None:
                self._reap(slot, now)
            if slot.process is None and now >= slot.restart_at:
                self._start(slot, now)

    def terminate(self) -> None:
        """SIGTERM every worker: each hands its running job back to the queue and exits."""
        for slot in self._slots:
            if slot.process is not None and slot.process.poll() is None:
                slot.process.terminate()

    def stop(self, grace_s: float = 30.0) -> None:
        """Terminate the workers and wait; SIGKILL (and requeue the jobs of) those still alive after `grace_s`."""
        self.terminate()
        deadline = time.monotonic() + grace_s
        for slot in self._slots:
            if slot.process is None:
                continue
            try:
                slot.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                slot.process.kill()
                slot.process.wait()
                self._store.requeue_owner(worker_id(slot.index, slot.process.pid))

    def _start(self, slot: _Slot, now: float) -> None:
        """Spawn one worker; a failed spawn (no memory, no executable) is logged once per try and retried later."""
        try:
            slot.process = self._spawn(slot.index)
        except OSError as exc:
            log.error("event=worker_spawn_failed index=%d retry_in_s=%.0f reason=%s", slot.index,
                      slot.restart_delay_s, exc.strerror or str(exc))
            self._back_off(slot, now)
            return
        slot.started_at = now

    def _back_off(self, slot: _Slot, now: float) -> None:
        slot.restart_at = now + slot.restart_delay_s
        slot.restart_delay_s = min(slot.restart_delay_s * 2, _MAX_RESTART_DELAY_S)

    def _reap(self, slot: _Slot, now: float) -> None:
        code = slot.process.returncode
        requeued = self._store.requeue_owner(worker_id(slot.index, slot.process.pid))
        log.error("event=worker_exited index=%d pid=%d code=%d jobs_requeued=%d restart_in_s=%.0f", slot.index,
                  slot.process.pid, code, requeued, slot.restart_delay_s)
        slot.process = None
        if now - slot.started_at > _MAX_RESTART_DELAY_S:
            slot.restart_delay_s = 1.0  # it had been running fine: not a crash loop
        self._back_off(slot, now)

    def _spawn(self, index: int) -> subprocess.Popen:
        command = [sys.executable, "-m", "node.cli.main", "worker", "--index", str(index)]
        if self._config_path is not None:
            command += ["--config", str(self._config_path)]
        process = subprocess.Popen(command, preexec_fn=functools.partial(die_with_parent, signal.SIGTERM))
        log.info("event=worker_spawned index=%d pid=%d", index, process.pid)
        return process


