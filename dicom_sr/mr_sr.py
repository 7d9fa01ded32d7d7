"""The TID 1500 report of an MR measurement: volume, area and Dixon fat per level, side and span.

The groups are the CT report's (dicom_sr.sr): one volumetric group per level and side
referencing its SEG segment, one per level for both sides, each span's totals, with the same
Finding (Deep muscle of back), Finding Site (the level's vertebra with its Laterality) and
Analysis Quality Rating, so a reader finds a level and side by the same codes on CT and MR.
Each group holds Volume (cm3), Area (cm2, mean cross-sectional) and, with Dixon, the fat signal
fraction ΣF/Σ(F+W), the median voxel fat fraction and the fat area fraction, all as
"Fat fraction" in UCUM % told apart by derivation, and the simplified Goutallier grade as a
coded qualitative evaluation; without Dixon the grade reads "Not assessed: no Dixon".
"""

from __future__ import annotations

from dataclasses import dataclass

import highdicom as hd
from highdicom.sr import (
    AlgorithmIdentification,
    CodedConcept,
    Comprehensive3DSR,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    QualitativeEvaluation,
    ReferencedSegment,
    SourceSeriesForSegmentation,
    TrackingIdentifier,
    VolumetricROIMeasurementsAndQualitativeEvaluations,
)
from pydicom.dataset import Dataset

from node.pipeline.ct import CTVolume
from node.pipeline.mr_measure import DixonStats, MRLevelResult, MRMeasurementResult, MRSides, MRSpanTotal
from node.screening import LevelStatus

from . import codes
from .encoding import comprehensive_3d_sr
from .options import MANUFACTURER, EncodeOptions
from .seg import SIDES, muscle_levels, muscle_segment_number
from .sr import ALL_SIDES, _observation_context, _rating, _site, span_coverage, tracking_label
from .study import character_set, copy_patient_and_study, software_versions, source_images


@dataclass(frozen=True)
class MRMeasurementSpec:
    name: CodedConcept
    unit: CodedConcept
    derivation: CodedConcept | None
    key: str  # the DixonStats field
    scale: float = 1.0  # fractions 0-1 are written in percent

    def value(self, stats: DixonStats) -> float | None:
        value = getattr(stats, self.key)
        return None if value is None else float(value) * self.scale


MR_MEASUREMENTS = (
    MRMeasurementSpec(codes.VOLUME, codes.CUBIC_CENTIMETER, None, "volume_cm3"),
    MRMeasurementSpec(codes.AREA, codes.SQUARE_CENTIMETER, codes.MEAN, "area_cm2"),
    MRMeasurementSpec(codes.FAT_FRACTION, codes.PERCENT, codes.FAT_SIGNAL_RATIO, "fat_signal_fraction", 100.0),
    MRMeasurementSpec(codes.FAT_FRACTION, codes.PERCENT, codes.MEDIAN, "median_fat_fraction", 100.0),
    MRMeasurementSpec(codes.FAT_FRACTION, codes.PERCENT, codes.FAT_AREA_FRACTION, "fat_area_fraction", 100.0),
)


def side_stats(sides: MRSides | MRLevelResult, side: str) -> DixonStats:
    return {"left": sides.left, "right": sides.right, "combined": sides.combined}[side]


def build_mr_sr(image: CTVolume, seg: Dataset, result: MRMeasurementResult, options: EncodeOptions) -> Comprehensive3DSR:
    sources = source_images(image)
    algorithm = _algorithm(result)
    order = muscle_levels(result)
    method = codes.DIXON_MUSCLE if result.fat.dixon else codes.MUSCLE_MASK
    series_uid = str(sources[0].SeriesInstanceUID)
    groups: list = [_volumetric_group(level, side, seg, series_uid, order, method, algorithm, result)
                    for level in result.levels for side in SIDES]
    groups += [_level_group(level, method, algorithm, result) for level in result.levels]
    groups += [_total_group(result, total, side, method, algorithm, with_qc=i == 0)
               for i, total in enumerate(result.totals) for side in ALL_SIDES]
    report = MeasurementReport(observation_context=_observation_context(), procedure_reported=_procedure(sources[0]),
                               imaging_measurements=groups)
    settings = options.results
    document = comprehensive_3d_sr(
        evidence=[*sources, seg], content=report[0], series_instance_uid=hd.UID(),
        series_number=settings.sr_series_number, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer=MANUFACTURER, is_complete=True, series_description=settings.sr_series_description,
        institution_name=options.institution_name, software_versions=software_versions(result.software),
        coding_schemes=[codes.PRIVATE_SCHEME_ITEM],
        specific_character_set=character_set(sources[0], (*options.texts(), _parameters(result))),
    )
    copy_patient_and_study(image.datasets[0], document)
    return document


def _procedure(source: Dataset) -> CodedConcept:
    procedure = source.get("ProcedureCodeSequence")
    if procedure and procedure[0].get("CodeValue") and procedure[0].get("CodingSchemeDesignator"):
        item = procedure[0]
        return CodedConcept(str(item.CodeValue), str(item.CodingSchemeDesignator), str(item.get("CodeMeaning", "")))
    return codes.PROCEDURE_MR


def _parameters(result: MRMeasurementResult) -> str:
    method, fat = result.method, result.fat
    numbers = "; ".join(f"{key}={value}" for key, value in method.parameters.items())
    return (f"{numbers}; segmentation=TotalSegmentator {result.software.totalsegmentator or 'unknown'} tasks "
            f"total_mr and vertebrae_mr; grade={fat.grade_rule} of {fat.grade_metric}; "
            f"fat_series={fat.fat_series_instance_uid or 'none'}; caveat={fat.caveat}; reference={method.reference}")


def _algorithm(result: MRMeasurementResult) -> AlgorithmIdentification:
    return AlgorithmIdentification(name=f"paraspinal-node {result.method.name} method",
                                   version=result.software.paraspinal_node, parameters=[_parameters(result)],
                                   family=codes.ARTIFICIAL_INTELLIGENCE)


def _volumetric_group(level: MRLevelResult, side: str, seg: Dataset, series_uid: str, order: tuple[str, ...],
                      method: CodedConcept, algorithm: AlgorithmIdentification,
                      result: MRMeasurementResult) -> VolumetricROIMeasurementsAndQualitativeEvaluations:
    segment = ReferencedSegment(sop_class_uid=seg.SOPClassUID, sop_instance_uid=seg.SOPInstanceUID,
                                segment_number=muscle_segment_number(level.level, side, order),
                                source_series=SourceSeriesForSegmentation(series_uid))
    stats = side_stats(level, side)
    return VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(identifier=tracking_label(level.level, side), uid=hd.UID()),
        referenced_segment=segment,
        finding_type=codes.DEEP_MUSCLE_OF_BACK,
        finding_sites=[_site(codes.VERTEBRA[level.level], side)],
        method=method,
        algorithm_id=algorithm,
        measurements=_measurements(stats, level.status),
        qualitative_evaluations=_evaluations(stats, level.status, result),
    )


def _level_group(level: MRLevelResult, method: CodedConcept, algorithm: AlgorithmIdentification,
                 result: MRMeasurementResult) -> MeasurementsAndQualitativeEvaluations:
    return MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(identifier=tracking_label(level.level, "combined"), uid=hd.UID()),
        finding_type=codes.DEEP_MUSCLE_OF_BACK,
        finding_sites=[_site(codes.VERTEBRA[level.level], "combined")],
        method=method,
        algorithm_id=algorithm,
        measurements=_measurements(level.combined, level.status),
        qualitative_evaluations=_evaluations(level.combined, level.status, result),
    )


def _total_group(result: MRMeasurementResult, total: MRSpanTotal, side: str, method: CodedConcept,
                 algorithm: AlgorithmIdentification, with_qc: bool) -> MeasurementsAndQualitativeEvaluations:
    totals = span_coverage(result, total.span)
    stats = side_stats(total.sides, side)
    evaluations = _evaluations(stats, totals.status, result)
    evaluations += [QualitativeEvaluation(name=codes.INCLUDED_LEVEL, value=codes.VERTEBRA[level]) for level in totals.included]
    if with_qc and side == "combined":
        evaluations += [QualitativeEvaluation(name=codes.QUALITY_ASSESSMENT, value=codes.qc_finding(item.code))
                        for item in result.qc]
    return MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(identifier=tracking_label(total.span.name, side), uid=hd.UID()),
        finding_type=codes.DEEP_MUSCLE_OF_BACK,
        finding_sites=[_site(codes.span_site(total.span), side)],
        method=method,
        algorithm_id=algorithm,
        measurements=_measurements(stats, totals.status),
        qualitative_evaluations=evaluations,
    )


def _measurements(stats: DixonStats, status: LevelStatus) -> list[Measurement] | None:
    """Only figures that exist: none for an absent level, no fat figures without Dixon."""
    if status is LevelStatus.ABSENT:
        return None
    found = [(spec, spec.value(stats)) for spec in MR_MEASUREMENTS]
    return [Measurement(name=spec.name, value=value, unit=spec.unit, derivation=spec.derivation)
            for spec, value in found if value is not None] or None


def _evaluations(stats: DixonStats, status: LevelStatus, result: MRMeasurementResult) -> list[QualitativeEvaluation]:
    """The quality rating, then the grade (or why there is none) for a measured region."""
    evaluations = [_rating(status)]
    if status is LevelStatus.ABSENT:
        return evaluations
    if stats.fat_grade is not None:
        evaluations.append(QualitativeEvaluation(name=codes.GOUTALLIER_GRADE, value=codes.GRADE[stats.fat_grade]))
    elif not result.fat.dixon:
        evaluations.append(QualitativeEvaluation(name=codes.GOUTALLIER_GRADE, value=codes.NOT_ASSESSED_NO_DIXON))
    return evaluations
