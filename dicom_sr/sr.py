"""The TID 1500 Measurement Report (Comprehensive 3D SR) carrying every number of the measurement.

Groups, in this order: one volumetric group per level and side referencing SEG segment i
(i = 1..20, through the source series, not by embedding every image), one group per level
for both sides, and the T1–T10 totals for left, right and both sides. Every group carries
the same measurements in the same order (MEASUREMENTS); a statistic of an empty mask is a
NUM without value, qualified "Value indeterminate".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
from highdicom.sr import (
    AlgorithmIdentification,
    CodedConcept,
    Comprehensive3DSR,
    FindingSite,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    QualitativeEvaluation,
    ReferencedSegment,
    SourceSeriesForSegmentation,
    TrackingIdentifier,
    VolumetricROIMeasurementsAndQualitativeEvaluations,
)
from pydicom.dataset import Dataset

from node import __version__
from node.labels import MEASURED_LEVELS
from node.pipeline.ct import CTVolume

from . import codes
from .options import EncodeOptions
from .seg import SIDES, muscle_segment_number
from .study import character_set, software_versions, source_images


@dataclass(frozen=True)
class MeasurementSpec:
    """One row of every group: where its value sits in a side's statistics dict."""

    name: CodedConcept
    unit: CodedConcept
    derivation: CodedConcept | None
    lean: bool
    key: str

    def value(self, stats: dict) -> float | None:
        return (stats["lean"] if self.lean else stats)[self.key]


def _rows(lean: bool) -> list[MeasurementSpec]:
    hu = [(codes.MEAN, "mean_hu"), (codes.MEDIAN, "median_hu"), (codes.STANDARD_DEVIATION, "sd_hu"),
          (codes.PERCENTILE_25, "p25_hu"), (codes.PERCENTILE_75, "p75_hu")]
    return [MeasurementSpec(codes.VOLUME, codes.CUBIC_CENTIMETER, None, lean, "volume_cm3")] + [
        MeasurementSpec(codes.ATTENUATION, codes.HOUNSFIELD_UNIT, derivation, lean, key) for derivation, key in hu
    ]


MEASUREMENTS: tuple[MeasurementSpec, ...] = (
    *_rows(lean=False),
    *_rows(lean=True),
    MeasurementSpec(codes.FAT_FRACTION, codes.NO_UNITS, None, False, "fat_fraction"),
)


def build_sr(ct: CTVolume, seg: Dataset, result: dict, options: EncodeOptions) -> Comprehensive3DSR:
    """`seg` is the SEG from build_seg: the volumetric groups reference its segments 1..20."""
    sources = source_images(ct)
    algorithm = _algorithm(result)
    series_uid = sources[0].SeriesInstanceUID
    groups: list = [
        _volumetric_group(result, level, side, seg, series_uid, algorithm) for level in MEASURED_LEVELS for side in SIDES
    ]
    groups += [_plain_group(result, level, "combined", algorithm) for level in MEASURED_LEVELS]
    groups += [_plain_group(result, None, side, algorithm) for side in ("left", "right", "combined")]
    report = MeasurementReport(
        observation_context=_observation_context(options),
        procedure_reported=codes.PROCEDURE_CT_CHEST,
        imaging_measurements=groups,
    )
    document = Comprehensive3DSR(
        evidence=[*sources, seg],
        content=report[0],
        series_instance_uid=hd.UID(),
        series_number=options.sr_series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=options.manufacturer,
        is_complete=True,
        series_description=options.sr_series_description,
        institution_name=options.institution_name,
        software_versions=software_versions(result),
        coding_schemes=[codes.PRIVATE_SCHEME_ITEM],
        specific_character_set=character_set(sources[0], (*options.texts(), *_result_texts(result))),
    )
    _empty_indeterminate_values(document.ContentSequence)
    return document


def _observation_context(options: EncodeOptions) -> ObservationContext:
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=hd.UID(), name="paraspinal-node", manufacturer_name=options.manufacturer, model_name="paraspinal-node",
    )
    return ObservationContext(
        observer_device_context=hd.sr.ObserverContext(observer_type=hd.sr.CodedConcept("121007", "DCM", "Device"),
                                                       observer_identifying_attributes=device),
    )


def _algorithm(result: dict) -> AlgorithmIdentification:
    """The method and every parameter, so a reader can recompute the numbers.

    Three parameter items (numbers, segmentation, reference) rather than one per parameter:
    the algorithm is repeated in all 33 groups and each SR content item costs encoding time.
    """
    method = result.get("method", {})
    totalseg = result.get("software", {}).get("totalsegmentator") or "unknown"
    numbers = "; ".join(f"{key}={value}" for key, value in method.get("parameters", {}).items())
    parameters = [
        numbers,
        f"segmentation=TotalSegmentator {totalseg} task total; vertebral_body_source="
        f"{method.get('vertebral_body_source')}; SEG draws a slice shared by two slabs in the upper level only, "
        "these numbers count it in both",
        f"reference={method.get('reference', '')}",
    ]
    return AlgorithmIdentification(
        name=f"paraspinal-node {method.get('name', 'seed')} method",
        version=result.get("software", {}).get("paraspinal_node") or __version__,
        parameters=parameters,
        family=codes.ARTIFICIAL_INTELLIGENCE,
    )


def _result_texts(result: dict) -> list[str]:
    return [str(value) for value in result.get("method", {}).get("parameters", {}).values()] + [
        str(result.get("method", {}).get("reference", ""))
    ]


def _volumetric_group(result: dict, level: str, side: str, seg: Dataset, series_uid: str,
                      algorithm: AlgorithmIdentification) -> VolumetricROIMeasurementsAndQualitativeEvaluations:
    entry = _level(result, level)
    segment = ReferencedSegment(
        sop_class_uid=seg.SOPClassUID,
        sop_instance_uid=seg.SOPInstanceUID,
        segment_number=muscle_segment_number(level, side),
        source_series=SourceSeriesForSegmentation(series_uid),
    )
    return VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(identifier=tracking_label(level, side), uid=hd.UID()),
        referenced_segment=segment,
        finding_type=codes.DEEP_MUSCLE_OF_BACK,
        finding_sites=[_site(side)],
        algorithm_id=algorithm,
        measurements=_measurements(entry[side]),
        qualitative_evaluations=[_status(entry["status"])],
    )


def _plain_group(result: dict, level: str | None, side: str,
                 algorithm: AlgorithmIdentification) -> MeasurementsAndQualitativeEvaluations:
    """Both-sides and T1–T10 values are unions of segments, so no single segment is referenced."""
    if level is None:
        stats, evaluations = result["total"][side], _qc(result)
    else:
        entry = _level(result, level)
        stats, evaluations = entry[side], [_status(entry["status"])]
    return MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(identifier=tracking_label(level, side), uid=hd.UID()),
        finding_type=codes.DEEP_MUSCLE_OF_BACK,
        finding_sites=[_site(side)],
        algorithm_id=algorithm,
        measurements=_measurements(stats),
        qualitative_evaluations=evaluations or None,
    )


def tracking_label(level: str | None, side: str) -> str:
    """Readers find a group by this text: "T3 paraspinal muscle left", "T1-T10 paraspinal muscle combined"."""
    return f"{level or 'T1-T10'} paraspinal muscle {side}"


def _level(result: dict, level: str) -> dict:
    return next(entry for entry in result["levels"] if entry["level"] == level)


def _site(side: str) -> FindingSite:
    """The muscle with its side; the level is the tracking identifier and the referenced segment."""
    return FindingSite(anatomic_location=codes.DEEP_MUSCLE_OF_BACK, laterality=codes.LATERALITY[side])


def _status(status: str) -> QualitativeEvaluation:
    return QualitativeEvaluation(name=codes.ANALYSIS_QUALITY, value=codes.LEVEL_STATUS[status])


def _qc(result: dict) -> list[QualitativeEvaluation]:
    return [QualitativeEvaluation(name=codes.QUALITY_ASSESSMENT, value=codes.qc_finding(item["code"])) for item in result.get("qc", [])]


def _measurements(stats: dict) -> list[Measurement]:
    return [_measurement(spec, spec.value(stats)) for spec in MEASUREMENTS]


def _measurement(spec: MeasurementSpec, value: float | None) -> Measurement:
    """highdicom needs a number; a null gets a placeholder that _empty_indeterminate_values removes."""
    return Measurement(
        name=spec.name,
        value=0.0 if value is None else float(value),
        unit=spec.unit,
        qualifier=codes.VALUE_INDETERMINATE if value is None else None,
        derivation=spec.derivation,
        method=codes.LEAN_WINDOW if spec.lean else None,
    )


def _empty_indeterminate_values(items: Sequence[Dataset]) -> None:
    """PS3.3 C.18.1: no value is an empty Measured Value Sequence plus a qualifier saying why.

    A placeholder 0 would read as 0 HU to any reader that ignores qualifiers.
    """
    for item in items:
        qualifier = item.get("NumericValueQualifierCodeSequence")
        if item.get("ValueType") == "NUM" and qualifier and qualifier[0].CodeValue == codes.VALUE_INDETERMINATE.value:
            item.MeasuredValueSequence = []
        _empty_indeterminate_values(item.get("ContentSequence", []))
