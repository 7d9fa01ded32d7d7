"""TotalSegmentator `total` label numbering and the level names this node measures.

The numbers match `totalsegmentator.map_to_binary.class_map["total"]` (checked in tests),
so that masks from any TotalSegmentator run can be read without importing it.
"""

THORACIC: tuple[str, ...] = tuple(f"T{n}" for n in range(1, 13))
MEASURED_LEVELS: tuple[str, ...] = THORACIC[:10]

VERTEBRA_LABEL: dict[str, int] = {f"T{n}": 44 - n for n in range(1, 13)}
AUTOCHTHON_LEFT = 86
AUTOCHTHON_RIGHT = 87

CLASS_LABEL: dict[str, int] = {
    **{f"vertebrae_{level}": label for level, label in VERTEBRA_LABEL.items()},
    "autochthon_left": AUTOCHTHON_LEFT,
    "autochthon_right": AUTOCHTHON_RIGHT,
}
ROI_SUBSET: tuple[str, ...] = tuple(CLASS_LABEL)
BODY_CLASS = "vertebrae_body"
