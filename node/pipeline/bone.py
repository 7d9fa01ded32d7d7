"""Vertebral trabecular attenuation per level, T1–L5: the seed vBMD method's bone measure.

Per level Ln the mask is the one the muscle slabs are cut from,
  vertebrae_body ∩ vertebrae_Ln ∩ (body_hu_min ≤ HU ≤ body_hu_max),
and its statistics are taken over all its voxels, with no resampling. Without the
`vertebrae_body` segmentation the mask is the whole vertebra within the window: cortical and
posterior-element bone then enter, so the numbers are not the seed method's and say so.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from node.config import MeasureConfig
from node.labels import VERTEBRA_LABEL
from node.pipeline.contrast import ContrastStatus
from node.pipeline.ct import CTVolume
from node.pipeline.flags import Flag
from node.pipeline.segmentation import Segmentation
from node.pipeline.stats import HUStats, hu_stats
from node.screening import LevelStatus

BODY_MASK = "vertebral_body"
WHOLE_VERTEBRA_MASK = "whole_vertebra"


@dataclass
class VertebraResult:
    level: str
    status: LevelStatus  # complete, partial (the vertebra touches the first or last slice) or absent
    reasons: list[str]
    mask: str  # vertebral_body (the seed method) or whole_vertebra
    trabecular: HUStats


def measure_vertebrae(ct: CTVolume, seg: Segmentation, params: MeasureConfig, boxes: list,
                      levels: tuple[str, ...]) -> list[VertebraResult]:
    """`boxes` from ndimage.find_objects over the labels: only each vertebra's box is scanned."""
    return [_vertebra(ct, seg, params, level, boxes[VERTEBRA_LABEL[level] - 1]) for level in levels]


def _vertebra(ct: CTVolume, seg: Segmentation, params: MeasureConfig, level: str, box) -> VertebraResult:
    mask_kind = BODY_MASK if seg.body is not None else WHOLE_VERTEBRA_MASK
    if box is None:
        return VertebraResult(level, LevelStatus.ABSENT, ["vertebra not segmented"], mask_kind, hu_stats(np.empty(0), ct.voxel_volume_mm3))
    mask = trabecular_mask(ct, seg, level, box, params.body_hu_min, params.body_hu_max)
    stats = hu_stats(ct.hu[box][mask], ct.voxel_volume_mm3)
    if stats.voxels == 0:
        return VertebraResult(level, LevelStatus.ABSENT, ["no vertebral body voxels within the HU window"], mask_kind, stats)
    reasons = ["vertebra touches the first or last slice"] if box[0].start == 0 or box[0].stop == ct.shape[0] else []
    return VertebraResult(level, LevelStatus.PARTIAL if reasons else LevelStatus.COMPLETE, reasons, mask_kind, stats)


def trabecular_mask(ct: CTVolume, seg: Segmentation, level: str, box, hu_min: float, hu_max: float) -> np.ndarray:
    """The level's measured voxels within `box` (the vertebra's bounding box); the SEG draws the same."""
    mask = seg.labels[box] == VERTEBRA_LABEL[level]
    if seg.body is not None:
        mask &= seg.body[box]
    hu = ct.hu[box]
    mask &= (hu >= hu_min) & (hu <= hu_max)
    return mask


def bone_flag(vertebrae: list[VertebraResult], params: MeasureConfig, contrast: ContrastStatus) -> Flag:
    """Low bone attenuation at `bone_flag_level`: median ≤ bone_low_hu, assessed only where the threshold holds."""
    level = params.bone_flag_level
    rule = f"{level} trabecular median ≤ {params.bone_low_hu:g} HU"
    vertebra = next(v for v in vertebrae if v.level == level)
    value = vertebra.trabecular.median_hu
    if vertebra.status is not LevelStatus.COMPLETE:
        reason = f"{level} is {vertebra.status} ({'; '.join(vertebra.reasons)})"
    elif vertebra.mask != BODY_MASK:
        reason = "vertebral bodies not segmented: the whole-vertebra mask adds cortical and posterior-element bone"
    else:
        reason = contrast.why_not_assessed()
    if reason is not None or value is None:
        return Flag.not_assessed(rule, value, params.bone_low_hu, reason or f"no {level} trabecular voxels")
    return Flag.assessed(rule, value, params.bone_low_hu, value <= params.bone_low_hu)
