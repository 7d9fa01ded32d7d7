"""Paraspinal muscle volume and attenuation per vertebral level: the published "seed" method.

Pure numpy on arrays already in memory. The method (reference: the MESA paraspinal study and
its vBMD code) is, per level (T1–T10 there; the same rule at L1–L5):
  body mask = vertebrae_body ∩ vertebrae_<level> ∩ (body_hu_min ≤ HU ≤ body_hu_max)
  slab      = min..max slice index k containing the body mask
  muscle    = (autochthon_left ∪ autochthon_right) on the slab's slices
and a span's total (T1–T10, L1–L5) is the muscle on the union of its levels' slabs. Attenuation
is the median HU of all muscle voxels with no HU window (the `lean` block adds the −29..150 HU
window users ask for). Which levels are reported is the series' protocol (node.protocol).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage

from node import __version__
from node.config import BiomarkersConfig, MeasureConfig, ProtocolConfig, default_protocols
from node.labels import AUTOCHTHON_LEFT, AUTOCHTHON_RIGHT, SPANS, SPINE, THORACIC_SPAN, VERTEBRA_LABEL, Span, spine_order
from node.pipeline.acquisition import Acquisition, Subject, acquisition_of, subject_of
from node.pipeline.bone import VertebraResult, bone_flag, measure_vertebrae
from node.pipeline.contrast import ContrastStatus, contrast_status
from node.pipeline.ct import CTVolume
from node.pipeline.flags import Flag
from node.pipeline.liver import LiverResult, measure_liver
from node.pipeline.segmentation import Segmentation
from node.pipeline.stats import HUStats, hu_stats
from node.protocol import choose_protocol
from node.screening import LevelStatus

if TYPE_CHECKING:
    from node.priors.change import Longitudinal

METHOD_NAME = "seed"
METHOD_VERSION = "1"  # raised whenever a change to the method changes the numbers: results of two versions are not compared
METHOD_REFERENCE = (
    "Paraspinal muscle at T1-T10 by slabs of TotalSegmentator vertebral bodies (1-700 HU); "
    "median HU of left+right autochthon voxels, no HU window (MESA paraspinal muscle study)"
)


@dataclass
class MuscleStats(HUStats):
    fat_fraction: float | None
    fat_grade: str | None  # simplified Goutallier grade of fat_fraction (see fat_grade)
    lean: HUStats


@dataclass
class Slab:
    first_slice: int
    last_slice: int
    height_mm: float


@dataclass
class Sides:
    """Left, right and both sides together, the three ways every figure is reported."""

    left: MuscleStats
    right: MuscleStats
    combined: MuscleStats


@dataclass
class LevelResult:
    level: str
    status: LevelStatus
    reasons: list[str]
    slab: Slab | None
    left: MuscleStats
    right: MuscleStats
    combined: MuscleStats

    @property
    def sides(self) -> Sides:
        return Sides(self.left, self.right, self.combined)


@dataclass
class SpanTotal:
    """A span's muscle on the union of its reported levels' slabs; measurements.json names it `Span.key`."""

    span: Span
    sides: Sides


@dataclass
class QCFinding:
    code: str
    message: str


@dataclass
class Method:
    """What a reader needs to recompute the numbers; `parameters` are printed as key=value."""

    name: str
    vertebral_body_source: str  # vertebrae_body, or whole_vertebra when the body task did not run
    parameters: dict[str, float | str]
    reference: str
    version: str = METHOD_VERSION


@dataclass
class Software:
    paraspinal_node: str
    totalsegmentator: str | None


@dataclass
class MeasurementResult:
    levels: list[LevelResult]  # the protocol's levels, then complete others it names, cranial first
    totals: list[SpanTotal]  # one per span with a reported level, cranial first
    qc: list[QCFinding]
    method: Method
    source: dict
    software: Software
    vertebrae: list[VertebraResult] = field(default_factory=list)  # the protocol's bone levels and any other present
    contrast: ContrastStatus | None = None
    bone_flag: Flag | None = None
    liver: LiverResult | None = None  # with [biomarkers] liver only
    protocol: str = ""  # which protocol chose the levels, and why; logged, not in measurements.json
    subject: Subject | None = None  # the identity a later comparison checks; never the name
    acquisition: Acquisition | None = None
    longitudinal: Longitudinal | None = None  # set after measuring: priors found and the change (node.priors)
    outputs: dict[str, dict[str, str]] = field(default_factory=dict)  # "sr": its UIDs, once encoded

    def to_dict(self) -> dict:
        """Each total under its span's key right after `levels`, as chest results always had `total`."""
        longitudinal = self.longitudinal
        data = dataclasses.asdict(dataclasses.replace(self, longitudinal=None))
        for key in ("protocol", "longitudinal") + (() if self.outputs else ("outputs",)):
            del data[key]
        totals = {total.span.key: dataclasses.asdict(total.sides) for total in self.totals}
        del data["totals"]
        return {"levels": data.pop("levels"), **totals, **data, **(longitudinal.to_dict() if longitudinal else {})}

    def level(self, name: str) -> LevelResult:
        return next(level for level in self.levels if level.level == name)

    def span_total(self, span: Span) -> Sides | None:
        return next((total.sides for total in self.totals if total.span == span), None)

    @property
    def total(self) -> Sides | None:
        """The T1–T10 total, None when the series' protocol does not report thoracic levels."""
        return self.span_total(THORACIC_SPAN)


def measure(ct: CTVolume, seg: Segmentation, params: MeasureConfig, biomarkers: BiomarkersConfig | None = None,
            protocols: list[ProtocolConfig] | None = None) -> MeasurementResult:
    """`protocols` default to node.config's (chest T1–T10, abdominal L1–L5)."""
    if seg.labels.shape != ct.hu.shape or (seg.body is not None and seg.body.shape != ct.hu.shape):
        raise ValueError(f"segmentation shape {seg.labels.shape} differs from CT shape {ct.hu.shape}")
    boxes = ndimage.find_objects(seg.labels, max_label=AUTOCHTHON_RIGHT)
    header = ct.datasets[0] if ct.datasets else None
    present = {level for level in SPINE if boxes[VERTEBRA_LABEL[level] - 1] is not None}
    choice = choose_protocol(header, present, protocols or default_protocols())
    protocol = choice.protocol
    muscle = InPlaneBox.around(boxes[AUTOCHTHON_LEFT - 1], boxes[AUTOCHTHON_RIGHT - 1], ct.shape)
    levels = [_measure_level(ct, seg, params, name, boxes[VERTEBRA_LABEL[name] - 1], muscle)
              for name in spine_order([*protocol.levels, *protocol.also_levels])]
    levels = [level for level in levels if level.level in protocol.levels or level.status is LevelStatus.COMPLETE]
    every_vertebra = measure_vertebrae(ct, seg, params, boxes, SPINE)
    vertebrae = [v for v in every_vertebra if v.level in protocol.bone_levels or v.status is not LevelStatus.ABSENT]
    contrast = contrast_status(header, params)
    liver = measure_liver(ct, seg, biomarkers, boxes, contrast) if biomarkers is not None and biomarkers.liver else None
    return MeasurementResult(
        levels=levels,
        totals=_span_totals(ct, seg, params, levels, muscle),
        qc=_qc_findings(ct, seg, params, levels, protocol),
        method=Method(
            name=METHOD_NAME,
            vertebral_body_source="vertebrae_body" if seg.body is not None else "whole_vertebra",
            parameters={
                "body_hu_min": params.body_hu_min,
                "body_hu_max": params.body_hu_max,
                "fat_hu_below": params.fat_hu_below,
                "lean_hu_min": params.lean_hu_min,
                "lean_hu_max": params.lean_hu_max,
                "slab": "min..max axial slice index of the level body mask",
                "statistics": "all muscle voxels, no HU window, no resampling; percentiles linear; SD population",
                "bone_flag_level": params.bone_flag_level,
                "bone_low_hu": params.bone_low_hu,
                **_liver_parameters(biomarkers),
            },
            reference=METHOD_REFERENCE,
        ),
        source={"study_instance_uid": ct.study_uid, "series_instance_uid": ct.series_uid},
        software=Software(paraspinal_node=__version__, totalsegmentator=seg.totalsegmentator_version),
        vertebrae=vertebrae,
        contrast=contrast,
        bone_flag=bone_flag(every_vertebra, params, contrast),
        liver=liver,
        protocol=f"{protocol.name} ({choice.reason})",
        subject=subject_of(header),
        acquisition=acquisition_of(header, ct.slice_thickness if ct.slice_thickness is not None else ct.spacing[0]),
    )


def _span_totals(ct: CTVolume, seg: Segmentation, params: MeasureConfig, levels: list[LevelResult],
                 muscle: InPlaneBox | None) -> list[SpanTotal]:
    totals = []
    for span in SPANS:
        included = [level for level in levels if level.level in span.levels]
        if included:
            totals.append(SpanTotal(span, _muscle_on_slices(ct, seg, params, union_of_slabs(included, ct.shape[0]), muscle)))
    return totals


def _liver_parameters(biomarkers: BiomarkersConfig | None) -> dict[str, float | str]:
    if biomarkers is None or not biomarkers.liver:
        return {}
    return {"organ_erosion_mm": biomarkers.erosion_mm, "organ_window_mad": biomarkers.window_mad,
            "liver_low_hu": biomarkers.liver_low_hu}


@dataclass(frozen=True)
class InPlaneBox:
    """Rows and columns holding any muscle: the rest of each slice cannot change a statistic."""

    rows: slice
    cols: slice
    on_border: bool

    @classmethod
    def around(cls, left, right, shape: tuple[int, int, int]) -> InPlaneBox | None:
        boxes = [box for box in (left, right) if box is not None]
        if not boxes:
            return None
        rows = slice(min(b[1].start for b in boxes), max(b[1].stop for b in boxes))
        cols = slice(min(b[2].start for b in boxes), max(b[2].stop for b in boxes))
        on_border = rows.start == 0 or cols.start == 0 or rows.stop == shape[1] or cols.stop == shape[2]
        return cls(rows, cols, on_border)


def _measure_level(ct: CTVolume, seg: Segmentation, params: MeasureConfig, name: str, box, muscle: InPlaneBox | None) -> LevelResult:
    slab = _slab(ct, seg, params, VERTEBRA_LABEL[name], box)
    if slab is None:
        reason = "vertebra not segmented" if box is None else "no vertebral body voxels within the HU window"
        empty = _muscle_stats(np.empty(0, np.int16), ct.voxel_volume_mm3, params)
        return LevelResult(name, LevelStatus.ABSENT, [reason], None, empty, empty, empty)
    selected = np.zeros(ct.shape[0], dtype=bool)
    selected[slab.first_slice : slab.last_slice + 1] = True
    sides = _muscle_on_slices(ct, seg, params, selected, muscle)
    reasons = partial_reasons(ct, seg, box, slab, muscle)
    status = LevelStatus.PARTIAL if reasons else LevelStatus.COMPLETE
    return LevelResult(name, status, reasons, slab, sides.left, sides.right, sides.combined)


def _slab(ct: CTVolume, seg: Segmentation, params: MeasureConfig, label: int, box) -> Slab | None:
    """Only the vertebra's bounding box is scanned: the rest of the volume cannot hold its body."""
    if box is None:
        return None
    body = seg.labels[box] == label
    if seg.body is not None:
        body &= seg.body[box]
    hu = ct.hu[box]
    body &= (hu >= params.body_hu_min) & (hu <= params.body_hu_max)
    slices = np.flatnonzero(body.any(axis=(1, 2)))
    if slices.size == 0:
        return None
    first, last = int(box[0].start + slices[0]), int(box[0].start + slices[-1])
    return Slab(first, last, (last - first + 1) * ct.spacing[0])


def partial_reasons(ct: CTVolume, seg: Segmentation, box, slab: Slab, muscle: InPlaneBox | None) -> list[str]:
    reasons = []
    if box[0].start == 0 or box[0].stop == ct.shape[0]:
        reasons.append("vertebra touches the first or last slice")
    if muscle is not None and muscle.on_border:
        mask = np.isin(seg.labels[slab.first_slice : slab.last_slice + 1], (AUTOCHTHON_LEFT, AUTOCHTHON_RIGHT))
        if mask[:, 0, :].any() or mask[:, -1, :].any() or mask[:, :, 0].any() or mask[:, :, -1].any():
            reasons.append("muscle touches the in-plane image border")
    return reasons


def union_of_slabs(levels: list[LevelResult], n_slices: int) -> np.ndarray:
    selected = np.zeros(n_slices, dtype=bool)
    for level in levels:
        if level.slab is not None:
            selected[level.slab.first_slice : level.slab.last_slice + 1] = True
    return selected


def _muscle_on_slices(
    ct: CTVolume, seg: Segmentation, params: MeasureConfig, selected: np.ndarray, muscle: InPlaneBox | None
) -> Sides:
    """Left, right and combined statistics of the muscle on the selected slices."""
    ks = np.flatnonzero(selected)
    if muscle is None or ks.size == 0:
        left = right = np.empty(0, dtype=ct.hu.dtype)
    else:
        span = slice(int(ks[0]), int(ks[-1]) + 1)
        inside = selected[span]
        labels = seg.labels[span, muscle.rows, muscle.cols][inside]
        hu = ct.hu[span, muscle.rows, muscle.cols][inside]
        left, right = hu[labels == AUTOCHTHON_LEFT], hu[labels == AUTOCHTHON_RIGHT]
    volume = ct.voxel_volume_mm3
    return Sides(
        left=_muscle_stats(left, volume, params),
        right=_muscle_stats(right, volume, params),
        combined=_muscle_stats(np.concatenate([left, right]), volume, params),
    )


def _muscle_stats(values: np.ndarray, voxel_mm3: float, params: MeasureConfig) -> MuscleStats:
    lean = values[(values >= params.lean_hu_min) & (values <= params.lean_hu_max)]
    fat = float(np.count_nonzero(values < params.fat_hu_below) / values.size) if values.size else None
    return MuscleStats(**dataclasses.asdict(hu_stats(values, voxel_mm3)), fat_fraction=fat, fat_grade=fat_grade(fat),
                       lean=hu_stats(lean, voxel_mm3))


def fat_grade(fraction: float | None) -> str | None:
    """Simplified Goutallier grade (Baur et al. 2021): normal < 10 %, moderate 10–50 %, severe > 50 % fat."""
    if fraction is None:
        return None
    return "normal" if fraction < 0.10 else "moderate" if fraction <= 0.50 else "severe"


def _qc_findings(ct: CTVolume, seg: Segmentation, params: MeasureConfig, levels: list[LevelResult],
                 protocol: ProtocolConfig) -> list[QCFinding]:
    found: list[QCFinding] = []
    present = [level for level in levels if level.slab is not None]
    if seg.body is None:
        found.append(QCFinding("whole_vertebra_bodies", "vertebrae_body not available: slabs use the whole-vertebra masks"))
    if not present:
        found.append(QCFinding("no_levels", f"none of {protocol.levels[0]}–{protocol.levels[-1]} was found in this series"))
    thickness = ct.slice_thickness if ct.slice_thickness is not None else ct.spacing[0]
    if thickness > params.max_slice_thickness_mm:
        found.append(QCFinding("slice_thickness", f"slice thickness {thickness:.1f} mm is above {params.max_slice_thickness_mm:.1f} mm"))
    if ct.shape[0] < params.min_slices:
        found.append(QCFinding("too_few_slices", f"{ct.shape[0]} slices, fewer than {params.min_slices}"))
    found += order_findings(ct, present, [level.level for level in levels])
    found += _height_findings(params, present)
    found += overlap_findings(present)
    return found


def order_findings(ct: CTVolume, present: list[LevelResult], reported: list[str]) -> list[QCFinding]:
    """T1 must lie above T2 and so on, and no reported level may be missing between two found ones."""
    found = []
    height = [ct.superior_sign * (level.slab.first_slice + level.slab.last_slice) / 2 for level in present]
    for upper, lower, h_upper, h_lower in zip(present, present[1:], height, height[1:]):
        if h_upper <= h_lower:
            found.append(QCFinding("level_order", f"{upper.level} is not above {lower.level}: labels out of cranio-caudal order"))
    if present:
        names = reported
        span = names[names.index(present[0].level) : names.index(present[-1].level) + 1]
        missing = [name for name in span if name not in {level.level for level in present}]
        if missing:
            found.append(QCFinding("level_gap", f"levels not contiguous: {', '.join(missing)} missing between found levels"))
    return found


def _height_findings(params: MeasureConfig, present: list[LevelResult]) -> list[QCFinding]:
    return [
        QCFinding("body_height", f"{level.level} vertebral body height {level.slab.height_mm:.1f} mm is outside "
                  f"{params.body_height_min_mm:.0f}–{params.body_height_max_mm:.0f} mm")
        for level in present
        if level.status is LevelStatus.COMPLETE and not params.body_height_min_mm <= level.slab.height_mm <= params.body_height_max_mm
    ]


def overlap_findings(present: list[LevelResult]) -> list[QCFinding]:
    found = []
    for i, a in enumerate(present):
        for b in present[i + 1 :]:
            shared = min(a.slab.last_slice, b.slab.last_slice) - max(a.slab.first_slice, b.slab.first_slice) + 1
            if shared > 0:
                found.append(QCFinding("slab_overlap", f"{a.level} and {b.level} slabs share {shared} slice(s); they count in both"))
    return found
