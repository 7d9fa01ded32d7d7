"""What every model process does before it touches TotalSegmentator or nnU-Net.

Both engines run TotalSegmentator's models in a child process: the reference engine
(node.pipeline.model.totalseg_child) and the resident engine (node.pipeline.model.engine_child). Both must
read weights only from the node's folder, never download, never send usage statistics, and
never fall back to the CPU when the configured GPU is not there.
"""

from __future__ import annotations

import importlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

_VARIANTS = "nnunetv2.training.nnUNetTrainer.variants"
_TRAINER_MODULES = {  # the trainers of the models in node.weights (total, fast, crop, vertebrae_body; MR's)
    "nnUNetTrainerNoMirroring": f"{_VARIANTS}.data_augmentation.nnUNetTrainerNoMirroring",
    "nnUNetTrainer_4000epochs_NoMirroring": f"{_VARIANTS}.training_length.nnUNetTrainer_Xepochs_NoMirroring",
    "nnUNetTrainer_DASegOrd0": f"{_VARIANTS}.data_augmentation.nnUNetTrainerDAOrd0",
    "nnUNetTrainer_2000epochs_NoMirroring": f"{_VARIANTS}.training_length.nnUNetTrainer_Xepochs_NoMirroring",
    "nnUNetTrainer_DASegOrd0_NoMirroring": f"{_VARIANTS}.data_augmentation.nnUNetTrainerDAOrd0",
}


def prepare_totalseg_home(home: Path) -> None:
    """Write TotalSegmentator's config.json before it can create one that sends usage statistics."""
    home.mkdir(parents=True, exist_ok=True)
    config = {
        "totalseg_id": "totalseg_paraspinal_node",
        "send_usage_stats": False,
        "prediction_counter": 0,
        "statistics_disclaimer_shown": True,
    }
    (home / "config.json").write_text(json.dumps(config, indent=4), encoding="utf-8")


def configure_totalsegmentator(weights_dir: Path, home: Path) -> None:
    """Call before TotalSegmentator is imported: weights only from weights_dir, a private home without stats."""
    prepare_totalseg_home(home)
    os.environ["TOTALSEG_HOME_DIR"] = str(home)
    os.environ["TOTALSEG_WEIGHTS_PATH"] = str(weights_dir)
    for name in ("nnUNet_results", "nnUNet_raw", "nnUNet_preprocessed"):
        os.environ[name] = str(weights_dir)


def register_trainers() -> None:
    """Hand nnU-Net the trainer classes TotalSegmentator's models name, through TotalSegmentator's own table.

    Otherwise nnU-Net imports every trainer module to find them: seconds per model, and some of those
    modules import torchvision's compiled ops, which do not load next to the CPU build of torch.
    """
    from totalsegmentator import nnunet

    for name, module in _TRAINER_MODULES.items():
        nnunet.custom_trainers.setdefault(name, getattr(importlib.import_module(module), name))


def check_gpu(device: str, visible: int) -> None:
    """TotalSegmentator quietly falls back to the CPU (hours per CT); the node refuses instead."""
    if not device.startswith("gpu"):
        return
    index = int(device[4:]) if device.startswith("gpu:") else 0
    if index >= visible:
        raise RuntimeError(
            f'segmenter.device is "{device}" but {visible} CUDA GPU(s) are visible: '
            'set segmenter.device = "cpu" or a visible "gpu:N", or fix the GPU driver'
        )


@dataclass
class ForwardClock:
    """Seconds spent inside the networks' forward passes (benchmarks: model time vs. everything else)."""

    seconds: float = 0.0
    calls: int = 0


def time_forward_passes() -> ForwardClock:
    """Wrap nnU-Net's one call of the network per tile, for every predictor in this process.

    On a GPU the clock waits for the device after each call, so the figure is the network's time
    and not the launch time; that costs a little overlap, so only benchmarks turn it on.
    """
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    clock = ForwardClock()
    original = nnUNetPredictor._internal_maybe_mirror_and_predict

    def timed(self, x):
        started = time.perf_counter()
        prediction = original(self, x)
        if prediction.is_cuda:
            torch.cuda.synchronize(prediction.device)
        clock.seconds += time.perf_counter() - started
        clock.calls += 1
        return prediction

    nnUNetPredictor._internal_maybe_mirror_and_predict = timed
    return clock
