"""DICOM identifiers and value helpers shared by the receiver, the watch folder and the CT loader (pydicom only)."""

from __future__ import annotations

from pydicom.multival import MultiValue

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"


def multi_values(value: object) -> list:
    """A DICOM value as a list: empty for absent or empty, one item for a single value."""
    if value is None or value == "":
        return []
    return list(value) if isinstance(value, (list, tuple, MultiValue)) else [value]
