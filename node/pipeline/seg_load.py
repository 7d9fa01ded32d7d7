"""Read an existing TotalSegmentator output and map it onto the CT grid by physical coordinates.

Two forms are accepted, as TotalSegmentator writes them: a folder of per-class masks
(`vertebrae_T1.nii.gz`, `autochthon_left.nii.gz`, optional `vertebrae_body.nii.gz`, and
`vertebrae_L1.nii.gz`, `liver.nii.gz`, `spleen.nii.gz` when present), or one
multilabel NIfTI in `total` numbering (with an optional `vertebrae_body.nii.gz` beside it).
Nearest-neighbour resampling keeps labels exact when the grids share voxel centres, whatever
the orientation or axis order of the mask files.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from node.config import SegmenterConfig
from node.labels import BODY_CLASS, CLASS_LABEL, DISCS_CLASS, MR_CLASS_LABEL
from node.pipeline.ct import CTVolume, InputError
from node.pipeline.segmentation import PrecomputedMissingError, Segmentation

BODY_FILE = f"{BODY_CLASS}.nii.gz"


def load_segmentation(path: Path, ct: CTVolume) -> Segmentation:
    path = Path(path)
    if path.is_dir():
        return _load_folder(path, ct)
    if path.is_file():
        labels = _on_ct_grid(path, ct)
        return Segmentation(labels=labels, body=_optional_body(path.parent / BODY_FILE, ct))
    raise InputError(f"segmentation {path} does not exist: give a TotalSegmentator output folder or multilabel NIfTI")


def load_mr_segmentation(folder: Path, grid: CTVolume) -> Segmentation:
    """A folder of total_mr and vertebrae_mr masks (autochthon_left.nii.gz, vertebrae_L1.nii.gz, sacrum.nii.gz,
    intervertebral_discs.nii.gz, ...) on the segmented MR series' grid."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"segmentation {folder} is not a folder: give the folder of total_mr and vertebrae_mr masks")
    labels = _labels_from(folder, grid, MR_CLASS_LABEL, "autochthon_left.nii.gz, vertebrae_L1.nii.gz, ...")
    discs_file = folder / f"{DISCS_CLASS}.nii.gz"
    discs = _on_ct_grid(discs_file, grid) > 0 if discs_file.is_file() else None
    return Segmentation(labels=labels, discs=discs)


class PrecomputedSegmenter:
    """Reads segmentations made elsewhere from `precomputed_dir/<SeriesInstanceUID>/`; the job waits for it."""

    def __init__(self, config: SegmenterConfig) -> None:
        self.root = Path(config.precomputed_dir)
        self.model_s = config.simulated_model_s

    def segment(self, ct: CTVolume) -> Segmentation:
        return load_segmentation(self._folder(ct, "the TotalSegmentator output for this series is"), ct)

    def segment_mr(self, image: CTVolume) -> Segmentation:
        """The MR series' masks from `precomputed_dir/<SeriesInstanceUID>/`, named as total_mr and vertebrae_mr name them."""
        return load_mr_segmentation(self._folder(image, "the total_mr and vertebrae_mr masks of this series are"), image)

    def _folder(self, image: CTVolume, what: str) -> Path:
        """The series' folder, after a model's time (for scale-out benches and fault tests; 0 by default)."""
        time.sleep(self.model_s)
        folder = self.root / str(image.series_uid)
        if not folder.is_dir():
            raise PrecomputedMissingError(
                f"no precomputed segmentation in {folder} yet: the job waits until {what} put there"
            )
        return folder


def _load_folder(folder: Path, ct: CTVolume) -> Segmentation:
    labels = _labels_from(folder, ct, CLASS_LABEL, "vertebrae_T1.nii.gz, autochthon_left.nii.gz, ...")
    return Segmentation(labels=labels, body=_optional_body(folder / BODY_FILE, ct))


def _labels_from(folder: Path, ct: CTVolume, names: dict[str, int], example: str) -> np.ndarray:
    present = {name: folder / f"{name}.nii.gz" for name in names if (folder / f"{name}.nii.gz").is_file()}
    if not present:
        raise InputError(f"{folder} holds none of the TotalSegmentator masks ({example})")
    labels = np.zeros(ct.shape, dtype=np.uint8)
    for name, file in present.items():
        labels[_on_ct_grid(file, ct) > 0] = names[name]
    return labels


def _optional_body(file: Path, ct: CTVolume) -> np.ndarray | None:
    """The vertebrae_body task writes 1 = body, 2 = discs (multilabel) or a binary body mask."""
    return _on_ct_grid(file, ct) == 1 if file.is_file() else None


def _on_ct_grid(file: Path, ct: CTVolume) -> np.ndarray:
    try:
        image = sitk.ReadImage(str(file))
    except RuntimeError as exc:
        raise InputError(f"cannot read mask {file}: {str(exc).strip().splitlines()[-1]}") from None
    reference = ct.reference_image()
    _check_same_extent(image, reference, file)
    same_voxels = _index_view(image, reference)
    if same_voxels is not None:
        return same_voxels
    image = sitk.Cast(image, sitk.sitkUInt8) if image.GetPixelID() != sitk.sitkUInt8 else image
    resampled = sitk.Resample(image, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return sitk.GetArrayFromImage(resampled)


def _index_view(image: sitk.Image, reference: sitk.Image) -> np.ndarray | None:
    """The mask as [k, r, c] by axis permutation and flips alone, when both grids share voxel centres.

    This is what nearest-neighbour resampling would give, without interpolating 10^8 voxels.
    """
    to_mask = np.linalg.inv(_index_to_physical(image))
    mapping = to_mask @ _index_to_physical(reference)
    offset = to_mask @ (np.array(reference.GetOrigin()) - np.array(image.GetOrigin()))
    signs = np.round(mapping)
    if np.abs(mapping - signs).max() > 1e-3 or np.abs(offset - np.round(offset)).max() > 1e-3:
        return None
    if not (np.abs(signs).sum(axis=0) == 1).all() or not (np.abs(signs).sum(axis=1) == 1).all():
        return None
    array = sitk.GetArrayViewFromImage(image)  # axes (z, y, x): mask axis i is numpy axis 2 - i
    picks: list[slice | None] = [None] * 3
    axis_of = {}
    for j, n in enumerate(reference.GetSize()):
        i = int(np.argmax(np.abs(signs[:, j])))
        step, start = int(signs[i, j]), int(round(offset[i]))
        stop = start + step * (n - 1)
        if min(start, stop) < 0 or max(start, stop) >= image.GetSize()[i]:
            return None
        picks[2 - i] = slice(start, stop + 1) if step > 0 else slice(start, stop - 1 if stop > 0 else None, -1)
        axis_of[j] = 2 - i
    view = np.transpose(array[tuple(picks)], [axis_of[2], axis_of[1], axis_of[0]])
    return np.array(view, dtype=np.uint8, order="C")  # a copy: the view dies with `image`


def _index_to_physical(image: sitk.Image) -> np.ndarray:
    return np.array(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing())


def _check_same_extent(image: sitk.Image, reference: sitk.Image, file: Path) -> None:
    """A mask of another series would be measured silently wrong; demand the same physical box."""
    tolerance = max(max(image.GetSpacing()), max(reference.GetSpacing()))
    if np.max(np.abs(_box(image) - _box(reference))) > tolerance:
        raise InputError(f"mask {file.name} does not cover the same region as the CT: is it from another series?")


def _box(image: sitk.Image) -> np.ndarray:
    size = image.GetSize()
    corners = [
        image.TransformContinuousIndexToPhysicalPoint([c * (n - 1) for c, n in zip(corner, size)])
        for corner in np.ndindex(2, 2, 2)
    ]
    points = np.array(corners)
    return np.concatenate([points.min(axis=0), points.max(axis=0)])
