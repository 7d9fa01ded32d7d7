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

from node.config import Config
from node.delivery.destinations import Context, Handler, Outcome, Sender, handler_for
from node.delivery.sender import send_files
from node.state.store import Delivery, State

log = logging.getLogger(__name__)

def next_attempt_at(delivery: Delivery, now: float, config: Config) -> float | None:
    """When to try again after `delivery.attempts + 1` failures; None once the waits so far reach the horizon."""
    waited = sum(_delay(attempt, config) for attempt in range(delivery.attempts))
    if waited >= config.delivery.horizon_s:
        return None
    return now + _delay(delivery.attempts, config)


def _delay(attempt: int, config: Config) -> float:
    settings = config.delivery
    return min(settings.retry_base_s * 2 ** min(attempt, 64), settings.retry_max_interval_s)


class DeliveryLoop:
    """Sends every due delivery, one association per destination per round."""

    def __init__(self, config: Config, state: State, sender: Sender = send_files,
                 clock: Callable[[], float] = time.time) -> None:
        self._config = config
        self._state = state
        self._clock = clock
        self._context = Context(config.receiver.ae_title, config.delivery.timeout_s, sender, self._series_uid)

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
        for key, batch in by_destination.items():
            self._deliver(key, batch)
        return len(due)

    def _deliver(self, key: str, batch: list[Delivery]) -> None:
        try:
            handler = handler_for(key, self._config)
        except ValueError as exc:
            for delivery in batch:
                self._failed(delivery, str(exc))
            return
        try:
            outcomes = handler.deliver(batch, self._context)
        except Exception as exc:  # counted as a failed attempt, so backoff keeps it from starving other destinations
            log.exception("event=send_error destination=%s files=%d", key, len(batch))
            for delivery in batch:
                self._failed(delivery, f"unexpected error while sending: {exc!r}")
            return
        for outcome in outcomes:
            self._record(handler, outcome)

    def _record(self, handler: Handler, outcome: Outcome) -> None:
        delivery = outcome.delivery
        if not outcome.ok:
            self._failed(delivery, outcome.message)
            return
        self._state.mark_sent(delivery.id)
        log.info("event=%s job=%d delivery=%d destination=%s file=%s", handler.event, delivery.job_id, delivery.id,
                 delivery.destination, Path(delivery.file).name)

    def _series_uid(self, job_id: int) -> str:
        job = self._state.get_job(job_id)
        return job.series_uid if job else str(job_id)

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
