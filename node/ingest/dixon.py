"""Which image of a Dixon acquisition a series holds, from its header alone (pydicom-free values).

Used where series are received (to pair the water and fat series of one acquisition into one
job) and where they are loaded (to find the partner again), so both agree. The role comes from
ImageType first, as the vendors' conformance statements define it:

- Siemens and GE: `DERIVED\\PRIMARY\\DIXON\\WATER` (FAT, IN_PHASE, OPP_PHASE; GE also InPhase/OutPhase);
- Philips classic: a value `W`, `F`, `IP` or `OP` after the first two (`ORIGINAL\\PRIMARY\\W\\W`);

and else from the series description: Siemens suffixes `_W`, `_F`, `_in`, `_opp`, GE prefixes
`WATER:`, `FAT:`, or the words themselves.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4.1"


class DixonRole(enum.Enum):
    WATER = "water"
    FAT = "fat"
    IN_PHASE = "in_phase"
    OUT_PHASE = "out_phase"
    NONE = "none"  # not a Dixon image: a T1- or T2-weighted series, say


_IMAGE_TYPE_TOKENS = {
    "WATER": DixonRole.WATER, "W": DixonRole.WATER,
    "FAT": DixonRole.FAT, "F": DixonRole.FAT,
    "IN_PHASE": DixonRole.IN_PHASE, "INPHASE": DixonRole.IN_PHASE, "IP": DixonRole.IN_PHASE,
    "OPP_PHASE": DixonRole.OUT_PHASE, "OUT_PHASE": DixonRole.OUT_PHASE, "OUTPHASE": DixonRole.OUT_PHASE,
    "OP": DixonRole.OUT_PHASE,
}
_SHORT_TOKENS = {"W", "F", "IP", "OP"}  # Philips: only after ORIGINAL/DERIVED\PRIMARY, never value 1 or 2
_DESCRIPTIONS = (
    (re.compile(r"(?i)(^|[\s_:-])(water|wasser)\b|_w$|^w:"), DixonRole.WATER),
    (re.compile(r"(?i)(^|[\s_:-])(fat|fett)\b(?![\s_-]*(sat|supp|sup\b))|_f$|^f:"), DixonRole.FAT),  # not "fat sat"
    (re.compile(r"(?i)in[\s_-]?phase|_in$|\bip$"), DixonRole.IN_PHASE),
    (re.compile(r"(?i)(opp|out)[\s_-]?(osed[\s_-]?)?phase|_opp$|\bop$"), DixonRole.OUT_PHASE),
)


def dixon_role(image_type: Sequence[str], description: str) -> DixonRole:
    """The series' Dixon role; ImageType decides when it names one, the description otherwise."""
    values = [str(value).strip().upper() for value in image_type]
    for index, value in enumerate(values):
        role = _IMAGE_TYPE_TOKENS.get(value.replace(" ", "_"))
        if role is not None and (index >= 2 or value not in _SHORT_TOKENS):
            return role
    for pattern, role in _DESCRIPTIONS:
        if pattern.search(description.strip()):
            return role
    return DixonRole.NONE
