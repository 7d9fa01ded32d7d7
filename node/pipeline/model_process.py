"""Parent-side helpers for a model child process: weights check, ending it, and saying why it failed."""

from __future__ import annotations

import multiprocessing.process
import os
import signal
from pathlib import Path

import numpy as np

from node.config import SegmenterConfig
from node.errors import INSTALL_FIX
from node.pipeline.ct import CTVolume
from node.pipeline.segmentation import WeightsMissingError
from node.weights import CT_ONLY, missing_models

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def nifti_affine(ct: CTVolume) -> np.ndarray:
    """RAS affine of the CT for a NIfTI whose voxel axes are (c, r, k)."""
    spacing_crk = np.array([ct.spacing[2], ct.spacing[1], ct.spacing[0]])
    affine = np.eye(4)
    affine[:3, :3] = LPS_TO_RAS @ np.asarray(ct.direction, dtype=float) @ np.diag(spacing_crk)
    affine[:3, 3] = LPS_TO_RAS @ np.asarray(ct.origin, dtype=float)
    return affine


def check_weights(config: SegmenterConfig, modalities: tuple[str, ...] = CT_ONLY) -> None:
    """Raises WeightsMissingError naming the folders the models of these modalities need."""
    missing = missing_models(config, modalities)
    if missing:
        raise WeightsMissingError(
            f"TotalSegmentator weights not found in {Path(config.weights_dir).resolve()} "
            f"(missing {', '.join(missing)}): {INSTALL_FIX}"
        )


def kill_process_group(process: multiprocessing.process.BaseProcess) -> None:
    """The child leads its own process group; this also ends nnU-Net workers it may have left."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        if process.is_alive():
            process.kill()


def exit_reason(what: str, exitcode: int | None) -> str:
    """One line for a model process that ended without a result."""
    if exitcode is not None and exitcode < 0:
        how = f"was killed by signal {signal.Signals(-exitcode).name}"
    else:
        how = f"exited with code {exitcode}"
    return (
        f"{what} process {how} (a crash or the system running out of memory): "
        "check the node log and memory, or try segmenter.fast = true"
    )


def error_reason(what: str, kind: str, message: str) -> str:
    """One line for an exception the model process reported."""
    return f"{what} failed: {kind}: {message}{_hint(kind, message)}"


def _hint(kind: str, message: str) -> str:
    if "OutOfMemory" in kind or "out of memory" in message.lower() or kind == "MemoryError":
        return ' (not enough memory for this CT: free the GPU or RAM, or set segmenter.fast = true or segmenter.device = "cpu")'
    return " (the node log has the traceback; `paraspinal-node weights check` verifies the model folders)"
