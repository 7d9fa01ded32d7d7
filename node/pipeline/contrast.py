"""Was contrast medium given? Read from the CT header, because HU thresholds hold for unenhanced CT only.

The rules, first match wins (each names its source in the result):
  1. ContrastBolusAgent (0018,0010): a "none"-like value means unenhanced; a route
     (0018,1040) that is oral or rectal only means no intravascular contrast (bone and liver are
     not enhanced); any other agent means enhanced.
  2. ImageType (0008,0008) holding a value of `measure.contrast_image_type` (angiography,
     multi-energy iodine or virtual non-contrast images): enhanced.
  3. SeriesDescription (0008,103E), then StudyDescription (0008,1030), matching
     `measure.contrast_description_unenhanced`, then `measure.contrast_description_enhanced`
     (unenhanced first, so "non-contrast" or "sin contraste" is not read as "contrast"). The
     series' own words come first: a study described as native may hold an enhanced series.
  4. `measure.assume_unenhanced`: unenhanced, by the site's configuration.
  5. Otherwise unknown.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pydicom.dataset import Dataset

from node.config import MeasureConfig

_NO_AGENT = {"", "NONE", "NO", "N", "NIL", "NULL", "-", "0", "NATIVE", "NATIV", "NO CONTRAST", "WITHOUT", "N/A", "NA"}
_NOT_INTRAVASCULAR = {"ORAL", "PO", "PER OS", "RECTAL", "PR", "ENTERAL"}


@dataclass
class ContrastStatus:
    enhanced: bool | None  # None: unknown
    source: str  # ContrastBolusAgent, ContrastBolusRoute, ImageType, Series/StudyDescription, configuration or none
    detail: str  # the value the decision rests on, for the reader

    def why_not_assessed(self) -> str | None:
        """The reason an unenhanced-CT threshold cannot be applied, or None when it can."""
        if self.enhanced is None:
            return ("contrast status unknown (no ContrastBolusAgent, no rule matched the series description): "
                    "the threshold is defined for unenhanced CT")
        if self.enhanced:
            return f"contrast-enhanced series ({self.source}: {self.detail}): the threshold is defined for unenhanced CT"
        return None


def contrast_status(header: Dataset | None, rules: MeasureConfig) -> ContrastStatus:
    """`header` is any instance of the series (None for NIfTI input, which has no header)."""
    if header is not None:
        found_by = (_from_agent(header), _from_image_type(header, rules),
                    _from_description(header, "SeriesDescription", rules), _from_description(header, "StudyDescription", rules))
        for found in found_by:
            if found is not None:
                return found
    if rules.assume_unenhanced:
        return ContrastStatus(False, "configuration", "measure.assume_unenhanced = true")
    return ContrastStatus(None, "none", "no header evidence" if header is not None else "no DICOM header (NIfTI input)")


def _text(header: Dataset, keyword: str) -> str:
    return " ".join(str(header.get(keyword, "") or "").split())


def _from_agent(header: Dataset) -> ContrastStatus | None:
    if "ContrastBolusAgent" not in header:
        return None
    agent = _text(header, "ContrastBolusAgent")
    route = _text(header, "ContrastBolusRoute")
    if agent.upper() in _NO_AGENT:
        return ContrastStatus(False, "ContrastBolusAgent", agent or "empty") if agent else None
    if route.upper() in _NOT_INTRAVASCULAR:
        return ContrastStatus(False, "ContrastBolusRoute", f"{agent} by route {route}, not intravascular")
    return ContrastStatus(True, "ContrastBolusAgent", agent + (f" ({route})" if route else ""))


def _from_image_type(header: Dataset, rules: MeasureConfig) -> ContrastStatus | None:
    values = [str(v).strip().upper() for v in header.get("ImageType", []) or []]
    wanted = {v.upper() for v in rules.contrast_image_type}
    hits = [v for v in values if v in wanted]
    return ContrastStatus(True, "ImageType", "\\".join(hits)) if hits else None


def _from_description(header: Dataset, keyword: str, rules: MeasureConfig) -> ContrastStatus | None:
    description = _text(header, keyword)
    if not description:
        return None
    if rules.contrast_description_unenhanced and re.search(rules.contrast_description_unenhanced, description):
        return ContrastStatus(False, keyword, description)
    if rules.contrast_description_enhanced and re.search(rules.contrast_description_enhanced, description):
        return ContrastStatus(True, keyword, description)
    return None
