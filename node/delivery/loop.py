"""The delivery loop: sends pending results to their destinations until acknowledged or too old.

Each delivery row is one file for one destination, so a partly successful association never
resends what was acknowledged. A file counts as delivered only on C-STORE status 0x0000; any
other answer, warnings included, is logged and retried with exponential backoff until the waits
between its attempts add up to `delivery.horizon_s`, and then it fails for good. The horizon is
counted in those waits, not by the wall clock: a clock set forward (or a node that was down) does
not fail pending deliveries, and one scheduled further ahead than any backoff (the clock was set
back) is tried at once. Rows live in the state database, so pending deliveries continue after a restart.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from node.config import Config, DestinationConfig
from node.delivery.destinations import RESULTS_FOLDER
from node.delivery.sender import SendOutcome, send_files
from node.durable import write_atomic
from node.state.store import Delivery, State

log = logging.getLogger(__name__)

Sender = Callable[[DestinationConfig, list[Path], str, float], list[SendOutcome]]


def next_attempt_at(delivery: Delivery, now: float, config: Config) -> float | None:
    """When to try again after `delivery.attempts + 1` failures; None once the waits so far reach the horizon."""
    waited = sum(_delay(attempt, config) for attempt in range(delivery.attempts))
    if waited >= config.delivery.horizon_s:
        return None
    return now + _delay(delivery.attempts, config)


def _delay(attempt: int, config: Config) -> float:
    settings = config.delivery
    return min(settings.retry_base_s * 2 ** min(attempt, 64), settings.retry_max_interval_s)


def parse_destination(key: str) -> DestinationConfig:
    """`AE@host:port`, as the deliveries table stores destinations and as `echo` takes a peer."""
    ae_title, at, address = key.partition("@")
    host, colon, port = address.rpartition(":")
    if not (at and colon and 0 < len(ae_title) <= 16 and host and port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(f"{key!r} is not AE@host:port: write it like PACS@10.0.0.5:104")
    return DestinationConfig(ae_title=ae_title, host=host, port=int(port))


def export_results(out_dir: Path, results_dir: Path, series_uid: str) -> list[Path]:
    """Copy a job's measurements into the results folder as <SeriesUID>.json and .csv (UIDs, no names)."""
    results_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for suffix in ("json", "csv"):
        source = out_dir / f"measurements.{suffix}"
        target = results_dir / f"{series_uid}.{suffix}"
        write_atomic(target, source.read_bytes())
        written.append(target)
    return written


class DeliveryLoop:
    """Sends every due delivery, one association per destination per round."""

    def __init__(self, config: Config, state: State, sender: Sender = send_files,
                 clock: Callable[[], float] = time.time) -> None:
        self._config = config
        self._state = state
        self._sender = sender
        self._clock = clock

    def run(self, stop: threading.Event, interval_s: float = 1.0) -> None:
        """Deliver until `stop`; an unexpected error ends one round, never the loop (serve would go on silently)."""
        while not stop.is_set():
            try:
                attempted = self.run_once()
            except Exception:
                log.exception("event=delivery_round_failed retry_in_s=%g", interval_s)
                attempted = 0
            if not attempted:
                stop.wait(interval_s)

    def run_once(self) -> int:
        """Attempt every due delivery once; returns how many were attempted."""
        due = self._state.due_deliveries(max_wait_s=self._config.delivery.retry_max_interval_s)
        by_destination: dict[str, list[Delivery]] = defaultdict(list)
        for delivery in due:
            by_destination[delivery.destination].append(delivery)
        for destination, deliveries in by_destination.items():
            if destination == RESULTS_FOLDER:
                self._export(deliveries)
            else:
                self._send(destination, deliveries)
        return len(due)

    def _export(self, deliveries: list[Delivery]) -> None:
        results_dir = self._config.delivery.results_dir
        for delivery in deliveries:
            job = self._state.get_job(delivery.job_id)
            try:
                if results_dir is None:
                    raise OSError("delivery.results_dir is no longer set: set it again or retry the job")
                export_results(Path(delivery.file), results_dir, job.series_uid if job else str(delivery.job_id))
            except OSError as exc:
                self._failed(delivery, f"results folder: {exc}")
            else:
                self._state.mark_sent(delivery.id)
                log.info("event=results_written job=%d delivery=%d", delivery.job_id, delivery.id)

    def _send(self, destination: str, deliveries: list[Delivery]) -> None:
        try:
            peer = parse_destination(destination)
        except ValueError as exc:
            for delivery in deliveries:
                self._failed(delivery, str(exc))
            return
        by_file = {Path(d.file): d for d in deliveries}
        try:
            outcomes = self._sender(peer, list(by_file), self._config.receiver.ae_title,
                                    self._config.delivery.timeout_s)
        except Exception as exc:  # counted as a failed attempt, so backoff keeps it from starving other destinations
            log.exception("event=send_error destination=%s files=%d", destination, len(deliveries))
            for delivery in deliveries:
                self._failed(delivery, f"unexpected error while sending: {exc!r}")
            return
        answered = set()
        for outcome in outcomes:
            delivery = by_file[Path(outcome.path)]
            answered.add(delivery.id)
            self._record(delivery, outcome)
        for delivery in deliveries:
            if delivery.id not in answered:
                self._failed(delivery, "no answer from the destination")

    def _record(self, delivery: Delivery, outcome: SendOutcome) -> None:
        if outcome.ok:
            self._state.mark_sent(delivery.id)
            log.info("event=delivered job=%d delivery=%d destination=%s file=%s", delivery.job_id, delivery.id,
                     delivery.destination, Path(delivery.file).name)
            return
        self._failed(delivery, outcome.message)

    def _failed(self, delivery: Delivery, error: str) -> None:
        now = self._clock()
        retry_at = next_attempt_at(delivery, now, self._config)
        self._state.mark_not_sent(delivery.id, error, retry_at)
        if retry_at is None:
            log.error("event=delivery_failed job=%d delivery=%d destination=%s attempts=%d reason=%r",
                      delivery.job_id, delivery.id, delivery.destination, delivery.attempts + 1, error)
        else:
            log.warning("event=delivery_retry job=%d delivery=%d destination=%s attempt=%d retry_in_s=%.0f reason=%r",
                        delivery.job_id, delivery.id, delivery.destination, delivery.attempts + 1,
                        retry_at - now, error)
