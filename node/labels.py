"""Vertebral levels as data, and TotalSegmentator's `total` label numbering.

Levels T1–T12 and L1–L5 and the spans that are totalled (T1–T10, L1–L5) are the same for every
modality; which levels a series reports is chosen per protocol (node.config `[[protocols]]`).
The label numbers match `totalsegmentator.map_to_binary.class_map["total"]` (checked in tests),
so that masks from any TotalSegmentator run can be read without importing it.
"""

from __future__ import annotations

from dataclasses import dataclass

THORACIC: tuple[str, ...] = tuple(f"T{n}" for n in range(1, 13))
LUMBAR: tuple[str, ...] = tuple(f"L{n}" for n in range(1, 6))
SPINE: tuple[str, ...] = (*THORACIC, *LUMBAR)  # cranio-caudal: every level the node can measure


@dataclass(frozen=True)
class Span:
    """Contiguous levels whose muscle is totalled over the union of their slabs.

    `key` names the total in measurements.json; `region` says which spine it spans, for the codes.
    """

    name: str
    levels: tuple[str, ...]
    key: str
    region: str


THORACIC_SPAN = Span("T1-T10", THORACIC[:10], "total", "thoracic")  # the MESA seed method's levels
LUMBAR_SPAN = Span("L1-L5", LUMBAR, "lumbar_total", "lumbar")
SPANS: tuple[Span, ...] = (THORACIC_SPAN, LUMBAR_SPAN)
MEASURED_LEVELS: tuple[str, ...] = THORACIC_SPAN.levels  # the chest protocol's levels
SPINE_LEVELS: tuple[str, ...] = (*THORACIC, "L1")  # trabecular bone listed on chest CT even when absent


def span_of(level: str) -> Span | None:
    """The span whose total includes `level`; None for T11 and T12."""
    return next((span for span in SPANS if level in span.levels), None)


def spine_order(levels) -> tuple[str, ...]:
    """`levels` without repeats, cranial first."""
    wanted = set(levels)
    return tuple(level for level in SPINE if level in wanted)


VERTEBRA_LABEL: dict[str, int] = {**{f"T{n}": 44 - n for n in range(1, 13)}, **{f"L{n}": 32 - n for n in range(1, 6)}}
AUTOCHTHON_LEFT = 86
AUTOCHTHON_RIGHT = 87
LIVER = 5
SPLEEN = 1

CLASS_LABEL: dict[str, int] = {
    **{f"vertebrae_{level}": label for level, label in VERTEBRA_LABEL.items()},
    "autochthon_left": AUTOCHTHON_LEFT,
    "autochthon_right": AUTOCHTHON_RIGHT,
    "liver": LIVER,
    "spleen": SPLEEN,
}
ORGAN_CLASSES: tuple[str, ...] = ("liver", "spleen")  # part 291 of `total`; segmented only with [biomarkers] liver
# Part 292 holds every vertebra and 294 the whole autochthon (no level split), so T1–L5 runs those two.
ROI_SUBSET: tuple[str, ...] = tuple(name for name in CLASS_LABEL if name not in ORGAN_CLASSES)
BODY_CLASS = "vertebrae_body"
SACRUM = 25  # `total` numbering; on MR it comes from vertebrae_mr
DISCS_CLASS = "intervertebral_discs"  # not in `total`: on MR a mask of its own (Segmentation.discs)

# MR (node.pipeline.mr_measure): total_mr gives the autochthon and the discs, vertebrae_mr each vertebra
# and the sacrum (total_mr has all vertebrae as one label). Read into the same `total` numbering.
MR_CLASS_LABEL: dict[str, int] = {
    **{f"vertebrae_{level}": label for level, label in VERTEBRA_LABEL.items()},
    "sacrum": SACRUM,
    "autochthon_left": AUTOCHTHON_LEFT,
    "autochthon_right": AUTOCHTHON_RIGHT,
}
# total_mr's roi_subset: the autochthon is in part 851, the discs in part 850.
MR_ROI_SUBSET: tuple[str, ...] = ("autochthon_left", "autochthon_right", DISCS_CLASS)


def roi_subset(liver: bool) -> tuple[str, ...]:
    """TotalSegmentator's roi_subset: the organs add part 291 to the parts that run (292, 294)."""
    return ROI_SUBSET + ORGAN_CLASSES if liver else ROI_SUBSET
