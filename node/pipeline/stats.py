"""HU statistics of a set of voxels, the same for muscle, bone and organs."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class HUStats:
    voxels: int
    volume_cm3: float
    median_hu: float | None
    mean_hu: float | None
    sd_hu: float | None
    p25_hu: float | None
    p75_hu: float | None


def hu_stats(values: np.ndarray, voxel_mm3: float) -> HUStats:
    """Percentiles interpolate linearly (numpy's default, as pyradiomics); SD is the population SD."""
    n = int(values.size)
    volume = n * voxel_mm3 / 1000.0
    if n == 0:
        return HUStats(0, 0.0, None, None, None, None, None)
    p25, median, p75 = np.percentile(values, [25, 50, 75])
    mean, sd = values.mean(dtype=np.float64), values.std(dtype=np.float64)
    return HUStats(n, volume, float(median), float(mean), float(sd), float(p25), float(p75))
