"""The TID 1500 Measurement Report (Comprehensive 3D SR) carrying every number of the measurement.

Groups, in this order, first for all muscle voxels and then again for the lean HU window:
one volumetric group per reported level and side referencing SEG segment i (i = 1..20 on chest
CT, through the source series, not by embedding every image), one group per level for both
sides, and each span's totals (T1-T10, then L1-L5) for left, right and both sides.

How a reader that knows only codes finds a group (checked with dcmqi's tid1500reader, which
3D Slicer uses, and with highdicom's TID 1500 API):
- Finding = Deep muscle of back; Finding Site = the level's vertebra (CID 7603) with the side
  as its Laterality (Left, Right, Bilateral). tid1500reader writes exactly one Finding Site
  with its Laterality per group, and a second Finding Site or a nested modifier would be lost,
  so the site is where the level goes. highdicom's `finding_site=` filter finds it too.
- The T1-T10 groups' site is the thoracic spine and the L1-L5 groups' the lumbar spine, which
  no single level's group uses; they name the levels they include as "Vertebral level included" evaluations (one per level), and
  their Analysis Quality Rating is complete only when every level is.
- Measurement Method (all voxels, or the lean window) is at group level, the only place
  tid1500reader keeps it, so each group holds one Volume and one Median.

After the muscle come the bone and organ groups: one per vertebra listed (Finding =
Vertebral body, Finding Site = the vertebra, Measurement Method = the trabecular mask, or the
whole-vertebra mask without vertebral bodies), then the liver and spleen parenchyma (Finding =
Parenchyma, Finding Site = the organ) when the liver is measured. Each has its status as an
Analysis Quality Rating; the low-bone flag sits in the flag level's group and the liver flag in
the liver's, as a "Screening flag" evaluation (low, not low, not assessed).

Absent means absent: a level outside the field of view keeps its groups with the Analysis
Quality Rating "Absent" and no measurement at all. Not leaving the group out, so that the
absence is stated rather than guessed; not writing empty or indeterminate NUMs, which
highdicom cannot parse and dcmqi shows as "" without units. A statistic of an empty mask of a
measured level (no lean voxels, say) is likewise left out; its measured Volume 0 stays.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

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
    VolumetricROIMeasurementsAndQualitativeEvaluations,
)
from pydicom.dataset import Dataset

from node.labels import Span
from node.pipeline.bone import BODY_MASK, VertebraResult
from node.pipeline.ct import CTVolume
from node.pipeline.flags import Flag
from node.pipeline.liver import LiverResult, OrganResult
from node.pipeline.measure import HUStats, LevelResult, MeasurementResult, MuscleStats, Sides, SpanTotal
from node.screening import Coverage, LevelStatus, coverage

from . import codes
from .biomarker_seg import parenchyma_label, trabecular_label
from .encoding import comprehensive_3d_sr
from .options import MANUFACTURER, EncodeOptions
from .seg import SIDES, muscle_levels, muscle_segment_number
from .study import character_set, copy_patient_and_study, procedure_reported, software_versions, source_images
from .timepoint import TimeContext, describe_acquisition

ALL_SIDES = (*SIDES, "combined")


@dataclass(frozen=True)
class MeasurementSpec:
    """One measurement of a group: its codes and the statistic it reports."""

    name: CodedConcept
    unit: CodedConcept
    derivation: CodedConcept | None
    key: str  # the HUStats / MuscleStats field

    def value(self, stats: HUStats) -> float | None:
        return getattr(stats, self.key)


_HU_ROWS = (
    MeasurementSpec(codes.VOLUME, codes.CUBIC_CENTIMETER, None, "volume_cm3"),
    *(MeasurementSpec(codes.ATTENUATION, codes.HOUNSFIELD_UNIT, derivation, key) for derivation, key in (
        (codes.MEAN, "mean_hu"), (codes.MEDIAN, "median_hu"), (codes.STANDARD_DEVIATION, "sd_hu"),
        (codes.PERCENTILE_25, "p25_hu"), (codes.PERCENTILE_75, "p75_hu"))),
)


class Window(Enum):
    """Which muscle voxels a group's statistics cover; its Measurement Method."""

    ALL = "all"
    LEAN = "lean"

    @property
    def method(self) -> CodedConcept:
        return codes.ALL_VOXELS if self is Window.ALL else codes.LEAN_WINDOW

    def stats(self, muscle: MuscleStats) -> HUStats:
        return muscle if self is Window.ALL else muscle.lean


MEASUREMENTS: dict[Window, tuple[MeasurementSpec, ...]] = {
    Window.ALL: (*_HU_ROWS, MeasurementSpec(codes.FAT_FRACTION, codes.NO_UNITS, None, "fat_fraction")),
    Window.LEAN: _HU_ROWS,
}


def tracking_label(level: str | None, side: str, window: Window = Window.ALL) -> str:
    """Free text for people: "T3 paraspinal muscle left", "L1-L5 paraspinal muscle combined lean".

    `level` is a level or a span's name; None is the T1-T10 span.
    """
    return f"{level or 'T1-T10'} paraspinal muscle {side}" + ("" if window is Window.ALL else " lean")


def side_stats(sides: Sides | LevelResult, side: str) -> MuscleStats:
    return {"left": sides.left, "right": sides.right, "combined": sides.combined}[side]


def build_sr(ct: CTVolume, seg: Dataset, result: MeasurementResult, options: EncodeOptions) -> Comprehensive3DSR:
    """`seg` is the SEG from build_seg: the volumetric groups reference its muscle segments in order."""
    sources = source_images(ct)
    algorithm = _algorithm(result)
    levels, order = result.levels, muscle_levels(result)
    time = TimeContext.of(result)
    groups: list = []
    for window in Window:
        groups += [_volumetric_group(level, side, window, seg, str(sources[0].SeriesInstanceUID), algorithm, order, time)
                   for level in levels for side in SIDES]
        groups += [_level_group(level, window, algorithm, time) for level in levels]
        groups += [_total_group(result, total, side, window, algorithm, time, with_qc=i == 0)
                   for i, total in enumerate(result.totals) for side in ALL_SIDES]
    groups += _bone_and_organ_groups(result, algorithm, seg, str(sources[0].SeriesInstanceUID), time)
    report = MeasurementReport(
        observation_context=_observation_context(),
        procedure_reported=procedure_reported(ct.datasets[0]),
        imaging_measurements=groups,
        referenced_images=[_library_image(sources[0], result)],
    )
    describe_acquisition(report[0], result)
    settings = options.results
    document = comprehensive_3d_sr(
        evidence=[*sources, seg, *time.evidence()],
        content=report[0],
        series_instance_uid=hd.UID(),
        series_number=settings.sr_series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        series_description=settings.sr_series_description,
        institution_name=options.institution_name,
        software_versions=software_versions(result.software),
        coding_schemes=[codes.PRIVATE_SCHEME_ITEM],
        specific_character_set=character_set(sources[0], (*options.texts(), *_result_texts(result))),
    )
    copy_patient_and_study(ct.datasets[0], document)
    return document


def _observation_context() -> ObservationContext:
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=hd.UID(), name="paraspinal-node", manufacturer_name=MANUFACTURER, model_name="paraspinal-node",
    )
    return ObservationContext(
        observer_device_context=hd.sr.ObserverContext(observer_type=hd.sr.CodedConcept("121007", "DCM", "Device"),
                                                       observer_identifying_attributes=device),
    )


def _algorithm(result: MeasurementResult) -> AlgorithmIdentification:
    """The method and every parameter, so a reader can recompute the numbers.

    One parameter item: tid1500reader keeps only the first, and the algorithm is repeated in
    every group, where each content item costs encoding time.
    """
    method, software = result.method, result.software
    numbers = "; ".join(f"{key}={value}" for key, value in method.parameters.items())
    text = (f"{numbers}; segmentation=TotalSegmentator {software.totalsegmentator or 'unknown'} task total; "
            f"vertebral_body_source={method.vertebral_body_source}; a slice shared by two slabs counts in both "
            f"levels and lies in both SEG segments; reference={method.reference}")
    return AlgorithmIdentification(
        name=f"paraspinal-node {method.name} method v{method.version}",
        version=software.paraspinal_node,
        parameters=[text],
        family=codes.ARTIFICIAL_INTELLIGENCE,
    )


def _result_texts(result: MeasurementResult) -> list[str]:
    return [str(value) for value in result.method.parameters.values()] + [result.method.reference]


def _library_image(source: Dataset, result: MeasurementResult) -> Dataset:
    """The first CT image for the Image Library, with the slice thickness the loader used (highdicom needs one)."""
    image = Dataset()
    image.update(source)
    thickness = result.acquisition.slice_thickness_mm if result.acquisition else None
    image.SliceThickness = f"{thickness if thickness is not None else 0:.6g}"
    return image


def _volumetric_group(level: LevelResult, side: str, window: Window, seg: Dataset, series_uid: str,
                      algorithm: AlgorithmIdentification, order: tuple[str, ...],
                      time: TimeContext) -> VolumetricROIMeasurementsAndQualitativeEvaluations:
    segment = ReferencedSegment(
        sop_class_uid=seg.SOPClassUID,
        sop_instance_uid=seg.SOPInstanceUID,
        segment_number=muscle_segment_number(level.level, side, order),
        source_series=SourceSeriesForSegmentation(series_uid),
    )
    numbers, evaluations = _change(time, window, level.level, side)
    return VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=time.tracking(tracking_label(level.level, side, window)),
        time_point_context=time.time_point(),
        referenced_segment=segment,
        finding_type=codes.DEEP_MUSCLE_OF_BACK,
        finding_sites=[_site(codes.VERTEBRA[level.level], side)],
        method=window.method,
        algorithm_id=algorithm,
        measurements=_with(_measurements(side_stats(level, side), window, level.status), numbers),
        qualitative_evaluations=[_rating(level.status), *evaluations],
    )


def _change(time: TimeContext, window: Window, structure: str, side: str) -> tuple[list[Measurement], list]:
    """The change items of an all-voxels group; the lean window's groups carry none."""
    return time.change_items(structure, side) if window is Window.ALL else ([], [])


def _with(measurements: list[Measurement] | None, more: list[Measurement]) -> list[Measurement] | None:
    return [*(measurements or []), *more] or None


def _level_group(level: LevelResult, window: Window, algorithm: AlgorithmIdentification,
                 time: TimeContext) -> MeasurementsAndQualitativeEvaluations:
    """Both sides are the union of two segments, so no single segment is referenced."""
    numbers, evaluations = _change(time, window, level.level, "combined")
    return MeasurementsAndQualitativeEvaluations(
        tracking_identifier=time.tracking(tracking_label(level.level, "combined", window)),
        time_point_context=time.time_point(),
        finding_type=codes.DEEP_MUSCLE_OF_BACK,
        finding_sites=[_site(codes.VERTEBRA[level.level], "combined")],
        method=window.method,
        algorithm_id=algorithm,
        measurements=_with(_measurements(level.combined, window, level.status), numbers),
        qualitative_evaluations=[_rating(level.status), *evaluations],
    )


def span_coverage(result: MeasurementResult, span: Span) -> Coverage:
    """What a span's totals cover: its reported levels' statuses."""
    return coverage((level.level, level.status) for level in result.levels if level.level in span.levels)


def _total_group(result: MeasurementResult, total: SpanTotal, side: str, window: Window,
                 algorithm: AlgorithmIdentification, time: TimeContext,
                 with_qc: bool) -> MeasurementsAndQualitativeEvaluations:
    """The measurement's QC findings go with the first span's combined group, once."""
    totals = span_coverage(result, total.span)
    evaluations = [_rating(totals.status)]
    evaluations += [QualitativeEvaluation(name=codes.INCLUDED_LEVEL, value=codes.VERTEBRA[level]) for level in totals.included]
    if with_qc and side == "combined" and window is Window.ALL:
        evaluations += [QualitativeEvaluation(name=codes.QUALITY_ASSESSMENT, value=codes.qc_finding(item.code))
                        for item in result.qc]
    numbers, changes = _change(time, window, total.span.name, side)
    return MeasurementsAndQualitativeEvaluations(
        tracking_identifier=time.tracking(tracking_label(total.span.name, side, window)),
        time_point_context=time.time_point(),
        finding_type=codes.DEEP_MUSCLE_OF_BACK,
        finding_sites=[_site(codes.span_site(total.span), side)],
        method=window.method,
        algorithm_id=algorithm,
        measurements=_with(_measurements(side_stats(total.sides, side), window, totals.status), numbers),
        qualitative_evaluations=evaluations + changes,
    )


def _site(location: CodedConcept, side: str) -> FindingSite:
    return FindingSite(anatomic_location=location, laterality=codes.LATERALITY[side])


def _rating(status: LevelStatus) -> QualitativeEvaluation:
    return QualitativeEvaluation(name=codes.ANALYSIS_QUALITY, value=codes.LEVEL_STATUS[status])


def _measurements(muscle: MuscleStats, window: Window, status: LevelStatus) -> list[Measurement] | None:
    """Only statistics that exist: none for an absent level, none of an empty mask's HU."""
    if status is LevelStatus.ABSENT:
        return None
    stats = window.stats(muscle)
    found = [(spec, spec.value(stats)) for spec in MEASUREMENTS[window]]
    return [Measurement(name=spec.name, value=float(value), unit=spec.unit, derivation=spec.derivation)
            for spec, value in found if value is not None] or None


def _bone_and_organ_groups(result: MeasurementResult, algorithm: AlgorithmIdentification, seg: Dataset,
                           series_uid: str, time: TimeContext) -> list:
    """Volumetric groups referencing their SEG segment (found by label) where the SEG holds one."""
    numbers = {str(item.SegmentLabel): int(item.SegmentNumber) for item in seg.SegmentSequence}

    def reference(label: str) -> ReferencedSegment | None:
        if label not in numbers:
            return None
        return ReferencedSegment(sop_class_uid=seg.SOPClassUID, sop_instance_uid=seg.SOPInstanceUID,
                                 segment_number=numbers[label], source_series=SourceSeriesForSegmentation(series_uid))

    flag_level = result.method.parameters.get("bone_flag_level")
    groups = [_bone_group(vertebra, result.bone_flag if vertebra.level == flag_level else None, algorithm,
                          reference(trabecular_label(vertebra.level)), time)
              for vertebra in result.vertebrae]
    if result.liver is not None:
        groups += [_organ_group("liver", codes.LIVER, result.liver, algorithm, result.liver,
                                reference(parenchyma_label("liver")), time),
                   _organ_group("spleen", codes.SPLEEN, result.liver.spleen, algorithm, None,
                                reference(parenchyma_label("spleen")), time)]
    return groups


def _group(segment: ReferencedSegment | None, **content):
    if segment is None:
        return MeasurementsAndQualitativeEvaluations(**content)
    return VolumetricROIMeasurementsAndQualitativeEvaluations(referenced_segment=segment, **content)


def _bone_group(vertebra: VertebraResult, flag: Flag | None, algorithm: AlgorithmIdentification,
                segment: ReferencedSegment | None, time: TimeContext):
    numbers, changes = time.change_items(vertebra.level, "")
    evaluations = [_rating(vertebra.status)] + ([_flag(flag)] if flag is not None else []) + changes
    return _group(
        segment,
        tracking_identifier=time.tracking(trabecular_label(vertebra.level)),
        time_point_context=time.time_point(),
        finding_type=codes.VERTEBRAL_BODY,
        finding_sites=[FindingSite(anatomic_location=codes.VERTEBRA[vertebra.level])],
        method=codes.TRABECULAR_MASK if vertebra.mask == BODY_MASK else codes.WHOLE_VERTEBRA_MASK,
        algorithm_id=algorithm,
        measurements=_with(_stat_measurements(vertebra.trabecular, vertebra.status), numbers),
        qualitative_evaluations=evaluations,
    )


def _organ_group(name: str, site: CodedConcept, organ: OrganResult, algorithm: AlgorithmIdentification,
                 liver: LiverResult | None, segment: ReferencedSegment | None, time: TimeContext):
    """The liver's group also holds the liver-minus-spleen difference and the liver flag."""
    measurements = _stat_measurements(organ.parenchyma, organ.status) or []
    if organ.status is not LevelStatus.ABSENT:
        measurements.append(Measurement(name=codes.COVERED_VOLUME, value=organ.covered_volume_cm3, unit=codes.CUBIC_CENTIMETER))
    if liver is not None and liver.liver_minus_spleen_hu is not None:
        measurements.append(Measurement(name=codes.LIVER_MINUS_SPLEEN, value=liver.liver_minus_spleen_hu,
                                        unit=codes.HOUNSFIELD_UNIT))
    numbers, changes = time.change_items(name, "")
    measurements += numbers
    evaluations = [_rating(organ.status)] + ([_flag(liver.flag)] if liver is not None else []) + changes
    return _group(
        segment,
        tracking_identifier=time.tracking(parenchyma_label(name)),
        time_point_context=time.time_point(),
        finding_type=codes.PARENCHYMA,
        finding_sites=[FindingSite(anatomic_location=site)],
        method=codes.PARENCHYMA_MASK,
        algorithm_id=algorithm,
        measurements=measurements or None,
        qualitative_evaluations=evaluations,
    )


def _flag(flag: Flag) -> QualitativeEvaluation:
    return QualitativeEvaluation(name=codes.SCREENING_FLAG, value=codes.FLAG_STATE[flag.state])


def _stat_measurements(stats: HUStats, status: LevelStatus) -> list[Measurement] | None:
    """Volume and HU statistics that exist; none for an absent structure."""
    if status is LevelStatus.ABSENT:
        return None
    found = [(spec, spec.value(stats)) for spec in _HU_ROWS]
    return [Measurement(name=spec.name, value=float(value), unit=spec.unit, derivation=spec.derivation)
            for spec, value in found if value is not None] or None
