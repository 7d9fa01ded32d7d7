"""What the status page, /metrics and /readyz show, gathered into typed snapshots.

Everything durable comes from the state database (workers in other processes report there,
including which model weights they miss: checking here would import TotalSegmentator into
`serve`); what only the running `serve` knows (is the receiver listening, its association
counts, free disk) comes through `Live`, which the Service fills in.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import dataclass

from node.config import Config
from node.errors import INSTALL_FIX
from node.ingest.counts import ReceiverTotals
from node.state.backfill import BackfillProgress
from node.state.store import DestinationTotals, HostThroughput, JobStatus, Lease, State, StateError, WorkerRecord

WORKER_STALE_S = 60.0  # a worker silent this long (heartbeat or lease renewal) is shown as lost
THROUGHPUT_WINDOW_S = 3600.0  # jobs per host are counted over the last hour


@dataclass(frozen=True)
class Live:
    """Views into the running parts of `serve`, wired by the Service."""

    receiver_listening: Callable[[], bool]
    free_disk_mb: Callable[[], int]
    receiver_totals: Callable[[], ReceiverTotals]


@dataclass(frozen=True)
class Check:
    """One readiness condition: what it is, whether it holds, and what was seen (or what to do)."""

    name: str
    ok: bool
    detail: str


@dataclass(frozen=True)
class WorkerView:
    record: WorkerRecord
    alive: bool  # reported or holds a live lease; otherwise lost (its host or process vanished)
    lease: Lease | None  # the job it runs now, under which token, until when
    restarts: int  # earlier processes in the same slot on the same host

    @property
    def job_id(self) -> int | None:
        return None if self.lease is None else self.lease.job_id


@dataclass(frozen=True)
class Overview:
    receiver_address: str
    ae_title: str
    receiver: ReceiverTotals
    jobs: dict[str, int]
    oldest_queued_age_s: float | None
    workers: list[WorkerView]
    hosts: list[HostThroughput]
    destinations: list[DestinationTotals]
    checks: list[Check]
    recent_errors: list[tuple[str, int, str]]
    segmenter: str
    device: str
    backfills: list[BackfillProgress]


def weights_missing(workers: list[WorkerView]) -> list[str]:
    """Model folders a live worker reports absent from its segmenter.weights_dir."""
    return sorted({name for view in workers if view.alive for name in view.record.report.weights_missing})


def _weights_check(config: Config, workers: list[WorkerView]) -> Check:
    if not any(view.alive for view in workers):
        return Check("weights", False, "unknown: no worker has reported in the last minute: check worker.count, or "
                                       "start `paraspinal-node worker`")
    missing = weights_missing(workers)
    if missing:
        return Check("weights", False, f"missing {', '.join(missing)}: {INSTALL_FIX}")
    return Check("weights", True, "not needed (precomputed segmentations)" if config.segmenter.backend == "precomputed"
                 else "present")


def readiness(config: Config, state: State, live: Live) -> list[Check]:
    """Ready: the receiver listens, the database takes writes, the disk is above the watermark, the weights are there."""
    receiver = config.receiver
    listening = live.receiver_listening()
    checks = [Check("receiver", listening, f"{'listening' if listening else 'not listening'} on "
                                           f"{receiver.bind_address}:{receiver.port}")]
    try:
        state.check_writable()
        checks.append(Check("database", True, "writable"))
    except (sqlite3.Error, StateError) as exc:
        checks.append(Check("database", False, f"cannot write {state.description} ({exc}): check the disk and "
                                               "the permissions of storage.state_dir, or the PostgreSQL server"))
    free = live.free_disk_mb()
    low = free < receiver.min_free_disk_mb
    checks.append(Check("disk", not low, f"{free} MB free, watermark receiver.min_free_disk_mb = {receiver.min_free_disk_mb} MB"
                                         + (": free space or the receiver refuses images" if low else "")))
    checks.append(_weights_check(config, worker_views(state, state.now())))
    return checks


def worker_views(state: State, now: float) -> list[WorkerView]:
    """The latest process of each worker slot, alive when it reported or renewed a lease recently."""
    leases = state.leases()
    latest: dict[tuple[str, int], WorkerRecord] = {}
    starts: dict[tuple[str, int], int] = {}
    for record in state.workers():
        slot = (record.report.host, record.report.index)
        latest.setdefault(slot, record)
        starts[slot] = starts.get(slot, 0) + 1
    views = []
    for slot, record in sorted(latest.items()):
        lease = leases.get(record.report.owner)
        alive = lease is not None or now - record.heartbeat_at < WORKER_STALE_S
        views.append(WorkerView(record, alive, lease, starts[slot] - 1))
    return views


def overview(config: Config, state: State, live: Live) -> Overview:
    now = state.now()
    oldest = state.oldest_queued_since()
    counts = state.job_counts()
    jobs = {str(status): counts.get(str(status), 0) for status in JobStatus}
    workers = worker_views(state, now)
    return Overview(
        receiver_address=f"{config.receiver.bind_address}:{config.receiver.port}" + (
            f", TLS {config.receiver.tls.port}" if config.receiver.tls is not None else ""),
        ae_title=config.receiver.ae_title,
        receiver=live.receiver_totals(),
        jobs=jobs,
        oldest_queued_age_s=None if oldest is None else max(0.0, now - oldest),
        workers=workers,
        hosts=state.host_throughput(THROUGHPUT_WINDOW_S),
        destinations=state.destination_totals(),
        checks=readiness(config, state, live),
        recent_errors=state.recent_errors(),
        segmenter=config.segmenter.backend,
        device=config.segmenter.device,
        backfills=state.backfill_progress(now - THROUGHPUT_WINDOW_S),
    )
