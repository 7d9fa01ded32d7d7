"""/metrics: the node's state in Prometheus exposition format, every name prefixed paraspinal_.

Counters that live in other processes (workers) or must survive a restart are read from the
state database at each scrape; the receiver's counts come from the running receiver. Stage
durations are summed into histograms as their rows appear, so a scrape reads only new rows.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client import ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString

from node import __version__
from node.config import Config
from node.state.store import JobStatus, State
from node.web.status import THROUGHPUT_WINDOW_S, Live, WorkerView, weights_missing, worker_views

STAGES = ("fetch", "load", "segment", "measure", "priors", "encode", "stow", "deliver")  # fetch, stow: remote workers
BUCKETS_S = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
_RULE = re.compile(r"selection\.([a-z_]+)")
GPU_QUERY_INTERVAL_S = 5.0


def skip_rule(reason: str | None) -> str:
    """The selection rule a skip reason names (its config key), e.g. "slice_thickness_min_mm"."""
    match = _RULE.search(reason or "")
    return match.group(1) if match else "other"


class StageHistograms:
    """Cumulative stage-duration histograms fed from the stage_timings table, a few rows per job."""

    def __init__(self, state: State) -> None:
        self._state = state
        self._lock = threading.Lock()
        self._last_id = 0
        self._buckets = {stage: [0] * len(BUCKETS_S) for stage in STAGES}
        self._count = dict.fromkeys(STAGES, 0)
        self._sum = dict.fromkeys(STAGES, 0.0)

    def metric(self) -> HistogramMetricFamily:
        with self._lock:
            self._catch_up()
            family = HistogramMetricFamily("paraspinal_stage_duration_seconds",
                                           "Time a job spent in each stage (deliver: per file and destination)",
                                           labels=["stage"])
            for stage in STAGES:
                buckets = [(floatToGoString(bound), count) for bound, count in zip(BUCKETS_S, self._buckets[stage])]
                family.add_metric([stage], buckets + [("+Inf", self._count[stage])], self._sum[stage])
            return family

    def _catch_up(self) -> None:
        while rows := self._state.stage_timings_after(self._last_id):
            for row in rows:
                self._last_id = row.id
                if row.stage not in self._count:
                    continue
                self._count[row.stage] += 1
                self._sum[row.stage] += row.seconds
                for i, bound in enumerate(BUCKETS_S):
                    if row.seconds <= bound:
                        self._buckets[row.stage][i] += 1


@dataclass(frozen=True)
class GpuMemory:
    index: str
    used_bytes: float
    total_bytes: float


class GpuProbe:
    """GPU memory as nvidia-smi reports it (every process on the card), asked at most every few seconds."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._at = 0.0
        self._last: list[GpuMemory] = []

    def read(self) -> list[GpuMemory]:
        with self._lock:
            if time.monotonic() - self._at >= GPU_QUERY_INTERVAL_S:
                self._at = time.monotonic()
                self._last = _nvidia_smi()
            return self._last


def _nvidia_smi() -> list[GpuMemory]:
    command = shutil.which("nvidia-smi")
    if command is None:
        return []
    try:
        answer = subprocess.run([command, "--query-gpu=index,memory.used,memory.total", "--format=csv,noheader,nounits"],
                                capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return []
    found = []
    for line in answer.stdout.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 3 and all(p.replace(".", "", 1).isdigit() for p in parts[1:]):
            found.append(GpuMemory(parts[0], float(parts[1]) * 2**20, float(parts[2]) * 2**20))
    return found


class NodeCollector(Collector):
    """Builds every paraspinal_ metric at scrape time."""

    def __init__(self, config: Config, state: State, live: Live) -> None:
        self._config = config
        self._state = state
        self._live = live
        self._stages = StageHistograms(state)
        self._gpu = GpuProbe() if config.segmenter.device.startswith("gpu") else None

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily("paraspinal_info", "The node's version and AE title", labels=["version", "ae_title"])
        info.add_metric([__version__, self._config.receiver.ae_title], 1.0)
        yield info
        yield from self._receiver()
        yield from self._jobs()
        yield self._stages.metric()
        yield from self._deliveries()
        yield from self._workers()
        yield from self._resources()

    def _receiver(self) -> Iterator[Metric]:
        totals = self._live.receiver_totals()
        received = CounterMetricFamily("paraspinal_instances_received", "CT instances received and acknowledged, "
                                       "by outcome (stored new, or duplicate of one already stored)", labels=["outcome"])
        received.add_metric(["stored"], totals.stored)
        received.add_metric(["duplicate"], totals.duplicate)
        refused = CounterMetricFamily("paraspinal_instances_refused", "Instances answered with a failure status, "
                                      "by reason", labels=["reason"])
        for reason, count in sorted(totals.refused.items()):
            refused.add_metric([reason], count)
        discarded = CounterMetricFamily("paraspinal_instances_discarded",
                                        "Non-CT instances (scouts, dose reports) accepted and discarded")
        discarded.add_metric([], totals.discarded)
        associations = CounterMetricFamily("paraspinal_associations", "DICOM associations, by outcome",
                                           labels=["outcome"])
        associations.add_metric(["accepted"], totals.associations_accepted)
        associations.add_metric(["rejected"], totals.associations_rejected)
        open_now = GaugeMetricFamily("paraspinal_associations_open", "DICOM associations open now")
        open_now.add_metric([], totals.associations_open)
        listening = GaugeMetricFamily("paraspinal_receiver_listening", "1 when the DICOM receiver listens")
        listening.add_metric([], 1.0 if self._live.receiver_listening() else 0.0)
        yield from (received, refused, discarded, associations, open_now, listening)

    def _jobs(self) -> Iterator[Metric]:
        counts = self._state.job_counts()
        completed = CounterMetricFamily("paraspinal_series_completed", "Series found complete (each new content once)")
        completed.add_metric([], sum(counts.values()))
        skipped = CounterMetricFamily("paraspinal_series_skipped", "Complete series not processed, by the selection "
                                      "rule that refused them", labels=["rule"])
        by_rule: dict[str, int] = {}
        for reason, count in self._state.skip_reasons():
            by_rule[skip_rule(reason)] = by_rule.get(skip_rule(reason), 0) + count
        for rule, count in sorted(by_rule.items()):
            skipped.add_metric([rule], count)
        jobs = GaugeMetricFamily("paraspinal_jobs", "Jobs by status", labels=["status"])
        for status in JobStatus:
            jobs.add_metric([str(status)], counts.get(str(status), 0))
        oldest = self._state.oldest_queued_since()
        age = GaugeMetricFamily("paraspinal_oldest_queued_job_age_seconds",
                                "How long the longest-waiting runnable job has waited (0 when none waits)")
        age.add_metric([], 0.0 if oldest is None else max(0.0, time.time() - oldest))
        yield from (completed, skipped, jobs, age)

    def _deliveries(self) -> Iterator[Metric]:
        attempts = CounterMetricFamily("paraspinal_delivery_attempts", "Delivery attempts (one file to one "
                                       "destination), by destination", labels=["destination"])
        failures = CounterMetricFamily("paraspinal_delivery_failures", "Failed delivery attempts, by destination",
                                       labels=["destination"])
        deliveries = GaugeMetricFamily("paraspinal_deliveries", "Deliveries by destination and status",
                                       labels=["destination", "status"])
        for totals in self._state.destination_totals():
            attempts.add_metric([totals.destination], totals.attempts)
            failures.add_metric([totals.destination], totals.failed_attempts)
            for status, count in (("pending", totals.pending), ("sent", totals.sent), ("failed", totals.failed)):
                deliveries.add_metric([totals.destination, status], count)
        yield from (attempts, failures, deliveries)

    def _workers(self) -> Iterator[Metric]:
        views = worker_views(self._state, self._state.now())
        alive = GaugeMetricFamily("paraspinal_workers_alive", "Worker processes that reported or renewed a lease "
                                  "in the last minute")
        alive.add_metric([], sum(v.alive for v in views))
        restarts = CounterMetricFamily("paraspinal_worker_restarts", "Worker processes started again in a slot "
                                       "after the previous one exited")
        restarts.add_metric([], sum(v.restarts for v in views))
        engine = CounterMetricFamily("paraspinal_engine_restarts", "Segmentation engine model processes started "
                                     "again after an earlier one (crash, hang, out of memory), over all workers")
        engine.add_metric([], sum(record.report.engine_restarts for record in self._state.workers()))
        weights = GaugeMetricFamily("paraspinal_weights_missing", "Required model folders a live worker misses")
        weights.add_metric([], len(weights_missing(views)))
        yield from (alive, restarts, engine, weights)
        yield from self._hosts(views)

    def _hosts(self, views: list[WorkerView]) -> Iterator[Metric]:
        """Per worker host: workers by state, jobs running, jobs done in the last hour, latest heartbeat."""
        workers = GaugeMetricFamily("paraspinal_host_workers", "Worker processes per host, by state (running, "
                                    "idle, lost: silent and holding no live lease)", labels=["host", "state"])
        heartbeat = GaugeMetricFamily("paraspinal_host_last_heartbeat_timestamp_seconds",
                                      "The latest heartbeat of any worker on the host", labels=["host"])
        by_host: dict[str, dict[str, int]] = {}
        latest: dict[str, float] = {}
        for view in views:
            host = view.record.report.host
            state = "running" if view.lease else "idle" if view.alive else "lost"
            counts = by_host.setdefault(host, {"running": 0, "idle": 0, "lost": 0})
            counts[state] += 1
            latest[host] = max(latest.get(host, 0.0), view.record.heartbeat_at)
        for host, counts in sorted(by_host.items()):
            for state, count in counts.items():
                workers.add_metric([host, state], count)
            heartbeat.add_metric([host], latest[host])
        done = GaugeMetricFamily("paraspinal_host_jobs_done_last_hour", "Jobs the host's workers finished in the "
                                 "last hour", labels=["host"])
        for throughput in self._state.host_throughput(THROUGHPUT_WINDOW_S):
            done.add_metric([throughput.host], throughput.done)
        yield from (workers, heartbeat, done)

    def _resources(self) -> Iterator[Metric]:
        free = GaugeMetricFamily("paraspinal_disk_free_bytes", "Free space on the spool's filesystem")
        free.add_metric([], self._live.free_disk_mb() * 2.0**20)
        watermark = GaugeMetricFamily("paraspinal_disk_free_watermark_bytes",
                                      "Below this free space the receiver refuses images (receiver.min_free_disk_mb)")
        watermark.add_metric([], self._config.receiver.min_free_disk_mb * 2.0**20)
        yield from (free, watermark)
        if self._gpu is not None:
            gpus = self._gpu.read()
            used = GaugeMetricFamily("paraspinal_gpu_memory_used_bytes", "GPU memory in use (all processes)",
                                     labels=["gpu"])
            total = GaugeMetricFamily("paraspinal_gpu_memory_total_bytes", "GPU memory", labels=["gpu"])
            for gpu in gpus:
                used.add_metric([gpu.index], gpu.used_bytes)
                total.add_metric([gpu.index], gpu.total_bytes)
            yield from (used, total)


def registry(config: Config, state: State, live: Live) -> CollectorRegistry:
    """The node's metrics and the `serve` process's own (CPU, memory, open files), nothing of other libraries."""
    own = CollectorRegistry(auto_describe=False)
    own.register(NodeCollector(config, state, live))
    ProcessCollector(namespace="paraspinal", registry=own)
    return own
