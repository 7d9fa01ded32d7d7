"""A screening flag that says when it could not be assessed, and why, instead of a silent no."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class FlagState(StrEnum):
    LOW = "low"
    NOT_LOW = "not_low"
    NOT_ASSESSED = "not_assessed"


@dataclass
class Flag:
    state: FlagState
    rule: str  # e.g. "L1 trabecular median ≤ 110 HU"
    value_hu: float | None
    threshold_hu: float
    reason: str | None = None  # why not assessed

    @classmethod
    def not_assessed(cls, rule: str, value: float | None, threshold: float, reason: str) -> Flag:
        return cls(FlagState.NOT_ASSESSED, rule, value, threshold, reason)

    @classmethod
    def assessed(cls, rule: str, value: float, threshold: float, low: bool) -> Flag:
        return cls(FlagState.LOW if low else FlagState.NOT_LOW, rule, value, threshold)
