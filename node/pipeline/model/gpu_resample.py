"""TotalSegmentator's change_spacing with the resampling itself done by torch on a GPU.

Same output shape, affine and interpolation as totalsegmentator.resampling.change_spacing →
scipy.ndimage.zoom(mode="nearest", grid_mode=False): output voxel o samples input coordinate
o·(n_in − 1)/(n_out − 1) on each axis (corners aligned); order 1 is trilinear between the
neighbours, order 0 takes the nearest (half rounds up). TotalSegmentator 2.18 resamples the CT
with order 1 (resampling_order) and the labels back with order 0. Only the engine on a GPU uses
this; on the CPU it keeps TotalSegmentator's own function, so that labels match exactly there.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F


def change_spacing_on(device: torch.device, img_in: nib.Nifti1Image, new_spacing=1.25, target_shape=None,
                      order: int = 0, dtype=None, force_affine=None) -> nib.Nifti1Image:
    """change_spacing(img_in, new_spacing, target_shape, order, dtype=, force_affine=) on `device`."""
    data = np.asanyarray(img_in.dataobj)
    old_shape = np.array(data.shape)
    img_spacing = np.array(img_in.header.get_zooms())[:3]
    new_spacing = np.array([new_spacing] * 3 if isinstance(new_spacing, float) else new_spacing)
    if target_shape is not None:
        zoom = np.array(target_shape) / old_shape
        new_spacing = img_spacing / zoom
    else:
        zoom = img_spacing / new_spacing
    if np.array_equal(img_spacing, new_spacing):
        return img_in
    new_affine = np.copy(img_in.affine)
    for axis in range(3):
        new_affine[:3, axis] = new_affine[:3, axis] / zoom[axis]
    out_shape = tuple(int(round(n * z)) for n, z in zip(data.shape, zoom, strict=True))  # as ndimage.zoom
    new_data = resample_array(torch.from_numpy(np.ascontiguousarray(data)).to(device), out_shape, order)
    new_data = new_data.cpu().numpy()
    if dtype is not None:
        new_data = new_data.astype(dtype)
    return nib.Nifti1Image(new_data, force_affine if force_affine is not None else new_affine)


def resample_array(data: torch.Tensor, out_shape: tuple[int, int, int], order: int) -> torch.Tensor:
    """ndimage.zoom's grid on a 3-D tensor: order 0 keeps the dtype, order 1 returns float64."""
    if order == 0:
        for axis, size in enumerate(out_shape):
            data = torch.index_select(data, axis, _nearest(data.shape[axis], size, data.device))
        return data
    if order != 1:
        raise ValueError(f"order {order} is not used by TotalSegmentator's pipeline here: use 0 or 1")
    volume = data.to(torch.float64)[None, None]  # as scipy: float32 would move values across integers
    return F.interpolate(volume, size=out_shape, mode="trilinear", align_corners=True)[0, 0]


def _nearest(n_in: int, n_out: int, device: torch.device) -> torch.Tensor:
    scale = (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
    coordinate = torch.arange(n_out, dtype=torch.float64, device=device) * scale
    return torch.floor(coordinate + 0.5).clamp_(0, n_in - 1).to(torch.long)
