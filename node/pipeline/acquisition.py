"""Who was scanned and how: the header facts a later comparison needs (identity, date, kVp, thickness, kernel).

Read once when measuring and kept in measurements.json, so that a result in the node's state can
be compared with a later one without its images. The patient's name is never read.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.dataset import Dataset


@dataclass(frozen=True)
class Subject:
    """The patient identity two results must share before they are compared."""

    patient_id: str
    issuer_of_patient_id: str
    birth_date: str  # DICOM DA, "" when not sent
    sex: str


@dataclass(frozen=True)
class Acquisition:
    """When and how the CT was acquired; what makes two results comparable besides contrast."""

    study_date: str  # DICOM DA
    kvp: float | None
    slice_thickness_mm: float | None
    convolution_kernel: str | None


def subject_of(header: Dataset | None) -> Subject:
    if header is None:
        return Subject("", "", "", "")
    return Subject(_text(header, "PatientID"), _text(header, "IssuerOfPatientID"), _text(header, "PatientBirthDate"),
                   _text(header, "PatientSex"))


def acquisition_of(header: Dataset | None, slice_thickness_mm: float | None) -> Acquisition:
    """`slice_thickness_mm` as the loader decided it (SliceThickness, else the slice spacing)."""
    if header is None:
        return Acquisition("", None, slice_thickness_mm, None)
    kernel = header.get("ConvolutionKernel")
    if kernel is not None and not isinstance(kernel, str):  # multi-valued: "FC13\\AIDR"
        kernel = "\\".join(str(part) for part in kernel)
    return Acquisition(_text(header, "StudyDate"), _number(header.get("KVP")), slice_thickness_mm,
                       str(kernel).strip() or None if kernel is not None else None)


def _text(header: Dataset, keyword: str) -> str:
    return str(header.get(keyword, "") or "").strip()


def _number(value: object) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None
