"""The CT volume as every later stage sees it: HU voxels on a known patient grid."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk
from pydicom import Dataset

from node.errors import InputError

__all__ = ["CTVolume", "InputError"]


@dataclass
class CTVolume:
    """HU voxels indexed [k, r, c] = [slice, row, column].

    `direction` holds, as columns, the unit LPS vectors of the c, r and k axes (SimpleITK
    order), so that LPS(c, r, k) = origin + direction @ (spacing_crk * (c, r, k)).
    """

    hu: np.ndarray
    spacing: tuple[float, float, float]  # (dk, dr, dc) in mm
    origin: np.ndarray
    direction: np.ndarray
    slice_thickness: float | None = None
    datasets: list[Dataset] = field(default_factory=list)  # sorted like hu, pixel data removed

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.hu.shape)  # type: ignore[return-value]

    @property
    def voxel_volume_mm3(self) -> float:
        return float(np.prod(self.spacing))

    @property
    def superior_sign(self) -> int:
        """+1 when a higher slice index lies further superior (LPS +z), else -1."""
        return 1 if self.direction[2, 2] >= 0 else -1

    @property
    def study_uid(self) -> str | None:
        return self._uid("StudyInstanceUID")

    @property
    def series_uid(self) -> str | None:
        return self._uid("SeriesInstanceUID")

    def _uid(self, keyword: str) -> str | None:
        """None for NIfTI input and for anonymised series that blanked the UID."""
        return str(self.datasets[0].get(keyword, "")) or None if self.datasets else None

    def reference_image(self) -> sitk.Image:
        """An empty SimpleITK image on this grid, for resampling masks onto it."""
        image = sitk.Image([self.shape[2], self.shape[1], self.shape[0]], sitk.sitkUInt8)
        image.SetSpacing((self.spacing[2], self.spacing[1], self.spacing[0]))
        image.SetOrigin(tuple(float(v) for v in self.origin))
        image.SetDirection(tuple(float(v) for v in self.direction.flatten()))
        return image

    def to_sitk(self, array: np.ndarray | None = None) -> sitk.Image:
        """`array` (default: the HU voxels) as a SimpleITK image with this geometry."""
        image = sitk.GetImageFromArray(self.hu if array is None else array)
        image.CopyInformation(self.reference_image())
        return image
