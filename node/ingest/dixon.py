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

from node.ingest.dicom import CT_IMAGE_STORAGE

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4.1"
RETRY_S = 5.0  # how often a held water series looks for its fat series again


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


def series_role(modality: str, image_type: Sequence[str], description: str) -> DixonRole:
    """Only MR series have a Dixon role (a CT described as "fat" is a CT)."""
    return dixon_role(image_type, description) if modality.upper() == "MR" else DixonRole.NONE


def spooled_sop_classes(modalities: Sequence[str]) -> tuple[str, ...]:
    """What the receiver keeps: CT Image Storage, and MR Image Storage when selection.modalities holds MR."""
    return (CT_IMAGE_STORAGE, *((MR_IMAGE_STORAGE,) if "MR" in {m.upper() for m in modalities} else ()))


class DixonPairing:
    """Makes the water and fat series of one Dixon acquisition one job, keyed on the water series.

    The fat, in-phase and out-phase series become skipped jobs that say so; the worker finds the fat
    series beside the water series (node.pipeline.mr_load). A water series completed before its
    study's fat series is held while a fat series of its study is still arriving, and otherwise at
    most `wait_s` (completion.dixon_partner_wait_s); after that it is measured without Dixon.
    """

    def __init__(self, wait_s: float) -> None:
        self.wait_s = wait_s
        self._held_since: dict[str, float] = {}
        self._fat_done: set[str] = set()  # studies whose fat series completed since this serve started

    def hold_until(self, series_uid: str, study_uid: str, role: DixonRole, fat_in_flight: bool, now: float) -> float | None:
        """When to look at a completed water series again; None: queue it now."""
        if role is not DixonRole.WATER or study_uid in self._fat_done:
            self._held_since.pop(series_uid, None)
            return None
        since = self._held_since.setdefault(series_uid, now)
        if fat_in_flight or now - since < self.wait_s:
            return now + min(RETRY_S, self.wait_s)
        del self._held_since[series_uid]
        return None

    def finished(self, study_uid: str, role: DixonRole) -> None:
        if role is DixonRole.FAT:
            self._fat_done.add(study_uid)


def skip_reason(role: DixonRole) -> str | None:
    """Dixon images other than water are measured with their water series, never alone."""
    if role in (DixonRole.FAT, DixonRole.IN_PHASE, DixonRole.OUT_PHASE):
        return f"Dixon {role.value.replace('_', '-')} image: measured with the water series of its acquisition"
    return None
