"""What every result object takes from the source CT: its images, patient and study, character set."""

from __future__ import annotations

import copy
from collections.abc import Iterable

import numpy as np
from pydicom.charset import python_encoding
from pydicom.dataset import Dataset

from node import __version__
from node.pipeline.ct import CTVolume, InputError

UTF8 = "ISO_IR 192"
# Type 2 attributes highdicom copies by attribute access; anonymisers often drop them.
TYPE2_DEFAULTS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber",
                  "StudyID", "StudyDate", "StudyTime", "ReferringPhysicianName")
TEXT_VRS = {"PN", "LO", "SH", "ST", "LT", "UT", "UC"}
POSITION_TOLERANCE = 0.5  # of a slice spacing: catches mis-sorted slices, tolerates loader-accepted jitter
ORIENTATION_TOLERANCE = 1e-3


def source_images(ct: CTVolume) -> list[Dataset]:
    """The CT datasets in `hu` order, checked to lie exactly on the CT grid.

    The first one is a copy with missing Type 2 patient/study attributes set empty, because
    highdicom reads them from it; the caller's datasets are not modified.
    """
    if not ct.datasets:
        raise InputError("DICOM results need the source CT series: give a DICOM folder, not a NIfTI file")
    _check_on_grid(ct)
    first = copy.copy(ct.datasets[0])
    for keyword in TYPE2_DEFAULTS:
        if keyword not in first:
            setattr(first, keyword, "")
    return [first, *ct.datasets[1:]]


def _check_on_grid(ct: CTVolume) -> None:
    """Frame k of a derived object must be source image k, pixel for pixel."""
    if len(ct.datasets) != ct.shape[0]:
        raise InputError(f"{len(ct.datasets)} source datasets for {ct.shape[0]} CT slices")
    expected_iop = np.concatenate([ct.direction[:, 0], ct.direction[:, 1]])
    step = ct.direction[:, 2] * ct.spacing[0]
    for k, ds in enumerate(ct.datasets):
        if (int(ds.Rows), int(ds.Columns)) != ct.shape[1:]:
            raise InputError(f"source image {k} is {ds.Rows}x{ds.Columns}, the CT grid {ct.shape[1:]}")
        if not np.allclose(np.asarray(ds.ImageOrientationPatient, float), expected_iop, atol=ORIENTATION_TOLERANCE):
            raise InputError(f"source image {k} is not oriented like the CT grid: in-plane axes were reordered")
        offset = np.asarray(ds.ImagePositionPatient, float) - (ct.origin + k * step)
        if np.linalg.norm(offset) > POSITION_TOLERANCE * ct.spacing[0]:
            raise InputError(f"source image {k} does not lie on CT slice {k}: datasets are not sorted like the voxels")


def character_set(source: Dataset, own_texts: Iterable[str]) -> str | list[str] | None:
    """Keep the source's character set when it encodes the copied and our own text, else use UTF-8.

    pydicom holds decoded text, so any set that encodes every value writes the same names back;
    keeping the source's set suits PACS that never saw UTF-8.
    """
    declared = source.get("SpecificCharacterSet")
    terms = [declared] if isinstance(declared, str) else list(declared or [])
    own = [text for text in own_texts if not text.isascii()]
    if len(terms) > 1:  # ISO 2022 code extensions encode the source's own values; ours only if ASCII
        return declared if not own else UTF8
    codec = python_encoding.get(terms[0], "ascii") if terms else "ascii"
    try:
        for text in [*_source_texts(source), *own]:
            text.encode(codec)
    except UnicodeEncodeError:
        return UTF8
    return declared


def _source_texts(source: Dataset) -> list[str]:
    texts = []
    for element in source.iterall():
        if element.VR in TEXT_VRS and element.value not in (None, ""):
            values = element.value if element.VM > 1 else [element.value]
            texts.extend(str(value) for value in values)
    return texts


def software_versions(result: dict) -> list[str]:
    """Both programs that shaped the numbers, for the Software Versions attribute."""
    totalseg = result.get("software", {}).get("totalsegmentator")
    node_version = result.get("software", {}).get("paraspinal_node") or __version__
    return [f"paraspinal-node {node_version}"] + ([f"TotalSegmentator {totalseg}"] if totalseg else [])
