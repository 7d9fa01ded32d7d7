"""When a backfill may retrieve: local-time windows such as "22:00-06:00", "sat-sun", "mon-fri 19:00-07:00".

A window that ends before it starts runs past midnight and belongs to the day it starts on; "24:00"
is the end of a day. Days alone mean the whole day.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_WINDOW = re.compile(r"^\s*(?P<days>[a-z,\-]+)?\s*(?:(?P<start>\d{1,2}:\d{2})\s*-\s*(?P<end>\d{1,2}:\d{2}))?\s*$")
_MAX_LOOKAHEAD_DAYS = 8


class WindowError(ValueError):
    """A window that cannot be read; the message shows the accepted forms."""


@dataclass(frozen=True)
class Window:
    days: frozenset[int]  # 0 = Monday
    start_min: int  # minutes after midnight
    end_min: int  # 1..1440; below start_min: the window runs past midnight

    def contains(self, when: datetime) -> bool:
        minute = when.hour * 60 + when.minute
        day = when.weekday()
        if self.start_min < self.end_min:
            return day in self.days and self.start_min <= minute < self.end_min
        return (day in self.days and minute >= self.start_min) or ((day - 1) % 7 in self.days and minute < self.end_min)


def parse_windows(texts: list[str]) -> list[Window]:
    return [_parse(text) for text in texts]


def _parse(text: str) -> Window:
    match = _WINDOW.match(text.lower())
    if not match or not (match["days"] or match["start"]):
        raise WindowError(f"{text!r} is not a window: write \"22:00-06:00\", \"sat-sun\" or \"mon-fri 19:00-07:00\"")
    days = _days(match["days"], text) if match["days"] else frozenset(range(7))
    start, end = (_minutes(match["start"], text), _minutes(match["end"], text)) if match["start"] else (0, 1440)
    if start == end or start == 1440:
        raise WindowError(f"{text!r}: a window must not start where it ends or at 24:00")
    return Window(days, start, end)


def _days(text: str, whole: str) -> frozenset[int]:
    chosen: set[int] = set()
    for part in text.split(","):
        first, _, last = part.partition("-")
        if first not in DAYS or (last and last not in DAYS):
            raise WindowError(f"{whole!r}: days are {', '.join(DAYS)}, as \"mon-fri\" or \"sat,sun\"")
        a, b = DAYS.index(first), DAYS.index(last or first)
        chosen.update((a + i) % 7 for i in range((b - a) % 7 + 1))
    return frozenset(chosen)


def _minutes(text: str, whole: str) -> int:
    hours, minutes = (int(v) for v in text.split(":"))
    if not (0 <= minutes < 60 and (hours < 24 or (hours == 24 and minutes == 0))):
        raise WindowError(f"{whole!r}: {text} is not a time of day (00:00..24:00)")
    return hours * 60 + minutes


def is_open(windows: list[Window], when: datetime) -> bool:
    """No windows: always open."""
    return not windows or any(w.contains(when) for w in windows)


def next_open(windows: list[Window], when: datetime) -> datetime:
    """The first minute at or after `when` inside a window (`when` itself while open)."""
    if is_open(windows, when):
        return when
    midnight = when.replace(hour=0, minute=0, second=0, microsecond=0)
    starts = [midnight + timedelta(days=d, minutes=w.start_min) for d in range(_MAX_LOOKAHEAD_DAYS) for w in windows]
    return min((s for s in starts if s > when and is_open(windows, s)), default=when + timedelta(days=1))
