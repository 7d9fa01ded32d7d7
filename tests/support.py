"""Test support shared by every test module: a settable clock and a bounded wait.

Test modules import from here (and from the harness modules dicom_peers, orthanc, phantom,
standin_weights), never from each other.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class Clock:
    """A clock the test moves by hand: `clock.now += 5`; callable like time.time."""

    def __init__(self, now: float = 10_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def wait_until(predicate: Callable[[], object], what: str = "the condition", timeout_s: float = 120.0,
               poll_s: float = 0.05) -> object:
    """Poll `predicate` until it returns something truthy (returned) or `timeout_s` passes (TimeoutError)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what} did not happen within {timeout_s} s")
        time.sleep(poll_s)
