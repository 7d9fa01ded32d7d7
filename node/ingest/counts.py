"""What the receiver has done since `serve` started, counted for /metrics and the status page.

The receiver's threads (one per association) report each event here under one lock; readers
get a frozen snapshot. Nothing here is durable: Prometheus counters may start again at 0.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ReceiverTotals:
    """The receiver's counts since `serve` started (all associations, ended or not)."""

    stored: int = 0
    duplicate: int = 0
    discarded: int = 0
    refused: dict[str, int] = field(default_factory=dict)  # reason (a C-STORE status name) → instances
    associations_accepted: int = 0
    associations_rejected: int = 0
    associations_open: int = 0


class ReceiverCounter:
    """Thread-safe running counts; the receiver calls one method per event."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stored = self._duplicate = self._discarded = 0
        self._accepted = self._rejected = self._ended = 0
        self._refused: dict[str, int] = {}

    def stored(self, duplicate: bool) -> None:
        with self._lock:
            if duplicate:
                self._duplicate += 1
            else:
                self._stored += 1

    def discarded(self) -> None:
        with self._lock:
            self._discarded += 1

    def refused(self, reason: str) -> None:
        with self._lock:
            self._refused[reason] = self._refused.get(reason, 0) + 1

    def association(self, accepted: bool) -> None:
        with self._lock:
            if accepted:
                self._accepted += 1
            else:
                self._rejected += 1

    def association_ended(self) -> None:
        with self._lock:
            self._ended += 1

    def totals(self) -> ReceiverTotals:
        with self._lock:
            return ReceiverTotals(self._stored, self._duplicate, self._discarded, dict(self._refused), self._accepted,
                                  self._rejected, max(0, self._accepted - self._ended))
