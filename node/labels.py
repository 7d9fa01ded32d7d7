"""TotalSegmentator `total` label numbering and the level names this node measures.

The numbers match `totalsegmentator.map_to_binary.class_map["total"]` (checked in tests),
so that masks from any TotalSegmentator run can be read without importing it.
"""

THORACIC: tuple[str, ...] = tuple(f"T{n}" for n in range(1, 13))
MEASURED_LEVELS: tuple[str, ...] = THORACIC[:10]
SPINE_LEVELS: tuple[str, ...] = (*THORACIC, "L1")  # trabecular bone is measured at each of these

VERTEBRA_LABEL: dict[str, int] = {**{f"T{n}": 44 - n for n in range(1, 13)}, "L1": 31}
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
ROI_SUBSET: tuple[str, ...] = tuple(name for name in CLASS_LABEL if name not in ORGAN_CLASSES)
BODY_CLASS = "vertebrae_body"


def roi_subset(liver: bool) -> tuple[str, ...]:
    """TotalSegmentator's roi_subset: the organs add part 291 to the parts that run (292, 294)."""
    return ROI_SUBSET + ORGAN_CLASSES if liver else ROI_SUBSET
