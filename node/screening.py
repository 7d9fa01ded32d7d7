"""What a measurement means to its reader: level status, what the T1–T10 totals cover, the flag.

One place for these rules, because four readers show them: the SR, the key image, the CSV
report (all in the worker) and the worklist (in the CLI, which must not import the pipeline).
Hence plain values in, plain values out, and no imports beyond the standard library.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

NO_DIXON = "not assessed: no Dixon"  # the MR fat grade of a series without a usable Dixon pair


class LevelStatus(StrEnum):
    """How much of a level the field of view and the segmentation held.

    A StrEnum so that measurements.json and the state database keep the plain words.
    """

    COMPLETE = "complete"
    PARTIAL = "partial"  # measured, but cut by the field of view or the image border
    ABSENT = "absent"  # not measured: no numbers exist for it


@dataclass(frozen=True)
class Coverage:
    """Which levels the T1–T10 totals include, and whether those totals are complete."""

    status: LevelStatus
    included: tuple[str, ...]  # levels whose muscle is in the totals, cranial first
    missing: tuple[str, ...]  # absent levels
    partial: tuple[str, ...]

    def describe(self) -> str:
        """'T1-T10', or e.g. 'T4-T10 (T1, T2, T3 absent)' for the key image, worklist and SR."""
        if not self.included:
            return "none"
        span = self.included[0] if len(self.included) == 1 else f"{self.included[0]}-{self.included[-1]}"
        if len(self.included) > 1 and len(self.included) != _span_length(self.included):
            span = ", ".join(self.included)
        notes = [f"{', '.join(self.missing)} absent"] if self.missing else []
        notes += [f"{', '.join(self.partial)} partial"] if self.partial else []
        return span + (f" ({'; '.join(notes)})" if notes else "")


def coverage(statuses: Iterable[tuple[str, str]]) -> Coverage:
    """(level, status) in cranio-caudal order -> what the totals over those levels cover.

    Complete only when every level is complete; absent when none was measured; else partial.
    """
    pairs = [(level, LevelStatus(status)) for level, status in statuses]
    included = tuple(level for level, status in pairs if status is not LevelStatus.ABSENT)
    missing = tuple(level for level, status in pairs if status is LevelStatus.ABSENT)
    partial = tuple(level for level, status in pairs if status is LevelStatus.PARTIAL)
    if not included:
        status = LevelStatus.ABSENT
    elif missing or partial:
        status = LevelStatus.PARTIAL
    else:
        status = LevelStatus.COMPLETE
    return Coverage(status, included, missing, partial)


def low_attenuation(median_hu: float | None, threshold_hu: float) -> bool | None:
    """The screening flag: T1–T10 median attenuation below `measure.low_attenuation_hu`.

    None when nothing was measured: no screening result, which is not a negative one.
    """
    return None if median_hu is None else median_hu < threshold_hu


def _span_length(levels: tuple[str, ...]) -> int:
    """Levels from the first to the last named, inclusive (names are 'T<n>')."""
    return int(levels[-1][1:]) - int(levels[0][1:]) + 1
