"""TotalSegmentator 2.18's roi_subset pipeline, step by step, on images in memory.

This is what `totalsegmentator(image, task="total", roi_subset=..., fast=...)` and
`totalsegmentator(image, task="vertebrae_body")` do with the node's arguments on CT, and
`totalsegmentator(image, task="total_mr", roi_subset=..., fast=...)` and
`totalsegmentator(image, task="vertebrae_mr")` on MR (python_api.totalsegmentator →
nnunet.nnUNet_predict_image), with TotalSegmentator's own functions for every step, except two
things that only cost time:

- where TotalSegmentator writes the resampled image to a NIfTI file for nnU-Net and reads the
  labels back, the image goes to an already loaded model in memory (`Predict`), as nnU-Net's
  SimpleITK reader would hand it over: axes (z, y, x), float32, spacing reversed;
- the models are loaded once by the caller instead of once per call.

So on the CPU the labels are TotalSegmentator's, voxel for voxel (tests/test_engine.py checks it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import nibabel as nib
import numpy as np
from totalsegmentator.alignment import as_closest_canonical, undo_canonical
from totalsegmentator.cropping import crop_to_mask, undo_crop
from totalsegmentator.map_tasks_config import TASK_CONFIGS
from totalsegmentator.map_to_binary import (
    class_map,
    class_map_5_parts,
    class_map_parts_mr,
    map_taskid_to_partname_ct,
    map_taskid_to_partname_mr,
)
from totalsegmentator.postprocessing import remove_auxiliary_labels
from totalsegmentator.resampling import change_spacing

from node.weights import CROP_TASK_ID, CROP_TRAINER, MR_CROP_TASK_ID, MR_CROP_TRAINER, Model

CROP_ADDON_MM = [20, 20, 20]  # python_api: roi_subset's crop margin
IMAGE_ORDER = 1  # totalsegmentator(resampling_order=1): the image to the model's spacing
LABEL_ORDER = 0  # nnUNet_predict_image: labels back to the image grid (higher_order_resampling off)
BODY_TASK = "vertebrae_body"
VERTEBRAE_MR_TASK = "vertebrae_mr"


@dataclass(frozen=True)
class RoiTask:
    """A task that takes roi_subset: its crop model (python_api) and its parts (nnUNet_predict_image)."""

    name: str
    crop: Model
    crop_spacing: float
    part_of_task: dict[int, str]  # task id -> part name
    part_classes: dict[str, dict[int, str]]  # part name -> part-local classes


# CT crops with the 6 mm model (not robust); MR always with the 3 mm one ("6mm too bad results").
TOTAL = RoiTask("total", Model(CROP_TASK_ID, CROP_TRAINER), 6.0, map_taskid_to_partname_ct, class_map_5_parts)
TOTAL_MR = RoiTask("total_mr", Model(MR_CROP_TASK_ID, MR_CROP_TRAINER), 3.0, map_taskid_to_partname_mr,
                   class_map_parts_mr)
_PARTS = {task.name: task for task in (TOTAL, TOTAL_MR)}


class Predict(Protocol):
    """One loaded nnU-Net model on one image: data (z, y, x) float32 with spacing (z, y, x) → labels (z, y, x)."""

    def __call__(self, model: Model, data_zyx: np.ndarray, spacing_zyx: tuple[float, float, float]) -> np.ndarray: ...


Resample = Callable[..., nib.Nifti1Image]  # change_spacing(img, new_spacing, target_shape=None, order=, dtype=, force_affine=)


@dataclass(frozen=True)
class Step:
    """One nnUNet_predict_image call: its models (several: parts whose labels are combined), spacing and task."""

    models: tuple[Model, ...]
    resample: float
    task_name: str
    multimodel: bool


def tile_step_size(task_name: str) -> float:
    """nnUNet_predict_image: fewer overlapping tiles for the total models."""
    return 0.8 if task_name in ("total", "total_v3", "total_mr") else 0.5


def crop_step(task: RoiTask = TOTAL) -> Step:
    return Step((task.crop,), task.crop_spacing, task.name, multimodel=False)


def total_step(fast: bool, roi_subset: Sequence[str], task: RoiTask = TOTAL) -> Step:
    """The fast 3 mm model, or only the 1.5 mm parts that hold an ROI class, in TotalSegmentator's part order."""
    mode = TASK_CONFIGS[task.name]["sub_modes"]["fast" if fast else "default"]
    if not isinstance(mode["task_id"], list):
        return Step((Model(mode["task_id"], mode["trainer"]),), float(mode["resample"]), task.name, multimodel=False)
    task_of_part = {name: task_id for task_id, name in task.part_of_task.items()}
    parts = [task_of_part[name] for name, part_map in task.part_classes.items()
             if any(organ in roi_subset for organ in part_map.values())]
    return Step(tuple(Model(task_id, mode["trainer"]) for task_id in parts), float(mode["resample"]), task.name,
                multimodel=True)


def whole_image_step(task_name: str) -> Step:
    """A task without sub-modes or crop, run on the whole image (vertebrae_body, vertebrae_mr)."""
    task = TASK_CONFIGS[task_name]
    return Step((Model(task["task_id"], task["trainer"]),), float(task["resample"]), task_name, multimodel=False)


def body_step() -> Step:
    return whole_image_step(BODY_TASK)


def steps_for(fast: bool, vertebral_bodies: bool, roi_subset: Sequence[str]) -> list[Step]:
    """Every step a CT job runs, so that an engine can load all their models before the first job."""
    return [crop_step(), total_step(fast, roi_subset)] + ([body_step()] if vertebral_bodies else [])


def mr_steps_for(fast: bool, roi_subset: Sequence[str]) -> list[Step]:
    """Every step an MR job runs: total_mr with roi_subset, then vertebrae_mr."""
    return [crop_step(TOTAL_MR), total_step(fast, roi_subset, TOTAL_MR), whole_image_step(VERTEBRAE_MR_TASK)]


class RoiPipeline:
    """The node's TotalSegmentator calls, with `predict` for nnU-Net and `resample` for change_spacing."""

    def __init__(self, predict: Predict, resample: Resample = change_spacing) -> None:
        self._predict = predict
        self._resample = resample

    def total(self, image: nib.Nifti1Image, fast: bool, roi_subset: Sequence[str], task: RoiTask = TOTAL) -> np.ndarray:
        """task "total" (or "total_mr") with roi_subset: the crop model's ROI (+20 mm), then the parts;
        uint8 in the task's numbering on the image grid."""
        organ_seg = self.predict_image(image, crop_step(task))
        class_map_inv = {name: index for index, name in class_map[task.name].items()}
        crop_mask = np.zeros(organ_seg.shape, dtype=np.uint8)
        for roi in roi_subset:
            crop_mask[organ_seg == class_map_inv[roi]] = 1
        crop = nib.Nifti1Image(crop_mask, image.affine)
        return self.predict_image(image, total_step(fast, roi_subset, task), crop=crop, roi_subset=roi_subset)

    def vertebrae_body(self, image: nib.Nifti1Image) -> np.ndarray:
        """task "vertebrae_body" on the whole image; uint8 classes on the image grid."""
        return self.predict_image(image, body_step())

    def vertebrae_mr(self, image: nib.Nifti1Image) -> np.ndarray:
        """task "vertebrae_mr" on the whole image; uint8 in its numbering (1 sacrum, 2 L5 ... 6 L1, ...)."""
        return self.predict_image(image, whole_image_step(VERTEBRAE_MR_TASK))

    def predict_image(self, img_in_orig: nib.Nifti1Image, step: Step, crop: nib.Nifti1Image | None = None,
                      roi_subset: Sequence[str] | None = None) -> np.ndarray:
        """nnUNet_predict_image for a multilabel result in memory; the comments name its steps."""
        label_map = class_map[step.task_name]
        if roi_subset is not None:
            label_map = {k: v for k, v in label_map.items() if v in roi_subset}
        img_in = nib.Nifti1Image(img_in_orig.get_fdata(), img_in_orig.affine)  # copy img_in_orig
        bbox = None
        if crop is not None:
            # An empty crop returns early only when writing a file; in memory (file_out None) 2.18 goes on,
            # and crop_to_mask keeps the whole image ("Could not crop because no foreground detected").
            img_in, bbox = crop_to_mask(img_in, crop, addon=CROP_ADDON_MM, dtype=np.int32)
        img_in = as_closest_canonical(img_in)
        img_in_shape = img_in.shape
        spacing = [step.resample] * 3
        img_in_rsp = self._resample(img_in, spacing, order=IMAGE_ORDER, dtype=np.int32)

        seg = self._run_models(img_in_rsp, step)
        img_pred = remove_auxiliary_labels(nib.Nifti1Image(seg, img_in_rsp.affine), step.task_name)
        img_pred = self._resample(img_pred, spacing, img_in_shape, order=LABEL_ORDER, dtype=np.uint8,
                                  force_affine=img_in.affine)
        img_pred = undo_canonical(img_pred, img_in_orig)
        if bbox is not None:
            img_pred = undo_crop(img_pred, img_in_orig, bbox)
        img_data = img_pred.get_fdata().astype(np.uint8)
        if roi_subset is not None:  # keep only voxel values of the roi_subset
            img_data *= np.isin(img_data, list(label_map.keys()))
        return img_data

    def _run_models(self, img_in_rsp: nib.Nifti1Image, step: Step) -> np.ndarray:
        """What nnU-Net reads from s01_0000.nii.gz, predicted by each model; parts mapped and combined."""
        data_zyx = np.asarray(img_in_rsp.dataobj).transpose(2, 1, 0)[None].astype(np.float32)
        spacing_zyx = tuple(float(z) for z in img_in_rsp.header.get_zooms()[:3][::-1])
        if not step.multimodel:
            return _as_labels(self._predict(step.models[0], data_zyx, spacing_zyx))
        class_map_inv = {name: index for index, name in class_map[step.task_name].items()}
        parts = _PARTS[step.task_name]
        combined = np.zeros(img_in_rsp.shape, dtype=np.uint8)
        for model in step.models:  # a later part overwrites an earlier one where it is not background
            part_map = parts.part_classes[parts.part_of_task[model.task_id]]
            lut = np.zeros(max(part_map.keys()) + 1, dtype=np.uint8)
            for index, name in part_map.items():
                lut[index] = class_map_inv[name]
            seg = _as_labels(self._predict(model, data_zyx, spacing_zyx))
            if seg.size > 0 and seg.max() >= len(lut):
                lut = np.pad(lut, (0, int(seg.max()) + 1 - len(lut)), mode="constant")
            mapped = lut[seg]
            np.copyto(combined, mapped, where=mapped != 0)
        return combined


def _as_labels(seg_zyx: np.ndarray) -> np.ndarray:
    """nnU-Net's labels in NIfTI axis order, as TotalSegmentator reads them back (uint8)."""
    return np.ascontiguousarray(seg_zyx.transpose(2, 1, 0)).astype(np.uint8)
