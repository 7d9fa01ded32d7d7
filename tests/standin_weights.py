"""Stand-in TotalSegmentator weights: nnU-Net v2 folders in TotalSegmentator's exact layout with hand-set networks.

Each network is a PlainConvUNet whose weights are zero except a pass-through of the normalised CT
value x (encoder stage 0 → skip → last decoder stage) and the final 1×1×1 layer, so each model is a
fixed step function of the voxel's HU (see RULES). Parts run on the same voxels and TotalSegmentator
lets a later part overwrite an earlier one where the later one is not background, so:

    292 labels everything vertebrae_T1 (part-local 19 → total 43);
    294 labels HU ≥ 0 autochthon_left (local 18 → 86) and HU ≥ 600 autochthon_right (local 19 → 87);

which leaves, inside the crop: HU < 0 → 43, 0 ≤ HU < 600 → 86, HU ≥ 600 → 87. The 6 mm crop model
(298) labels HU ≥ `crop_threshold_hu` (default 0) vertebrae_T5, so the ROI is that region (+20 voxels).
vertebrae_body (305) labels HU ≥ 600 vertebrae_body (class 1) and the rest intervertebral_discs (class 2).
The other parts (291, 293, 295) exist because TotalSegmentator checks for them; they say background.
Each step sits half a HU below its threshold: CT values are integers, so no voxel is ever a tie.

`oriented=True` (parity tests) adds a class that depends on direction: 292 and 297 label
vertebrae_T2 where HU rises by more than RISE_HU from one voxel to the next along the network's
first axis (superior in TotalSegmentator's canonical orientation, including the zero padding
beyond the image), so a wrong transpose, flip or reorientation changes the labels.

`sabotage_checkpoint(..., "trip-exit" | "trip-hang")` keeps the crop model's weights but builds it
as a network that kills or blocks its process when the CT holds metal (HU ≥ TRIP_HU), so a test
can crash the model process in the middle of one job and not the next.

The MR stand-ins (`write_mr_standin_weights`: total_mr's 850/851 parts and 852 crop model, and
vertebrae_mr's 756) are step functions of the MR signal S the same way; they normalise with a
fixed window (MR_PROPERTIES, nnU-Net's CTNormalization) so that the steps sit at known signal
values, whatever the real MR models normalise with (the layout is what the node must find):

    852 (3 mm crop) labels S ≥ MR_HIGH autochthon_left, so the ROI is that region (+20 mm);
    850 labels S ≥ MR_LOW intervertebral_discs; 851 labels S ≥ MR_MID autochthon_left and
    S ≥ MR_HIGH autochthon_right, over 850 where it is not background;
    756 labels S ≥ MR_LOW vertebrae_L4 and S ≥ MR_HIGH sacrum.

With `oriented=True`, 850 labels spinal_cord, 851 iliopsoas_left (both outside the node's
roi_subset, so 0 in the result) and 756 vertebrae_L1 where S rises by more than RISE_HU along
the first axis.

`real_architecture=True` writes the 1.5 mm and 3 mm networks at their real size (InstanceNorm, features
32…320, patch 128³ / 112×112×128) for benchmarks: with InstanceNorm a pass-through would be normalised
per patch, so those give a constant class instead (292 T1, 294 autochthon_left, 305 vertebrae_body,
297 autochthon_left). The crop model keeps its threshold, without InstanceNorm (5 stages, patch 64³
assumed; it is cheap at 6 mm), so that the ROI covers a region as the real model's covers the spine.
293 and 295 stay tiny: roi_subset never runs them; 291 (organs) runs with [biomarkers] liver
and gives liver everywhere at real size (292 then overwrites it).
"""

from __future__ import annotations

import json
import os
import pickle
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from totalsegmentator.map_tasks_config import TASK_CONFIGS, TASK_ID_WEIGHTS_CONFIGS
from totalsegmentator.map_to_binary import (
    class_map,
    class_map_5_parts,
    class_map_parts_mr,
    map_taskid_to_partname_ct,
    map_taskid_to_partname_mr,
)

MID_HU = 0.0
HIGH_HU = 600.0
# The 3 mm model's CT normalisation (reference.md); x = (clip(HU) - mean) / std.
CT_PROPERTIES = {"max": 3071.0, "min": -1024.0, "mean": -50.387, "median": 30.0, "std": 503.392,
                 "percentile_00_5": -1004.0, "percentile_99_5": 1588.0}
# The MR stand-ins' fixed window on the signal (x = (clip(S) - mean) / std), and their steps.
MR_PROPERTIES = {"max": 4000.0, "min": 0.0, "mean": 500.0, "median": 500.0, "std": 400.0,
                 "percentile_00_5": 0.0, "percentile_99_5": 2000.0}
MR_LOW, MR_MID, MR_HIGH = 200.0, 600.0, 1000.0
OFFSET = 4.0  # keeps the pass-through positive, on LeakyReLU's linear side (x ≥ -2 after clipping)
SLOPE = 20.0
RISE_HU = 250.0
RISE_SLOPE = 1000.0
TRIP_HU = 1500.0  # below the normalisation's upper clip (percentile_99_5)
CROP_TRAINER = "nnUNetTrainer_4000epochs_NoMirroring"  # hard-coded for the crop model in python_api


@dataclass(frozen=True)
class Rule:
    """`base` below the first threshold, then each (threshold HU, class) from its threshold up."""

    base: str | None
    steps: tuple[tuple[float, str], ...] = ()
    rising: str | None = None  # the class where HU rises by more than RISE_HU along the first axis


@dataclass(frozen=True)
class Arch:
    features: tuple[int, ...]
    patch: tuple[int, int, int]
    norm: bool


TINY = Arch((4, 8, 16), (32, 32, 32), norm=False)
REAL_PART = Arch((32, 64, 128, 256, 320, 320), (128, 128, 128), norm=True)
REAL_3MM = Arch((32, 64, 128, 256, 320), (112, 112, 128), norm=True)
REAL_6MM = Arch((32, 64, 128, 256, 320), (64, 64, 64), norm=False)

PARTS = {tid: map_taskid_to_partname_ct[tid] for tid in (291, 292, 293, 294, 295)}
BODY_TASK = TASK_CONFIGS["vertebrae_body"]
VERTEBRAE_MR = TASK_CONFIGS["vertebrae_mr"]
MR_TASKS = (850, 851, 852, VERTEBRAE_MR["task_id"])

RULES: dict[int, Rule] = {
    291: Rule(None),
    292: Rule("vertebrae_T1"),
    293: Rule(None),
    294: Rule(None, ((MID_HU, "autochthon_left"), (HIGH_HU, "autochthon_right"))),
    295: Rule(None),
    297: Rule("vertebrae_T1", ((MID_HU, "autochthon_left"), (HIGH_HU, "autochthon_right"))),
    BODY_TASK["task_id"]: Rule("intervertebral_discs", ((HIGH_HU, "vertebrae_body"),)),
    850: Rule(None, ((MR_LOW, "intervertebral_discs"),)),
    851: Rule(None, ((MR_MID, "autochthon_left"), (MR_HIGH, "autochthon_right"))),
    852: Rule(None, ((MR_HIGH, "autochthon_left"),)),
    VERTEBRAE_MR["task_id"]: Rule(None, ((MR_LOW, "vertebrae_L4"), (MR_HIGH, "sacrum"))),
}
ORIENTED_RULES: dict[int, Rule] = {292: replace(RULES[292], rising="vertebrae_T2"),
                                   297: replace(RULES[297], rising="vertebrae_T2"),
                                   850: replace(RULES[850], rising="spinal_cord"),  # not in the roi_subset: 0
                                   851: replace(RULES[851], rising="iliopsoas_left"),
                                   VERTEBRAE_MR["task_id"]: replace(RULES[VERTEBRAE_MR["task_id"]], rising="vertebrae_L1")}
CONSTANT_RULES: dict[int, Rule] = {291: Rule("liver"), 292: Rule("vertebrae_T1"), 294: Rule("autochthon_left"),
                                   297: Rule("autochthon_left"), BODY_TASK["task_id"]: Rule("vertebrae_body")}


def _classes(task_id: int) -> dict[int, str]:
    if task_id in PARTS:
        return class_map_5_parts[PARTS[task_id]]
    if task_id in map_taskid_to_partname_mr:
        return class_map_parts_mr[map_taskid_to_partname_mr[task_id]]
    return class_map[{BODY_TASK["task_id"]: "vertebrae_body", 852: "total_mr",
                      VERTEBRAE_MR["task_id"]: "vertebrae_mr"}.get(task_id, "total")]


def _trainer(task_id: int) -> str:
    if task_id == 298:
        return CROP_TRAINER
    if task_id == BODY_TASK["task_id"]:
        return BODY_TASK["trainer"]
    if task_id == VERTEBRAE_MR["task_id"]:
        return VERTEBRAE_MR["trainer"]
    task = "total_mr" if task_id in MR_TASKS else "total"
    return TASK_CONFIGS[task]["sub_modes"]["fast" if task_id in (297, 852) else "default"]["trainer"]


def _spacing(task_id: int) -> float:
    return {297: 3.0, 298: 6.0, 852: 3.0}.get(task_id, 1.5)


def _properties(task_id: int) -> dict[str, float]:
    return MR_PROPERTIES if task_id in MR_TASKS else CT_PROPERTIES


def _arch(task_id: int, real_architecture: bool, part_patch: tuple[int, int, int] | None) -> Arch:
    if not real_architecture or task_id in (293, 295, *MR_TASKS):  # never run for the node's CT roi_subset
        return TINY
    arch = {297: REAL_3MM, 298: REAL_6MM}.get(task_id, REAL_PART)
    return replace(arch, patch=part_patch) if part_patch and arch is REAL_PART else arch


def _arch_kwargs(arch: Arch) -> dict:
    n = len(arch.features)
    return {
        "n_stages": n,
        "features_per_stage": list(arch.features),
        "conv_op": "torch.nn.modules.conv.Conv3d",
        "kernel_sizes": [[3, 3, 3]] * n,
        "strides": [[1, 1, 1]] + [[2, 2, 2]] * (n - 1),
        "n_conv_per_stage": [2] * n,
        "n_conv_per_stage_decoder": [2] * (n - 1),
        "conv_bias": True,
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d" if arch.norm else None,
        "norm_op_kwargs": {"eps": 1e-05, "affine": True} if arch.norm else None,
        "dropout_op": None,
        "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": True},
    }


def _plans(folder: str, arch: Arch, spacing: float, properties: dict[str, float]) -> dict:
    resampling = {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None}
    return {
        "dataset_name": folder,
        "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [spacing] * 3,
        "original_median_shape_after_transp": [256, 256, 256],
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {
            "3d_fullres": {
                "data_identifier": "nnUNetPlans_3d_fullres",
                "preprocessor_name": "DefaultPreprocessor",
                "batch_size": 2,
                "patch_size": list(arch.patch),
                "median_image_size_in_voxels": [256, 256, 256],
                "spacing": [spacing] * 3,
                "normalization_schemes": ["CTNormalization"],
                "use_mask_for_norm": [False],
                "resampling_fn_data": "resample_data_or_seg_to_shape",
                "resampling_fn_seg": "resample_data_or_seg_to_shape",
                "resampling_fn_data_kwargs": resampling,
                "resampling_fn_seg_kwargs": {**resampling, "is_seg": True, "order": 1},
                "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
                "resampling_fn_probabilities_kwargs": {**resampling, "order": 1},
                "architecture": {
                    "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                    "arch_kwargs": _arch_kwargs(arch),
                    "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
                },
                "batch_dice": False,
            }
        },
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": properties},
    }


def _dataset_json(classes: dict[int, str], channel: str) -> dict:
    labels = {"background": 0, **{name: index for index, name in sorted(classes.items())}}
    return {"channel_names": {"0": channel}, "labels": labels, "numTraining": 1, "file_ending": ".nii.gz"}


def _normalised(hu: float, properties: dict[str, float] = CT_PROPERTIES) -> float:
    clipped = min(max(hu, properties["percentile_00_5"]), properties["percentile_99_5"])
    return (clipped - properties["mean"]) / properties["std"]


def _network(arch: Arch, rule: Rule, classes: dict[int, str],
             properties: dict[str, float] = CT_PROPERTIES) -> torch.nn.Module:
    index = {name: i for i, name in classes.items()}
    plans_arch = _arch_kwargs(arch)
    net = get_network_from_plans("dynamic_network_architectures.architectures.unet.PlainConvUNet", plans_arch,
                                 ["conv_op", "norm_op", "dropout_op", "nonlin"], 1, len(classes) + 1,
                                 allow_init=False, deep_supervision=False)
    with torch.no_grad():
        for param in net.parameters():
            param.zero_()
        if not arch.norm:
            _pass_through(net, arch.features[0], rising=rule.rising is not None)
        seg = net.decoder.seg_layers[-1]
        seg.bias.fill_(-100.0)
        slope, bias = 0.0, 0.0
        seg.bias[index[rule.base] if rule.base else 0] = bias
        for threshold, name in rule.steps:
            # each step's line rises above the previous one exactly at its threshold
            slope += SLOPE
            bias -= SLOPE * (_normalised(threshold - 0.5, properties) + OFFSET)
            seg.weight[index[name], 0, 0, 0, 0] = slope
            seg.bias[index[name]] = bias
        if rule.rising:  # far above every step's line once the rise passes RISE_HU
            seg.weight[index[rule.rising], 1, 0, 0, 0] = RISE_SLOPE
            seg.bias[index[rule.rising]] = -RISE_SLOPE * RISE_HU / properties["std"]
    return net


def _pass_through(net: torch.nn.Module, first_features: int, rising: bool = False) -> None:
    """Carry x + OFFSET in channel 0 from the input to the last decoder stage (centre taps only).

    With `rising`, channel 1 carries x[i+1] - x[i] along the first axis the same way.
    """
    first, second = net.encoder.stages[0][0].convs
    last_first, last_second = net.decoder.stages[-1].convs
    first.conv.weight[0, 0, 1, 1, 1] = 1.0
    first.conv.bias[0] = OFFSET
    if rising:
        first.conv.weight[1, 0, 2, 1, 1] = 1.0
        first.conv.weight[1, 0, 1, 1, 1] = -1.0
    for channel in (0, 1) if rising else (0,):
        second.conv.weight[channel, channel, 1, 1, 1] = 1.0
        last_first.conv.weight[channel, first_features + channel, 1, 1, 1] = 1.0  # skips follow the upsampled
        last_second.conv.weight[channel, channel, 1, 1, 1] = 1.0


def write_model(weights_dir: Path, task_id: int, real_architecture: bool = False,
                part_patch: tuple[int, int, int] | None = None, crop_threshold_hu: float = MID_HU,
                oriented: bool = False) -> Path:
    """One model folder; returns its <trainer>__nnUNetPlans__3d_fullres directory.

    `part_patch` shrinks the real 1.5 mm patch (CPU benches); `crop_threshold_hu` moves the crop
    model's step, i.e. what the ROI covers; `oriented` adds the direction-dependent class.
    """
    folder = TASK_ID_WEIGHTS_CONFIGS[task_id]["foldername"]
    arch = _arch(task_id, real_architecture, part_patch)
    if task_id == 298:
        rule = Rule(None, ((crop_threshold_hu, "vertebrae_T5"),))
    elif arch.norm:
        rule = CONSTANT_RULES[task_id]
    else:
        rule = (ORIENTED_RULES if oriented else RULES).get(task_id, RULES[task_id])
    classes = _classes(task_id)
    model_dir = Path(weights_dir) / folder / f"{_trainer(task_id)}__nnUNetPlans__3d_fullres"
    (model_dir / "fold_0").mkdir(parents=True, exist_ok=True)
    properties = _properties(task_id)
    plans = _plans(folder, arch, _spacing(task_id), properties)
    dataset = _dataset_json(classes, "MR" if task_id in MR_TASKS else "CT")
    (model_dir / "plans.json").write_text(json.dumps(plans, indent=2))
    (model_dir / "dataset.json").write_text(json.dumps(dataset, indent=2))
    checkpoint = {
        "network_weights": _network(arch, rule, classes, properties).state_dict(),
        "trainer_name": _trainer(task_id),
        "init_args": {"plans": plans, "configuration": "3d_fullres", "fold": 0, "dataset_json": dataset},
        "inference_allowed_mirroring_axes": None,
    }
    torch.save(checkpoint, model_dir / "fold_0" / "checkpoint_final.pth")
    return model_dir


TOTAL_TASKS = (291, 292, 293, 294, 295, 298)


def write_standin_weights(weights_dir: Path, *, fast: bool = True, vertebrae_body: bool = True,
                          real_architecture: bool = False, part_patch: tuple[int, int, int] | None = None,
                          crop_threshold_hu: float = MID_HU, oriented: bool = False) -> Path:
    """All folders the node needs: the 1.5 mm parts and crop model, optionally fast (297) and vertebrae_body."""
    tasks = list(TOTAL_TASKS) + ([297] if fast else []) + ([BODY_TASK["task_id"]] if vertebrae_body else [])
    for task_id in tasks:
        write_model(weights_dir, task_id, real_architecture, part_patch, crop_threshold_hu, oriented)
    return Path(weights_dir)


def write_mr_standin_weights(weights_dir: Path, *, fast: bool = False, oriented: bool = False) -> Path:
    """Every folder an MR series needs: total_mr's parts (or its 3 mm model with `fast`), its crop model, vertebrae_mr."""
    tasks = ([852] if fast else [850, 851, 852]) + [VERTEBRAE_MR["task_id"]]
    for task_id in tasks:
        write_model(weights_dir, task_id, oriented=oriented)
    return Path(weights_dir)


class _Exit:
    """Unpickling this ends the process at once, like a segfault or the OOM killer would."""

    def __reduce__(self):
        return (os._exit, (70,))


class _Hang:
    """Unpickling this blocks for ten minutes, like a model stuck on a dead GPU."""

    def __reduce__(self):
        return (time.sleep, (600,))


class _Tripwire(PlainConvUNet):
    """The stand-in network, except that an input with metal in it ends the process (`trip`)."""

    def forward(self, x):
        if bool((x >= _normalised(TRIP_HU)).any()):
            self.trip()
        return super().forward(x)


class TripExitUNet(_Tripwire):
    def trip(self) -> None:
        os._exit(70)


class TripHangUNet(_Tripwire):
    def trip(self) -> None:
        time.sleep(600)


def sabotage_checkpoint(weights_dir: Path, task_id: int, how: str) -> None:
    """Replace a checkpoint so loading it kills ("exit"), blocks ("hang") or fails ("corrupt") the model process;
    "trip-exit" / "trip-hang" do that only while it segments a CT with metal in it (see the module docstring)."""
    model_dir = Path(weights_dir) / TASK_ID_WEIGHTS_CONFIGS[task_id]["foldername"] / f"{_trainer(task_id)}__nnUNetPlans__3d_fullres"
    path = model_dir / "fold_0" / "checkpoint_final.pth"
    if how.startswith("trip-"):
        network = {"trip-exit": TripExitUNet, "trip-hang": TripHangUNet}[how]
        plans = json.loads((model_dir / "plans.json").read_text())
        plans["configurations"]["3d_fullres"]["architecture"]["network_class_name"] = f"{__name__}.{network.__name__}"
        (model_dir / "plans.json").write_text(json.dumps(plans, indent=2))
        checkpoint = torch.load(path, weights_only=False)
        checkpoint["init_args"]["plans"] = plans
        torch.save(checkpoint, path)
        return
    if how == "corrupt":
        path.write_bytes(b"not a torch checkpoint")
        return
    payload = {"exit": _Exit, "hang": _Hang}[how]()
    path.write_bytes(pickle.dumps(payload))
