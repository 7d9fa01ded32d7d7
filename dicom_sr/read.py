"""The node's own SR read back by code, as a time point to compare with (node.priors.change.Snapshot).

Only codes decide: the Finding (Deep muscle of back, Vertebral body, Parenchyma), the Finding
Site and its Laterality, the Measurement Method (all voxels; the lean window is skipped), the
Analysis Quality Rating (only complete structures are kept) and the NUMs Volume and Attenuation
Coefficient with derivation Median. Identity comes from the SR's patient module, the acquisition
from its Image Library entry (dicom_sr.timepoint), the method version from the Algorithm Name.
No text is parsed but that name; an SR from before these codes gives what it holds.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from pydicom.dataset import Dataset

from node.labels import SPANS
from node.pipeline.acquisition import Acquisition, Subject
from node.priors.change import Origin, Quantity, QuantityKey, Snapshot, SRReference

from . import codes

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
IMAGING_MEASUREMENTS = "126010"
IMAGE_LIBRARY = "111028"
FINDING = "121071"
FINDING_SITE = "363698007"
LATERALITY = "272741003"
METHOD = "370129005"
DERIVATION = "121401"
ALGORITHM_NAME = "111001"
SLICE_THICKNESS = "112225"
COMPLETE = codes.LEVEL_STATUS["complete"].value

_SITE_STRUCTURE = {code.value: level for level, code in codes.VERTEBRA.items()}
_SPAN_OF_SITE = {codes.span_site(span).value: span.name for span in SPANS}
_SIDE = {code.value: side for side, code in codes.LATERALITY.items()}
_ORGAN = {codes.LIVER.value: "liver"}
_VERSION = re.compile(r" v(\S+)$")
_SKIPPED = frozenset({"UIDREF", "IMAGE", "CONTAINER", "COMPOSITE"})  # tracking UID, segment, time point context
_COMPARED = frozenset({codes.VOLUME.value, codes.ATTENUATION.value})


def snapshot_from_sr(sr: Dataset, origin: Origin = Origin.PACS) -> Snapshot:
    """A result SR of this node as a Snapshot; raises ValueError when it is no TID 1500 report."""
    imaging = _child(sr, IMAGING_MEASUREMENTS)
    if imaging is None:
        raise ValueError(f"SR {sr.get('SOPInstanceUID', '?')} has no Imaging Measurements: not a TID 1500 report")
    values: dict[QuantityKey, float] = {}
    body_source = version = ""
    for group in imaging.get("ContentSequence", []):
        read = _group(group, want_version=not version)
        if read is None:
            continue
        finding, structure, side, method, complete, numbers, algorithm = read
        version = version or algorithm
        if finding == codes.VERTEBRAL_BODY.value:
            body_source = body_source or ("vertebrae_body" if method == codes.TRABECULAR_MASK.value else "whole_vertebra")
        if not complete or structure is None:
            continue
        for quantity, value in _quantities(finding, method, numbers):
            values[QuantityKey(structure, side, quantity)] = value
    return Snapshot(
        subject=Subject(_text(sr, "PatientID"), _text(sr, "IssuerOfPatientID"), _text(sr, "PatientBirthDate"),
                        _text(sr, "PatientSex")),
        acquisition=_acquisition(sr),
        contrast_enhanced=_contrast(sr),
        body_source=body_source,
        method_version=version,
        study_uid=_text(sr, "StudyInstanceUID"),
        series_uid=_source_series(sr),
        values=values,
        origin=origin,
        sr=SRReference(_text(sr, "StudyInstanceUID"), _text(sr, "SeriesInstanceUID"), _text(sr, "SOPInstanceUID"),
                       _text(sr, "SOPClassUID")),
    )


def _group(group: Dataset, want_version: bool):
    """(finding, structure, side, method, complete, [(name, derivation, value)], version) of one group.

    Nested sequences are what reading costs, so a lean-window group is left at its method and the
    algorithm is read only until its version is known.
    """
    finding = structure = method = None
    side, complete, version = "", False, ""
    numbers: list[tuple[str, str | None, float]] = []
    for item in group.get("ContentSequence", []):
        kind = item.ValueType
        if kind in _SKIPPED or (kind == "TEXT" and not want_version):
            continue
        concept = _concept(item)
        if kind == "NUM":
            number = _wanted_number(item, concept)
            if number is not None:
                numbers.append(number)
        elif concept == FINDING:
            finding = _value_code(item)
        elif concept == FINDING_SITE:
            site = _value_code(item)
            structure = _SITE_STRUCTURE.get(site) or _SPAN_OF_SITE.get(site) or _ORGAN.get(site)
            laterality = next((m for m in item.get("ContentSequence", []) if _concept(m) == LATERALITY), None)
            side = _SIDE.get(_value_code(laterality), "") if laterality is not None else ""
        elif concept == METHOD:
            method = _value_code(item)
            if method == codes.LEAN_WINDOW.value:
                return None
        elif concept == codes.ANALYSIS_QUALITY.value:
            complete = _value_code(item) == COMPLETE
        elif concept == ALGORITHM_NAME:
            match = _VERSION.search(str(item.TextValue))
            version, want_version = (match.group(1) if match else ""), False
    if finding is None:
        return None
    if finding == codes.DEEP_MUSCLE_OF_BACK.value and side == "":
        return None
    return finding, structure, side if finding == codes.DEEP_MUSCLE_OF_BACK.value else "", method, complete, numbers, \
        version


def _wanted_number(item: Dataset, concept: str) -> tuple[str, str | None, float] | None:
    """Volume, and the attenuation with its derivation; other NUMs are not read further."""
    if concept not in _COMPARED or not item.get("MeasuredValueSequence"):
        return None
    derivation = next((_value_code(m) for m in item.get("ContentSequence", []) if _concept(m) == DERIVATION), None)
    return concept, derivation, _measured(item)


def _quantities(finding: str, method: str | None, numbers: list[tuple[str, str | None, float]]):
    """The compared quantities a complete group holds."""
    median = next((v for name, derivation, v in numbers
                   if name == codes.ATTENUATION.value and derivation == codes.MEDIAN.value), None)
    volume = next((v for name, _, v in numbers if name == codes.VOLUME.value), None)
    if finding == codes.DEEP_MUSCLE_OF_BACK.value:
        if method != codes.ALL_VOXELS.value:
            return
        if median is not None:
            yield Quantity.MUSCLE_MEDIAN_HU, median
        if volume is not None:
            yield Quantity.MUSCLE_VOLUME_CM3, volume
    elif finding == codes.VERTEBRAL_BODY.value and median is not None:
        yield Quantity.BONE_MEDIAN_HU, median
    elif finding == codes.PARENCHYMA.value and median is not None:
        yield Quantity.LIVER_MEDIAN_HU, median


def _acquisition(sr: Dataset) -> Acquisition:
    descriptors = {_concept(item): item for item in _library_descriptors(sr)}
    thickness, kvp, kernel = descriptors.get(SLICE_THICKNESS), descriptors.get(codes.KVP.value), \
        descriptors.get(codes.CONVOLUTION_KERNEL.value)
    return Acquisition(_text(sr, "StudyDate"), _number(kvp), _number(thickness),
                       str(kernel.TextValue) if kernel is not None else None)


def _contrast(sr: Dataset) -> bool | None:
    item = next((i for i in _library_descriptors(sr) if _concept(i) == codes.CONTRAST_STATUS.value), None)
    value = _value_code(item) if item is not None else None
    return {codes.CONTRAST[True].value: True, codes.CONTRAST[False].value: False}.get(value or "")


def _library_descriptors(sr: Dataset) -> Iterator[Dataset]:
    library = _child(sr, IMAGE_LIBRARY)
    for group in library.get("ContentSequence", []) if library is not None else []:
        for image in group.get("ContentSequence", []):
            if image.ValueType == "IMAGE":
                yield from image.get("ContentSequence", [])
                return


def _source_series(sr: Dataset) -> str:
    """The CT series the SR measured: the evidence series of CT images in its own study."""
    for study in sr.get("CurrentRequestedProcedureEvidenceSequence", []):
        for series in study.get("ReferencedSeriesSequence", []):
            instances = series.get("ReferencedSOPSequence", [])
            if instances and str(instances[0].ReferencedSOPClassUID) == CT_IMAGE_STORAGE:
                return str(series.SeriesInstanceUID)
    return ""


def _child(sr: Dataset, code: str) -> Dataset | None:
    return next((item for item in sr.get("ContentSequence", []) if _concept(item) == code), None)


def _concept(item: Dataset) -> str:
    names = item.get("ConceptNameCodeSequence")
    return str(names[0].CodeValue) if names else ""


def _value_code(item: Dataset) -> str:
    values = item.get("ConceptCodeSequence")
    return str(values[0].CodeValue) if values else ""


def _number(item: Dataset | None) -> float | None:
    if item is None or not item.get("MeasuredValueSequence"):
        return None
    return _measured(item)


def _measured(item: Dataset) -> float:
    """The exact double where the SR has one (Floating Point Value), else the decimal string."""
    measured = item.MeasuredValueSequence[0]
    exact = measured.get("FloatingPointValue")
    return float(exact if exact is not None else measured.NumericValue)


def _text(ds: Dataset, keyword: str) -> str:
    return str(ds.get(keyword, "") or "").strip()
