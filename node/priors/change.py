"""Change over time, as pure computation: who may be compared, what is comparable, Δ, Δ per year, significance.

Every time point is a `Snapshot`: the patient identity, the acquisition, and the numbers of the
complete structures by `QuantityKey`. A partial level or total (cut by the field of view) is not
the same quantity from one scan to the next, so only complete ones are kept. Snapshots come from
the node's own results (measurements.json as the state keeps it, `snapshot_from_result`) or from
its SRs read back by code (dicom_sr.read); finding them is I/O and lives in node.priors.lookup.

Rules (README "Change over time"):
- identity: Patient ID, Issuer of Patient ID, birth date and sex must all agree, else the prior
  is listed as a mismatch and never compared;
- a prior must be of an earlier study date; the most recent comparable one is used, else the
  most recent one, shown as not comparable with its reasons;
- comparable: same contrast status (both known), kVp, slice thickness and kernel where both
  have one, vertebral-body source and method version;
- significant: |Δ| above the least significant change, and only for a comparable pair.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date
from enum import StrEnum
from typing import Any

from node.labels import SPANS
from node.pipeline.acquisition import Acquisition, Subject

DAYS_PER_YEAR = 365.25
THICKNESS_TOLERANCE_MM = 0.1
KVP_TOLERANCE = 0.5


class Quantity(StrEnum):
    MUSCLE_MEDIAN_HU = "muscle_median_hu"
    MUSCLE_VOLUME_CM3 = "muscle_volume_cm3"
    BONE_MEDIAN_HU = "bone_median_hu"  # trabecular median of one vertebra
    LIVER_MEDIAN_HU = "liver_median_hu"  # parenchyma median


class Origin(StrEnum):
    """Where a prior was found."""

    STATE = "state"
    PACS = "pacs"
    CURRENT = "current"


@dataclass(frozen=True, order=True)
class QuantityKey:
    """One compared number: a level ("T5"), a span ("T1-T10") or "liver"; a side ("" for bone and liver)."""

    structure: str
    side: str
    quantity: Quantity


@dataclass(frozen=True)
class SRReference:
    """A result SR, for the evidence list of the SR that compares with it."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str


@dataclass(frozen=True)
class Snapshot:
    """One time point of one patient: identity, acquisition and the complete structures' numbers."""

    subject: Subject
    acquisition: Acquisition
    contrast_enhanced: bool | None
    body_source: str  # vertebrae_body or whole_vertebra
    method_version: str  # "" when the result does not say
    study_uid: str
    series_uid: str  # the CT series measured
    values: Mapping[QuantityKey, float]
    origin: Origin
    sr: SRReference | None = None

    @property
    def study_day(self) -> date | None:
        return parse_da(self.acquisition.study_date)


@dataclass(frozen=True)
class LeastSignificantChange:
    """|Δ| a change must exceed to be significant (README: 2.77 × an assumed precision SD)."""

    muscle_hu: float
    muscle_volume_percent: float
    bone_hu: float
    liver_hu: float

    def threshold(self, quantity: Quantity, prior: float) -> float:
        """In the quantity's own unit; volume's is a share of the prior volume."""
        if quantity is Quantity.MUSCLE_VOLUME_CM3:
            return abs(prior) * self.muscle_volume_percent / 100
        return {Quantity.MUSCLE_MEDIAN_HU: self.muscle_hu, Quantity.BONE_MEDIAN_HU: self.bone_hu,
                Quantity.LIVER_MEDIAN_HU: self.liver_hu}[quantity]


@dataclass(frozen=True)
class SourceCheck:
    """One place searched: the state, or the PACS; `reason` says why it was not checked."""

    source: str
    checked: bool
    found: int
    seconds: float
    reason: str = ""
    retrieve: str = ""  # get or move: how the PACS's SRs came

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "status": "checked" if self.checked else "not checked", "found": self.found,
                "seconds": round(self.seconds, 3), **({"retrieve": self.retrieve} if self.retrieve else {}),
                **({"reason": self.reason} if self.reason else {})}


@dataclass(frozen=True)
class PriorFinding:
    """A prior as found and judged: `identity` lists the fields that differ (empty: the same patient)."""

    snapshot: Snapshot
    identity: tuple[str, ...]
    reasons: tuple[str, ...]  # why the pair is not comparable (empty: comparable)
    interval_days: int | None
    used: bool
    note: str  # why it was used or not

    @property
    def comparable(self) -> bool:
        return not self.identity and not self.reasons

    def to_dict(self) -> dict[str, Any]:
        prior = self.snapshot
        sr = prior.sr
        return {"study_date": iso_date(prior.acquisition.study_date), "study_instance_uid": prior.study_uid,
                "series_instance_uid": prior.series_uid, "from": str(prior.origin),
                "sr_sop_instance_uid": sr.sop_instance_uid if sr else None,
                "identity": "same patient" if not self.identity else f"mismatch: {', '.join(self.identity)}",
                "interval_days": self.interval_days, "comparable": self.comparable, "reasons": list(self.reasons),
                "used": self.used, "note": self.note}


@dataclass(frozen=True)
class Change:
    key: QuantityKey
    prior: float
    current: float
    delta: float
    per_year: float
    interval_days: int
    comparable: bool
    significant: bool | None  # None when not comparable: no flag
    least_significant_change: float

    def to_dict(self) -> dict[str, Any]:
        return {"structure": self.key.structure, "side": self.key.side, "quantity": str(self.key.quantity),
                "prior": self.prior, "current": self.current, "delta": self.delta, "per_year": self.per_year,
                "interval_days": self.interval_days, "comparable": self.comparable, "significant": self.significant,
                "least_significant_change": self.least_significant_change}


@dataclass(frozen=True)
class Longitudinal:
    """What was searched, every prior found (newest first) and the change against the one used."""

    sources: tuple[SourceCheck, ...]
    priors: tuple[PriorFinding, ...] = ()
    changes: tuple[Change, ...] = field(default=())

    @property
    def used(self) -> PriorFinding | None:
        return next((prior for prior in self.priors if prior.used), None)

    @property
    def checked(self) -> bool:
        return all(source.checked for source in self.sources)

    def change(self, key: QuantityKey) -> Change | None:
        return next((change for change in self.changes if change.key == key), None)

    def to_dict(self) -> dict[str, Any]:
        """measurements.json's `priors` and `change`."""
        used = self.used
        return {"priors": {"checked": self.checked, "searched": [source.to_dict() for source in self.sources],
                           "found": [prior.to_dict() for prior in self.priors],
                           "used": used.snapshot.series_uid if used else None},
                "change": [change.to_dict() for change in self.changes]}


def compare(current: Snapshot, priors: list[Snapshot], lsc: LeastSignificantChange,
            sources: tuple[SourceCheck, ...]) -> Longitudinal:
    """Judge every prior (the current series' own earlier results are not priors) and compute the change."""
    others = _distinct([prior for prior in priors if prior.series_uid != current.series_uid])
    judged = [_judge(current, prior) for prior in others]
    chosen = _choose(judged)
    findings = tuple(_with_use(finding, finding is chosen) for finding in judged)
    changes = _changes(current, chosen, lsc) if chosen is not None else ()
    return Longitudinal(sources, findings, changes)


def identity_mismatches(current: Subject, prior: Subject) -> tuple[str, ...]:
    """The identity fields that differ; both must hold the same value, an empty one included."""
    fields = (("Patient ID", "patient_id"), ("Issuer of Patient ID", "issuer_of_patient_id"),
              ("birth date", "birth_date"), ("sex", "sex"))
    return tuple(name for name, attr in fields if getattr(current, attr).strip() != getattr(prior, attr).strip())


def comparability_reasons(current: Snapshot, prior: Snapshot) -> tuple[str, ...]:
    """Why the two acquisitions or methods differ; empty when they are comparable."""
    reasons = []
    if current.contrast_enhanced is None or prior.contrast_enhanced is None:
        reasons.append("contrast status unknown")
    elif current.contrast_enhanced != prior.contrast_enhanced:
        reasons.append(f"contrast: {_contrast(prior.contrast_enhanced)} then, {_contrast(current.contrast_enhanced)} now")
    a, b = prior.acquisition, current.acquisition
    if a.kvp is not None and b.kvp is not None and abs(a.kvp - b.kvp) > KVP_TOLERANCE:
        reasons.append(f"kVp: {a.kvp:g} then, {b.kvp:g} now")
    if (a.slice_thickness_mm is not None and b.slice_thickness_mm is not None
            and abs(a.slice_thickness_mm - b.slice_thickness_mm) > THICKNESS_TOLERANCE_MM):
        reasons.append(f"slice thickness: {a.slice_thickness_mm:g} mm then, {b.slice_thickness_mm:g} mm now")
    if a.convolution_kernel and b.convolution_kernel and a.convolution_kernel.upper() != b.convolution_kernel.upper():
        reasons.append(f"kernel: {a.convolution_kernel} then, {b.convolution_kernel} now")
    if prior.body_source != current.body_source:
        reasons.append(f"vertebral bodies: {prior.body_source or 'unknown'} then, {current.body_source} now")
    if prior.method_version != current.method_version:
        reasons.append(f"method version: {prior.method_version or 'unknown'} then, {current.method_version} now")
    return tuple(reasons)


def _contrast(enhanced: bool) -> str:
    return "enhanced" if enhanced else "unenhanced"


def _distinct(priors: list[Snapshot]) -> list[Snapshot]:
    """One snapshot per CT series (the state's first, as it is the node's own record), newest study first."""
    seen: dict[str, Snapshot] = {}
    for prior in sorted(priors, key=lambda p: p.origin is not Origin.STATE):
        seen.setdefault(prior.series_uid, prior)
    return sorted(seen.values(), key=lambda p: (p.study_day or date.min, p.series_uid), reverse=True)


def _judge(current: Snapshot, prior: Snapshot) -> PriorFinding:
    identity = identity_mismatches(current.subject, prior.subject)
    interval = _interval_days(prior, current)
    return PriorFinding(prior, identity, comparability_reasons(current, prior), interval, False, "")


def _interval_days(prior: Snapshot, current: Snapshot) -> int | None:
    then, now = prior.study_day, current.study_day
    return None if then is None or now is None else (now - then).days


def _choose(judged: list[PriorFinding]) -> PriorFinding | None:
    """The most recent comparable earlier prior of the same patient, else the most recent earlier one."""
    candidates = [f for f in judged if not f.identity and f.interval_days is not None and f.interval_days > 0]
    return next((f for f in candidates if f.comparable), candidates[0] if candidates else None)


def _with_use(finding: PriorFinding, used: bool) -> PriorFinding:
    if finding.identity:
        note = "identity mismatch: never compared"
    elif finding.interval_days is None:
        note = "no study date: no interval"
    elif finding.interval_days <= 0:
        note = "not earlier than this study"
    elif used:
        note = "most recent comparable prior" if finding.comparable else "most recent prior; none is comparable"
    else:
        note = "a more recent comparable prior is used" if finding.comparable else "not comparable"
    return PriorFinding(finding.snapshot, finding.identity, finding.reasons, finding.interval_days, used, note)


def _changes(current: Snapshot, chosen: PriorFinding, lsc: LeastSignificantChange) -> tuple[Change, ...]:
    prior, days = chosen.snapshot, chosen.interval_days
    assert days is not None and days > 0
    changes = []
    for key in sorted(set(current.values) & set(prior.values)):
        then, now = prior.values[key], current.values[key]
        delta = now - then
        threshold = lsc.threshold(key.quantity, then)
        changes.append(Change(key, then, now, delta, delta * DAYS_PER_YEAR / days, days, chosen.comparable,
                              abs(delta) > threshold if chosen.comparable else None, threshold))
    return tuple(changes)


# ---------------------------------------------------------------- from measurements.json


def snapshot_from_result(result: Mapping[str, Any], origin: Origin) -> Snapshot:
    """A result as measurements.json (and the state) hold it; results from before issue 20 give no identity."""
    subject = result.get("subject") or {}
    acquisition = result.get("acquisition") or {}
    source = result.get("source") or {}
    method = result.get("method") or {}
    sr = (result.get("outputs") or {}).get("sr")
    return Snapshot(
        subject=Subject(**{name: subject.get(name, "") for name in ("patient_id", "issuer_of_patient_id", "birth_date",
                                                                     "sex")}),
        acquisition=Acquisition(acquisition.get("study_date", ""), acquisition.get("kvp"),
                                acquisition.get("slice_thickness_mm"), acquisition.get("convolution_kernel")),
        contrast_enhanced=(result.get("contrast") or {}).get("enhanced"),
        body_source=method.get("vertebral_body_source", ""),
        method_version=str(method.get("version", "")),
        study_uid=source.get("study_instance_uid") or "",
        series_uid=source.get("series_instance_uid") or "",
        values=result_values(result),
        origin=origin,
        sr=SRReference(**sr) if sr else None,
    )


def result_values(result: Mapping[str, Any]) -> dict[QuantityKey, float]:
    """The complete structures' numbers of one result."""
    values: dict[QuantityKey, float] = {}
    levels = result.get("levels") or []
    for level in levels:
        if level.get("status") == "complete":
            _muscle(values, level["level"], level)
    complete = {level["level"] for level in levels if level.get("status") == "complete"}
    reported = {level["level"] for level in levels}
    for span in SPANS:
        listed = [name for name in span.levels if name in reported]
        if listed and set(listed) <= complete and result.get(span.key):
            _muscle(values, span.name, result[span.key])
    for vertebra in result.get("vertebrae") or []:
        median = (vertebra.get("trabecular") or {}).get("median_hu")
        if vertebra.get("status") == "complete" and _finite(median):
            values[QuantityKey(vertebra["level"], "", Quantity.BONE_MEDIAN_HU)] = float(median)
    liver = result.get("liver") or {}
    median = (liver.get("parenchyma") or {}).get("median_hu")
    if liver.get("status") == "complete" and _finite(median):
        values[QuantityKey("liver", "", Quantity.LIVER_MEDIAN_HU)] = float(median)
    return values


def _muscle(values: dict[QuantityKey, float], structure: str, sides: Mapping[str, Any]) -> None:
    for side in ("left", "right", "combined"):
        stats = sides.get(side) or {}
        for quantity, name in ((Quantity.MUSCLE_MEDIAN_HU, "median_hu"), (Quantity.MUSCLE_VOLUME_CM3, "volume_cm3")):
            if _finite(stats.get(name)):
                values[QuantityKey(structure, side, quantity)] = float(stats[name])


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def parse_da(text: str) -> date | None:
    """DICOM DA (YYYYMMDD) or ISO date; None when it is neither."""
    digits = text.replace("-", "").strip()
    try:
        return date(int(digits[:4]), int(digits[4:6]), int(digits[6:8])) if len(digits) == 8 else None
    except ValueError:
        return None


def iso_date(text: str) -> str:
    day = parse_da(text)
    return day.isoformat() if day else text
