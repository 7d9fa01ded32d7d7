"""What the SR says about time: stable tracking UIDs, TID 1502 time points, the change and the acquisition.

- Tracking Unique Identifier: derived from Patient ID, Issuer and the group's label (level, side,
  statistics window; vertebra; organ), so the same ROI of the same patient has the same UID in
  every report and readers can link them across time (random when the patient has no ID).
- Time Point Context (TID 1502), when the patient has an earlier result: the study date as time point,
  its order among the patient's results, and the offset in days from the first one (Baseline).
- In each all-voxels group with a change: the prior value, Δ and Δ per year as NUMs, the interval
  in days, and whether the pair is comparable and the change significant (codes in dicom_sr.codes).
- The Image Library entry of the first CT image carries kVp, kernel and contrast status, so that
  a later job reading this SR back from a PACS can judge comparability by code (dicom_sr.read).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import highdicom as hd
from highdicom.sr import (
    CodeContentItem,
    LongitudinalTemporalOffsetFromEvent,
    Measurement,
    NumContentItem,
    QualitativeEvaluation,
    TextContentItem,
    TimePointContext,
    TrackingIdentifier,
)
from highdicom.sr.enum import RelationshipTypeValues
from pydicom.dataset import Dataset

from node.pipeline.acquisition import Subject
from node.pipeline.measure import MeasurementResult
from node.priors.change import Longitudinal, Quantity, QuantityKey, iso_date

from . import codes

IMAGE_LIBRARY = "111028"
# quantity -> (prior, change, rate, significant) codes and the units of the value and of its rate
_CHANGE_CODES = {
    Quantity.MUSCLE_MEDIAN_HU: (codes.PRIOR_MEDIAN_HU, codes.CHANGE_MEDIAN_HU, codes.RATE_MEDIAN_HU,
                                codes.SIGNIFICANT_MEDIAN_HU, codes.HOUNSFIELD_UNIT, codes.HU_PER_YEAR),
    Quantity.MUSCLE_VOLUME_CM3: (codes.PRIOR_VOLUME, codes.CHANGE_VOLUME, codes.RATE_VOLUME, codes.SIGNIFICANT_VOLUME,
                                 codes.CUBIC_CENTIMETER, codes.CUBIC_CENTIMETER_PER_YEAR),
}
_CHANGE_CODES[Quantity.BONE_MEDIAN_HU] = _CHANGE_CODES[Quantity.LIVER_MEDIAN_HU] = _CHANGE_CODES[
    Quantity.MUSCLE_MEDIAN_HU]


@dataclass(frozen=True)
class TimeContext:
    """Everything the SR's groups need to say about time, for one result."""

    subject: Subject | None
    longitudinal: Longitudinal | None
    study_date: str

    @classmethod
    def of(cls, result: MeasurementResult) -> TimeContext:
        return cls(result.subject, result.longitudinal, result.acquisition.study_date if result.acquisition else "")

    def tracking(self, label: str) -> TrackingIdentifier:
        return TrackingIdentifier(identifier=label, uid=tracking_uid(self.subject, label))

    def time_point(self) -> TimePointContext | None:
        """Order among the patient's results found and days since the first; None without an earlier result,
        so a first report's groups stay as they always were."""
        if self.longitudinal is None:
            return None
        earlier = [p for p in self.longitudinal.priors if not p.identity and (p.interval_days or 0) > 0]
        if not earlier:
            return None
        offset = max((p.interval_days or 0 for p in earlier), default=0)
        return TimePointContext(
            time_point=iso_date(self.study_date) or "current", time_point_order=len(earlier) + 1,
            subject_time_point_identifier=iso_date(self.study_date) or None,
            temporal_offset_from_event=LongitudinalTemporalOffsetFromEvent(offset, codes.DAYS, codes.BASELINE),
        )

    def change_items(self, structure: str, side: str) -> tuple[list[Measurement], list[QualitativeEvaluation]]:
        """The prior value, Δ, Δ per year and interval of each quantity of this group, with the flags."""
        if self.longitudinal is None:
            return [], []
        numbers: list[Measurement] = []
        evaluations: list[QualitativeEvaluation] = []
        for quantity in Quantity:
            change = self.longitudinal.change(QuantityKey(structure, side, quantity))
            if change is None:
                continue
            prior, delta, rate, significant, unit, rate_unit = _CHANGE_CODES[quantity]
            numbers += [Measurement(name=prior, value=change.prior, unit=unit),
                        Measurement(name=delta, value=change.delta, unit=unit),
                        Measurement(name=rate, value=change.per_year, unit=rate_unit)]
            if change.significant is not None:
                evaluations.append(QualitativeEvaluation(name=significant, value=_yes_no(change.significant)))
            if len(numbers) == 3:  # interval and comparability once per group
                numbers.append(Measurement(name=codes.PRIOR_INTERVAL, value=change.interval_days, unit=codes.DAYS))
                evaluations.insert(0, QualitativeEvaluation(name=codes.CHANGE_COMPARABLE, value=_yes_no(change.comparable)))
        return numbers, evaluations

    def evidence(self) -> list[Dataset]:
        """The prior SR used, as evidence of the report that compares with it."""
        used = self.longitudinal.used if self.longitudinal is not None else None
        sr = used.snapshot.sr if used is not None else None
        if sr is None:
            return []
        reference = Dataset()
        reference.StudyInstanceUID, reference.SeriesInstanceUID = sr.study_uid, sr.series_uid
        reference.SOPInstanceUID, reference.SOPClassUID = sr.sop_instance_uid, sr.sop_class_uid
        return [reference]


def tracking_uid(subject: Subject | None, label: str) -> hd.UID:
    """The same for the same patient and ROI in every report; random without a Patient ID."""
    if subject is None or not subject.patient_id:
        return hd.UID()
    name = "\\".join(("paraspinal-node tracking", subject.patient_id, subject.issuer_of_patient_id, label))
    return hd.UID(f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, name).int}")  # PS3.5 B.2: a UUID as a UID


def _yes_no(value: bool):
    return codes.YES if value else codes.NO


def describe_acquisition(report: Dataset, result: MeasurementResult) -> None:
    """Add kVp, kernel and contrast status to the Image Library entry of the report built with one image."""
    library = next((item for item in report.ContentSequence
                    if item.ConceptNameCodeSequence[0].CodeValue == IMAGE_LIBRARY), None)
    if library is None:
        return
    image = library.ContentSequence[0].ContentSequence[-1]
    acquisition = result.acquisition
    items = [CodeContentItem(name=codes.CONTRAST_STATUS, value=codes.CONTRAST[
        result.contrast.enhanced if result.contrast else None], relationship_type=RelationshipTypeValues.HAS_ACQ_CONTEXT)]
    if acquisition is not None and acquisition.kvp is not None:
        items.append(NumContentItem(name=codes.KVP, value=acquisition.kvp, unit=codes.KILOVOLT,
                                    relationship_type=RelationshipTypeValues.HAS_ACQ_CONTEXT))
    if acquisition is not None and acquisition.convolution_kernel:
        items.append(TextContentItem(name=codes.CONVOLUTION_KERNEL, value=acquisition.convolution_kernel[:1024],
                                     relationship_type=RelationshipTypeValues.HAS_ACQ_CONTEXT))
    image.ContentSequence.extend(items)
