"""The screening worklist: one row per processed series with T1–T10 and L1–L5 figures and the flag.

The flag is raised when the T1–T10 median attenuation of the combined muscle is below
`measure.low_attenuation_hu` (the seed study's lowest quartile had a median of 4 HU against
27 HU in the others). That rule, and what the T1–T10 totals cover (complete only when every
level is; the levels they include), come from node.screening, as on the key image and in the SR.
An absent level has no figures, not a volume of 0. A series processed again after it grew is
listed with its latest result.
The change columns (node.priors) compare with the prior the node used: the date, whether the pair
is comparable, Δ and Δ per year of the T1–T10 and L1–L5 median HU and volume, of the bone-flag
vertebra and of the liver; `--where` filters on any column ("t1_t10_median_hu_per_year<-2": muscle
HU fell by more than 2 HU a year) and `--sort` orders by one.
The L1–L5 columns (abdominal CT, or complete lumbar levels of a chest CT) follow the same rules
and are blank where no lumbar level was reported. Bone (trabecular median per vertebra T1–L5,
the low-bone flag) and liver columns follow; the bone and liver flags read "low", "not_low" or
"not_assessed" as the measurement decided them.
Lumbar MR results (modality "MR") fill the L1–L5 volume and status columns like CT, no HU, and
the Dixon columns: fat signal fraction ΣF/Σ(F+W) (0–1) and the simplified Goutallier grade per
level and for L1–L5; without a Dixon pair the grade reads "not assessed: no Dixon". They are
blank on CT.
"""

from __future__ import annotations

import csv
import io
import json
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from typing import Any

from node.labels import LUMBAR_SPAN, SPINE, THORACIC_SPAN, Span
from node.screening import NO_DIXON, LevelStatus, coverage, low_attenuation
from node.state.store import SeriesRecord

_DATE = re.compile(r"^(\d{4})-?(\d{2})-?(\d{2})$")


def parse_since(text: str) -> str:
    """A `--since` date (YYYY-MM-DD or YYYYMMDD) as a DICOM DA string for comparison with StudyDate."""
    match = _DATE.match(text.strip())
    if match is None:
        raise ValueError(f"--since {text!r} is not a date: write it as YYYY-MM-DD")
    try:
        day = date(*(int(part) for part in match.groups()))
    except ValueError:
        raise ValueError(f"--since {text!r} is not a calendar date: write it as YYYY-MM-DD") from None
    return day.strftime("%Y%m%d")


_DIXON = ("fat_signal_fraction", "fat_grade")


def columns() -> list[str]:
    return ["patient_id", "accession", "study_date", "series_instance_uid", "job", "modality",
            *_span_columns(THORACIC_SPAN), "low_attenuation", *_span_columns(LUMBAR_SPAN), *_dixon_columns(LUMBAR_SPAN),
            *[f"{level}_bone_hu" for level in SPINE], "contrast", "bone_flag_level", "bone_flag",
            "liver_status", "liver_median_hu", "spleen_median_hu", "liver_minus_spleen_hu", "liver_flag",
            *CHANGE_COLUMNS]


# (column prefix, structure, side, quantity) of each change the worklist shows; "bone" is the flag vertebra's
_CHANGES = (("t1_t10_median_hu", "T1-T10", "combined", "muscle_median_hu"),
            ("t1_t10_volume_cm3", "T1-T10", "combined", "muscle_volume_cm3"),
            ("l1_l5_median_hu", "L1-L5", "combined", "muscle_median_hu"),
            ("l1_l5_volume_cm3", "L1-L5", "combined", "muscle_volume_cm3"),
            ("bone_hu", None, "", "bone_median_hu"),
            ("liver_median_hu", "liver", "", "liver_median_hu"))
CHANGE_COLUMNS = ["prior_study_date", "prior_comparable", "priors_checked",
                  *(f"{prefix}_{part}" for prefix, *_ in _CHANGES for part in ("change", "per_year", "significant"))]


def _dixon_columns(span: Span) -> list[str]:
    return [*(f"{level}_{name}" for level in span.levels for name in _DIXON),
            *(f"{_prefix(span)}_{name}" for name in _DIXON)]


def _span_columns(span: Span) -> list[str]:
    per_level = [f"{level}_{name}" for level in span.levels for name in ("median_hu", "volume_cm3", "status")]
    return [*per_level, *(f"{_prefix(span)}_{name}" for name in ("median_hu", "volume_cm3", "status", "levels"))]


def _prefix(span: Span) -> str:
    return span.name.lower().replace("-", "_")


def worklist_row(series: SeriesRecord, job_id: int, result: dict[str, Any], low_attenuation_hu: float) -> dict:
    """One worklist row; figures are the combined left+right muscle, None where not measured."""
    row: dict[str, Any] = {"patient_id": series.patient_id, "accession": series.accession,
                           "study_date": _iso_date(series.study_date), "series_instance_uid": series.series_uid,
                           "job": job_id, "modality": result.get("modality", "CT")}
    row.update(_span_cells(THORACIC_SPAN, result))
    row["low_attenuation"] = low_attenuation(row["t1_t10_median_hu"], low_attenuation_hu)
    row.update(_span_cells(LUMBAR_SPAN, result))
    row.update(_dixon_cells(LUMBAR_SPAN, result, row))
    row.update(_bone_and_liver(result))
    row.update(change_cells(result))
    return row


def _dixon_cells(span: Span, result: dict[str, Any], row: dict[str, Any]) -> dict[str, Any]:
    """An MR result's fat signal fraction and grade per level and for the span, where the level was measured."""
    cells: dict[str, Any] = dict.fromkeys(_dixon_columns(span))
    if result.get("modality") != "MR":
        return cells
    dixon = bool((result.get("fat") or {}).get("dixon"))
    levels = {level["level"]: level for level in result.get("levels", [])}
    measured = [(name, (levels.get(name) or {}).get("combined") or {}) for name in span.levels
                if row[f"{name}_status"] != str(LevelStatus.ABSENT)]
    if row[f"{_prefix(span)}_status"] != str(LevelStatus.ABSENT):
        measured.append((_prefix(span), (result.get(span.key) or {}).get("combined") or {}))
    for key, combined in measured:
        cells[f"{key}_fat_signal_fraction"] = combined.get("fat_signal_fraction")
        cells[f"{key}_fat_grade"] = combined.get("fat_grade") if dixon else NO_DIXON
    return cells


def change_cells(result: dict[str, Any]) -> dict[str, Any]:
    """Blank for results without a prior, and for those measured before the node compared."""
    priors = result.get("priors") or {}
    used = next((prior for prior in priors.get("found", []) if prior.get("used")), None)
    row: dict[str, Any] = {"prior_study_date": used["study_date"] if used else None,
                           "prior_comparable": used["comparable"] if used else None,
                           "priors_checked": priors.get("checked")}
    flag_level = (result.get("method") or {}).get("parameters", {}).get("bone_flag_level")
    changes = {(c["structure"], c["side"], c["quantity"]): c for c in result.get("change") or []}
    for prefix, structure, side, quantity in _CHANGES:
        change = changes.get((structure or flag_level, side, quantity), {})
        row[f"{prefix}_change"] = change.get("delta")
        row[f"{prefix}_per_year"] = change.get("per_year")
        row[f"{prefix}_significant"] = change.get("significant")
    return row


_OPERATORS: dict[str, Callable[[Any, Any], bool]] = {"<=": operator.le, ">=": operator.ge, "<": operator.lt,
                                                     ">": operator.gt, "=": operator.eq}


@dataclass(frozen=True)
class Condition:
    """`--where COLUMN<NUMBER` (or <=, >, >=, =): a row without a value in COLUMN never matches."""

    column: str
    compare: Callable[[Any, Any], bool]
    value: float

    def matches(self, row: dict[str, Any]) -> bool:
        cell = row.get(self.column)
        return isinstance(cell, int | float) and not isinstance(cell, bool) and self.compare(cell, self.value)


def parse_condition(text: str) -> Condition:
    match = re.fullmatch(r"\s*([a-z0-9_]+)\s*(<=|>=|<|>|=)\s*(-?[0-9.]+)\s*", text)
    if match is None or match.group(1) not in columns():
        raise ValueError(f"--where {text!r} is not COLUMN<NUMBER with a worklist column, e.g. "
                         "\"t1_t10_median_hu_per_year<-2\"")
    return Condition(match.group(1), _OPERATORS[match.group(2)], float(match.group(3)))


def select(rows: list[dict], conditions: list[Condition], sort: str | None = None) -> list[dict]:
    """Rows matching every condition, ordered by `sort` ("-COLUMN": descending), blanks last."""
    kept = [row for row in rows if all(condition.matches(row) for condition in conditions)]
    if sort:
        column = sort.lstrip("-")
        if column not in columns():
            raise ValueError(f"--sort {sort!r}: no worklist column {column!r}")
        filled = [row for row in kept if row.get(column) is not None]
        blank = [row for row in kept if row.get(column) is None]
        kept = sorted(filled, key=lambda row: row[column], reverse=sort.startswith("-")) + blank
    return kept


def _span_cells(span: Span, result: dict[str, Any]) -> dict[str, Any]:
    """A span's level and total cells; a level the result does not list counts as absent."""
    levels = {level["level"]: level for level in result.get("levels", [])}
    cells: dict[str, Any] = {}
    statuses = []
    for name in span.levels:
        level = levels.get(name, {})
        status = LevelStatus(level.get("status", LevelStatus.ABSENT))
        combined = {} if status is LevelStatus.ABSENT else level.get("combined") or {}
        cells[f"{name}_median_hu"] = combined.get("median_hu")
        cells[f"{name}_volume_cm3"] = combined.get("volume_cm3")
        cells[f"{name}_status"] = str(status)
        statuses.append((name, status))
    totals = coverage(statuses)
    total = {} if totals.status is LevelStatus.ABSENT else (result.get(span.key) or {}).get("combined") or {}
    prefix = _prefix(span)
    cells[f"{prefix}_median_hu"] = total.get("median_hu")
    cells[f"{prefix}_volume_cm3"] = total.get("volume_cm3")
    cells[f"{prefix}_status"] = str(totals.status)
    cells[f"{prefix}_levels"] = totals.describe()
    return cells


def _bone_and_liver(result: dict[str, Any]) -> dict[str, Any]:
    """Blank for results measured before the node reported bone and liver, and with the liver off."""
    vertebrae = {vertebra["level"]: vertebra for vertebra in result.get("vertebrae") or []}
    row: dict[str, Any] = {f"{level}_bone_hu": (vertebrae.get(level, {}).get("trabecular") or {}).get("median_hu")
                           for level in SPINE}
    enhanced = (result.get("contrast") or {}).get("enhanced", "missing")
    row["contrast"] = {True: "enhanced", False: "unenhanced", None: "unknown"}.get(enhanced)
    flag = result.get("bone_flag") or {}
    row["bone_flag_level"] = (result.get("method") or {}).get("parameters", {}).get("bone_flag_level")
    row["bone_flag"] = flag.get("state")
    liver = result.get("liver") or {}
    row["liver_status"] = liver.get("status")
    row["liver_median_hu"] = (liver.get("parenchyma") or {}).get("median_hu")
    row["spleen_median_hu"] = ((liver.get("spleen") or {}).get("parenchyma") or {}).get("median_hu")
    row["liver_minus_spleen_hu"] = liver.get("liver_minus_spleen_hu")
    row["liver_flag"] = (liver.get("flag") or {}).get("state")
    return row


def render(rows: list[dict], form: str) -> str:
    """`csv` (flag as yes/no, blanks for missing) or `json` (a list of objects)."""
    if form == "json":
        return json.dumps(rows, indent=2, ensure_ascii=False) + "\n"
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns(), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: _csv_cell(value) for key, value in row.items()})
    return buffer.getvalue()


def _csv_cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return round(value, 2)
    return value


def _iso_date(dicom_date: str) -> str:
    """DICOM DA (YYYYMMDD) as YYYY-MM-DD; anything else as it was sent."""
    return f"{dicom_date[:4]}-{dicom_date[4:6]}-{dicom_date[6:8]}" if re.fullmatch(r"\d{8}", dicom_date) else dicom_date


def trend_rows(results: list[tuple[SeriesRecord, int, dict[str, Any]]]) -> list[dict[str, Any]]:
    """`paraspinal-node trend`: one row per result, oldest first; no patient name anywhere."""
    rows = []
    for series, job_id, result in sorted(results, key=lambda r: (r[0].study_date, r[1])):
        thoracic = _span_cells(THORACIC_SPAN, result)
        bone = _bone_and_liver(result)
        flag_level = (result.get("method") or {}).get("parameters", {}).get("bone_flag_level")
        acquisition = result.get("acquisition") or {}
        change = change_cells(result)
        rows.append({"study_date": _iso_date(series.study_date), "job": job_id, "series": series.series_uid,
                     "contrast": bone["contrast"], "kvp": acquisition.get("kvp"),
                     "t1_t10_median_hu": thoracic["t1_t10_median_hu"], "t1_t10_volume_cm3": thoracic["t1_t10_volume_cm3"],
                     "bone_level": flag_level, "bone_hu": bone.get(f"{flag_level}_bone_hu"),
                     "prior": change["prior_study_date"], "comparable": change["prior_comparable"],
                     "t1_t10_hu_per_year": change["t1_t10_median_hu_per_year"],
                     "bone_hu_per_year": change["bone_hu_per_year"]})
    return rows
