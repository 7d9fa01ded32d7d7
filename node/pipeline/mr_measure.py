"""Paraspinal muscle per vertebral level on MR: volume, area and, with Dixon, fat per level and side.

The level machinery is the CT's (node.labels, the protocols, the slab rule): a level's slab is
min..max axial slice of its vertebra (vertebrae_mr; no HU window applies on MR, and MR has no
vertebral-body task, so the whole vertebra is used as on CT without vertebrae_body), and the
muscle is the autochthon (total_mr) on the slab's slices. A span's total is the muscle on the
union of its levels' slabs. From the Dixon water (W) and fat (F) signal of every muscle voxel:

  fat_signal_fraction = ΣF / Σ(F + W)             (LPM_Segmentator's fat ratio)
  median_fat_fraction = median of F / (F + W)     (a voxel with F + W = 0 counts as 0)
  fat_area_fraction   = share of voxels with F / (F + W) ≥ 0.5   (nearest to Baur's fat area)
  fat_grade           = simplified Goutallier grade of fat_area_fraction (Baur et al. 2021)

Two-point Dixon magnitude images give a fat *signal* fraction, not a proton-density fat
fraction: noise biases low fractions upward and T1/T2* effects are not corrected.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from node import __version__
from node.config import MeasureConfig, ProtocolConfig, default_protocols
from node.labels import AUTOCHTHON_LEFT, AUTOCHTHON_RIGHT, SACRUM, SPANS, SPINE, VERTEBRA_LABEL, Span, spine_order
from node.pipeline.ct import CTVolume
from node.pipeline.measure import (
    InPlaneBox,
    QCFinding,
    Slab,
    Software,
    fat_grade,
    order_findings,
    overlap_findings,
    partial_reasons,
    union_of_slabs,
)
from node.pipeline.mr_load import MRImages
from node.pipeline.segmentation import Segmentation
from node.protocol import choose_protocol
from node.screening import NO_DIXON, LevelStatus

METHOD_NAME = "mr-dixon"
FAT_VOXEL_THRESHOLD = 0.5  # a voxel is fat when F/(F+W) is at least this
GRADE_METRIC = "fat_area_fraction"
GRADE_RULE = "simplified Goutallier (Baur et al. 2021): normal < 10 %, moderate 10-50 %, severe > 50 % fat area"
DIXON_CAVEAT = ("2-point Dixon magnitude images give a fat signal fraction, not a proton-density fat fraction (PDFF): "
                "noise biases low fractions upward and T1/T2* effects are not corrected")
SHELL_MM = 10.0  # the outer body shell tested for subcutaneous fat (fat-water swap check)
BODY_SIGNAL = 0.2  # of the 99th percentile of F + W: what counts as body
METHOD_REFERENCE = ("Autochthon (total_mr) on slabs of vertebrae_mr vertebrae; fat ratio sum(F)/sum(F+W) "
                    "(LPM_Segmentator); fat area and simplified Goutallier grade (Baur et al., Eur Spine J 2021)")


@dataclass
class DixonStats:
    """One muscle region; the fat figures are None without a Dixon pair (and for an empty region)."""

    voxels: int
    volume_cm3: float
    area_cm2: float | None  # mean cross-sectional area over the region's slices
    fat_signal_fraction: float | None
    median_fat_fraction: float | None
    fat_area_fraction: float | None
    fat_grade: str | None  # of fat_area_fraction, in the CT output's vocabulary (normal, moderate, severe)


@dataclass
class MRSides:
    left: DixonStats
    right: DixonStats
    combined: DixonStats


@dataclass
class MRLevelResult:
    level: str
    status: LevelStatus
    reasons: list[str]
    slab: Slab | None
    left: DixonStats
    right: DixonStats
    combined: DixonStats

    @property
    def sides(self) -> MRSides:
        return MRSides(self.left, self.right, self.combined)


@dataclass
class MRSpanTotal:
    span: Span
    sides: MRSides


@dataclass
class FatAssessment:
    """How the fat figures were made, or why there are none; measurements.json names the grade's metric here."""

    dixon: bool
    grade_metric: str
    grade_rule: str
    fat_voxel_threshold: float
    caveat: str
    not_assessed_reason: str | None  # "not assessed: no Dixon" (and why) when there is no usable pair
    fat_series_instance_uid: str | None


@dataclass
class MRMethod:
    name: str
    vertebral_body_source: str
    parameters: dict[str, float | str]
    reference: str


@dataclass
class MRMeasurementResult:
    levels: list[MRLevelResult]
    totals: list[MRSpanTotal]
    qc: list[QCFinding]
    fat: FatAssessment
    method: MRMethod
    source: dict
    software: Software
    modality: str = "MR"
    protocol: str = ""  # logged, not in measurements.json

    def to_dict(self) -> dict:
        """As the CT's: levels, then each span's total under its key, then the rest."""
        data = dataclasses.asdict(self)
        del data["protocol"], data["totals"]
        totals = {total.span.key: dataclasses.asdict(total.sides) for total in self.totals}
        return {"levels": data.pop("levels"), **totals, **data}

    def level(self, name: str) -> MRLevelResult:
        return next(level for level in self.levels if level.level == name)

    def span_total(self, span: Span) -> MRSides | None:
        return next((total.sides for total in self.totals if total.span == span), None)


@dataclass(frozen=True)
class _Signals:
    """What the statistics read: the grid and, with a Dixon pair, the fat and water signal on it."""

    grid: CTVolume
    fat: np.ndarray | None
    water: np.ndarray | None

    def fraction(self, where) -> np.ndarray:
        """F/(F+W) in float64 at `where` (0 where F+W is 0), so a voxel on a grade bound is not rounded across it."""
        fat, water = self.fat[where].astype(np.float64), self.water[where].astype(np.float64)
        total = fat + water
        return np.divide(fat, total, out=np.zeros_like(total), where=total > 0)


def measure_mr(images: MRImages, seg: Segmentation, params: MeasureConfig,
               protocols: list[ProtocolConfig] | None = None) -> MRMeasurementResult:
    grid = images.image
    if seg.labels.shape != grid.shape:
        raise ValueError(f"segmentation shape {seg.labels.shape} differs from MR shape {grid.shape}")
    signals = _signals(images)
    boxes = ndimage.find_objects(seg.labels, max_label=AUTOCHTHON_RIGHT)
    present = {level for level in SPINE if boxes[VERTEBRA_LABEL[level] - 1] is not None}
    choice = choose_protocol(grid.datasets[0] if grid.datasets else None, present, protocols or default_protocols())
    protocol = choice.protocol
    muscle = InPlaneBox.around(boxes[AUTOCHTHON_LEFT - 1], boxes[AUTOCHTHON_RIGHT - 1], grid.shape)
    levels = [_measure_level(signals, seg, name, boxes[VERTEBRA_LABEL[name] - 1], muscle)
              for name in spine_order([*protocol.levels, *protocol.also_levels])]
    levels = [level for level in levels if level.level in protocol.levels or level.status is LevelStatus.COMPLETE]
    totals = [MRSpanTotal(span, _sides(signals, seg, union_of_slabs(included, grid.shape[0])))
              for span in SPANS if (included := [level for level in levels if level.level in span.levels])]
    return MRMeasurementResult(
        levels=levels,
        totals=totals,
        qc=_qc(images, signals, seg, params, levels, protocol, boxes),
        fat=_fat_assessment(images),
        method=MRMethod(
            name=METHOD_NAME,
            vertebral_body_source="whole_vertebra",
            parameters={
                "slab": "min..max axial slice index of the level's vertebra (vertebrae_mr)",
                "fat_voxel_threshold": FAT_VOXEL_THRESHOLD,
                "area": "mean cross-sectional area over the region's slices",
                "statistics": "all muscle voxels, no intensity window, no resampling; median linear",
            },
            reference=METHOD_REFERENCE,
        ),
        source={"study_instance_uid": grid.study_uid, "series_instance_uid": grid.series_uid,
                "fat_series_instance_uid": images.fat_series_uid, "dixon_role": images.role.value},
        software=Software(paraspinal_node=__version__, totalsegmentator=seg.totalsegmentator_version),
        protocol=f"{protocol.name} ({choice.reason})",
    )


def _signals(images: MRImages) -> _Signals:
    return _Signals(images.image, images.fat, images.water)


def _measure_level(signals: _Signals, seg: Segmentation, name: str, box, muscle: InPlaneBox | None) -> MRLevelResult:
    grid = signals.grid
    if box is None:
        empty = _stats(signals, np.empty(0, bool), (), 0)
        return MRLevelResult(name, LevelStatus.ABSENT, ["vertebra not segmented"], None, empty, empty, empty)
    first, last = int(box[0].start), int(box[0].stop - 1)
    slab = Slab(first, last, (last - first + 1) * grid.spacing[0])
    selected = np.zeros(grid.shape[0], dtype=bool)
    selected[first : last + 1] = True
    sides = _sides(signals, seg, selected)
    reasons = partial_reasons(grid, seg, box, slab, muscle)
    status = LevelStatus.PARTIAL if reasons else LevelStatus.COMPLETE
    return MRLevelResult(name, status, reasons, slab, sides.left, sides.right, sides.combined)


def _sides(signals: _Signals, seg: Segmentation, selected: np.ndarray) -> MRSides:
    ks = np.flatnonzero(selected)
    labels = seg.labels[ks]
    n_slices = int(ks.size)
    left, right = labels == AUTOCHTHON_LEFT, labels == AUTOCHTHON_RIGHT
    return MRSides(
        left=_stats(signals, left, ks, n_slices),
        right=_stats(signals, right, ks, n_slices),
        combined=_stats(signals, left | right, ks, n_slices),
    )


def _stats(signals: _Signals, mask: np.ndarray, ks, n_slices: int) -> DixonStats:
    """`mask` covers the slices `ks` of the grid."""
    grid = signals.grid
    n = int(np.count_nonzero(mask))
    pixel_mm2 = grid.spacing[1] * grid.spacing[2]
    area = n * pixel_mm2 / n_slices / 100.0 if n_slices else None
    volume = n * grid.voxel_volume_mm3 / 1000.0
    if signals.fat is None or n == 0:
        return DixonStats(n, volume, area, None, None, None, None)
    slice_index, rows, cols = np.nonzero(mask)
    where = (np.asarray(ks)[slice_index], rows, cols)
    fat_sum, water_sum = (float(values[where].sum(dtype=np.float64)) for values in (signals.fat, signals.water))
    fraction = signals.fraction(where)
    fsf = fat_sum / (fat_sum + water_sum) if fat_sum + water_sum > 0 else 0.0
    area_fraction = float(np.count_nonzero(fraction >= FAT_VOXEL_THRESHOLD)) / n
    return DixonStats(n, volume, area, fsf, float(np.median(fraction)), area_fraction, fat_grade(area_fraction))


def _fat_assessment(images: MRImages) -> FatAssessment:
    reason = None
    if images.fat is None:
        why = images.notes[0].message.split(":")[0] if images.notes else "the series is not a Dixon water image"
        reason = f"{NO_DIXON} ({why})"
    return FatAssessment(dixon=images.fat is not None, grade_metric=GRADE_METRIC, grade_rule=GRADE_RULE,
                         fat_voxel_threshold=FAT_VOXEL_THRESHOLD, caveat=DIXON_CAVEAT, not_assessed_reason=reason,
                         fat_series_instance_uid=images.fat_series_uid)


def _qc(images: MRImages, signals: _Signals, seg: Segmentation, params: MeasureConfig, levels: list[MRLevelResult],
        protocol: ProtocolConfig, boxes) -> list[QCFinding]:
    found = [QCFinding(note.code, note.message) for note in images.notes]
    present = [level for level in levels if level.slab is not None]
    if not present:
        found.append(QCFinding("no_levels", f"none of {protocol.levels[0]}–{protocol.levels[-1]} was found in this series"))
    outside = [level.level for level in levels if level.status is not LevelStatus.COMPLETE]
    if present and outside:
        found.append(QCFinding("levels_outside_fov", f"{', '.join(outside)} not wholly in the field of view"))
    grid = signals.grid
    thickness = grid.slice_thickness if grid.slice_thickness is not None else grid.spacing[0]
    if thickness > params.max_slice_thickness_mm:
        found.append(QCFinding("slice_thickness", f"slice thickness {thickness:.1f} mm is above {params.max_slice_thickness_mm:.1f} mm"))
    found += order_findings(grid, present, [level.level for level in levels])
    found += overlap_findings(present)
    found += _swap_findings(signals, seg)
    found += lumbosacral_findings(seg, boxes)
    return found


def _swap_findings(signals: _Signals, seg: Segmentation) -> list[QCFinding]:
    """Subcutaneous fat (the body's outer shell) must read as fat; read as water, F and W were swapped."""
    if signals.fat is None:
        return []
    grid = signals.grid
    signal = signals.fat + signals.water
    body = signal > BODY_SIGNAL * float(np.percentile(signal, 99))
    pixels = max(1, round(SHELL_MM / min(grid.spacing[1], grid.spacing[2])))
    inner = ndimage.binary_erosion(body, structure=np.ones((1, 3, 3), bool), iterations=pixels)
    shell = body & ~inner & ~np.isin(seg.labels, (AUTOCHTHON_LEFT, AUTOCHTHON_RIGHT))
    if not shell.any():
        return []
    median = float(np.median(signals.fraction(shell)))
    if median >= FAT_VOXEL_THRESHOLD:
        return []
    return [QCFinding("fat_water_swap", f"subcutaneous fat reads as water (median fat fraction {median:.2f} in the "
                      "outer body shell): fat and water images are probably swapped; check the series' ImageType")]


def lumbosacral_findings(seg: Segmentation, boxes) -> list[QCFinding]:
    """Discs between L5 and the sacrum: one is normal; two suggest a sixth lumbar vertebra, none a sacralised L5."""
    l5, sacrum = boxes[VERTEBRA_LABEL["L5"] - 1], boxes[SACRUM - 1]
    if seg.discs is None or l5 is None or sacrum is None:
        return []
    low, high = sorted((_centre(l5), _centre(sacrum)))
    components, count = ndimage.label(seg.discs)
    centres = [_centre(box) for box in ndimage.find_objects(components, max_label=count) if box is not None]
    between = sum(low < centre < high for centre in centres)
    if between >= 2:
        return [QCFinding("lumbosacral_transitional", f"{between} discs between L5 and the sacrum: a sixth lumbar "
                          "vertebra is suspected; check the level count before using per-level figures")]
    if between == 0:
        return [QCFinding("lumbosacral_transitional", "no disc between L5 and the sacrum: sacralisation of L5 is "
                          "suspected; check the level count before using per-level figures")]
    return []


def _centre(box) -> float:
    return (box[0].start + box[0].stop - 1) / 2
