"""Liver and spleen parenchyma attenuation, for hepatic steatosis on unenhanced CT.

Parenchyma of an organ mask, the same rule for liver and spleen:
  1. erode the mask by `erosion_mm` in physical millimetres on the CT grid (a voxel stays when
     no voxel outside the organ lies within that distance), which removes the partial-volume
     border; the edge of the field of view is not an organ border and is not eroded;
  2. keep the voxels within median ± window_mad × 1.4826 × MAD of the eroded organ's own HU,
     which removes vessels, focal lesions, calcifications and segmentation leaks, whatever the
     organ's attenuation (fatty or not). The window is found twice, the second time from the
     voxels the first one kept: vessels and lesions widen the first MAD, not the second.
The organ is partial when its mask touches any face of the field of view; its numbers are kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from node.config import BiomarkersConfig
from node.labels import LIVER, SPLEEN
from node.pipeline.contrast import ContrastStatus
from node.pipeline.ct import CTVolume
from node.pipeline.flags import Flag
from node.pipeline.segmentation import Segmentation
from node.pipeline.stats import HUStats, hu_stats
from node.screening import LevelStatus

MAD_TO_SD = 1.4826  # MAD × this estimates the SD of normally distributed values


@dataclass
class OrganResult:
    status: LevelStatus  # complete, partial (touches the edge of the field of view) or absent
    reasons: list[str]
    covered_volume_cm3: float  # the whole organ mask within the field of view
    window_hu: list[float] | None  # the parenchyma window [low, high]
    parenchyma: HUStats


@dataclass
class LiverResult(OrganResult):
    spleen: OrganResult
    liver_minus_spleen_hu: float | None
    flag: Flag


def measure_liver(ct: CTVolume, seg: Segmentation, params: BiomarkersConfig, boxes: list,
                  contrast: ContrastStatus) -> LiverResult:
    """`boxes` from ndimage.find_objects over the labels (at least up to the liver's label)."""
    liver = measure_organ(ct, seg, "liver", LIVER, boxes[LIVER - 1], params)
    spleen = measure_organ(ct, seg, "spleen", SPLEEN, boxes[SPLEEN - 1], params)
    liver_median, spleen_median = liver.parenchyma.median_hu, spleen.parenchyma.median_hu
    difference = None if liver_median is None or spleen_median is None else liver_median - spleen_median
    return LiverResult(**vars(liver), spleen=spleen, liver_minus_spleen_hu=difference,
                       flag=_liver_flag(liver, params, contrast))


def measure_organ(ct: CTVolume, seg: Segmentation, name: str, label: int, box, params: BiomarkersConfig) -> OrganResult:
    empty = hu_stats(np.empty(0), ct.voxel_volume_mm3)
    if box is None:
        return OrganResult(LevelStatus.ABSENT, [f"{name} not segmented"], 0.0, None, empty)
    mask = seg.labels[box] == label
    covered = float(np.count_nonzero(mask)) * ct.voxel_volume_mm3 / 1000.0
    edges = [i for i, axis in enumerate(box) if axis.start == 0 or axis.stop == ct.shape[i]]
    reasons = [f"{name} touches the edge of the field of view ({_edge_names(edges)})"] if edges else []
    status = LevelStatus.PARTIAL if edges else LevelStatus.COMPLETE
    values = ct.hu[box][eroded_organ(ct, mask, box, params.erosion_mm)]
    if values.size == 0:
        return OrganResult(status, [*reasons, f"no {name} voxels left after the {params.erosion_mm:g} mm erosion"],
                           covered, None, empty)
    low, high = parenchyma_window(values, params.window_mad)
    return OrganResult(status, reasons, covered, [low, high],
                       hu_stats(values[(values >= low) & (values <= high)], ct.voxel_volume_mm3))


def eroded_organ(ct: CTVolume, mask: np.ndarray, box, erosion_mm: float) -> np.ndarray:
    return erode_mm(mask, ct.spacing, erosion_mm, _open_faces(box, ct.shape))


def parenchyma_mask(ct: CTVolume, seg: Segmentation, label: int, box, erosion_mm: float,
                    window: list[float]) -> np.ndarray:
    """The organ's measured voxels within `box` (its bounding box), for the SEG: the eroded organ in `window`."""
    hu = ct.hu[box]
    return eroded_organ(ct, seg.labels[box] == label, box, erosion_mm) & (hu >= window[0]) & (hu <= window[1])


def parenchyma_window(values: np.ndarray, k: float, passes: int = 2) -> tuple[float, float]:
    kept = values
    for _ in range(passes):
        median = float(np.median(kept))
        spread = k * MAD_TO_SD * float(np.median(np.abs(kept - median)))
        low, high = median - spread, median + spread
        kept = values[(values >= low) & (values <= high)]
    return low, high


def erode_mm(mask: np.ndarray, spacing: tuple[float, float, float], radius_mm: float,
             open_faces: tuple[tuple[bool, bool], ...] | None = None) -> np.ndarray:
    """Voxels of `mask` farther than `radius_mm` (physical, per-axis spacing) from every voxel outside it.

    `open_faces[axis] = (low, high)`: True where the array ends inside the body, so that just beyond
    it lies background (a cropped bounding box); False at the edge of the field of view, which is not
    eroded.
    """
    if radius_mm <= 0:
        return mask
    faces = open_faces if open_faces is not None else ((True, True),) * 3
    padded = np.pad(mask, [(int(low), int(high)) for low, high in faces], constant_values=False)
    if padded.all():
        return mask
    distance = ndimage.distance_transform_edt(padded, sampling=spacing)
    inner = tuple(slice(int(low), padded.shape[i] - int(high)) for i, (low, high) in enumerate(faces))
    return distance[inner] > radius_mm


def _open_faces(box: tuple[slice, ...], shape: tuple[int, int, int]) -> tuple[tuple[bool, bool], ...]:
    return tuple((axis.start > 0, axis.stop < n) for axis, n in zip(box, shape))


def _edge_names(axes: list[int]) -> str:
    return ", ".join(("first or last slice", "top or bottom row", "left or right column")[i] for i in axes)


def _liver_flag(liver: OrganResult, params: BiomarkersConfig, contrast: ContrastStatus) -> Flag:
    rule = f"liver parenchyma median < {params.liver_low_hu:g} HU"
    value = liver.parenchyma.median_hu
    if value is None:
        reason = liver.reasons[-1] if liver.reasons else "no liver parenchyma"
    elif liver.parenchyma.volume_cm3 < params.min_parenchyma_cm3:
        reason = (f"only {liver.parenchyma.volume_cm3:.1f} cm³ of liver parenchyma, "
                  f"less than biomarkers.min_parenchyma_cm3 = {params.min_parenchyma_cm3:g}")
    else:
        reason = contrast.why_not_assessed()
    if reason is not None or value is None:
        return Flag.not_assessed(rule, value, params.liver_low_hu, reason or "no liver parenchyma")
    return Flag.assessed(rule, value, params.liver_low_hu, value < params.liver_low_hu)
