"""The key image of a job as a small PNG for the worklist, read from the job's outbox.

The key image is an RGB secondary capture the worker rendered; decoding it with pydicom and
scaling it with Pillow keeps matplotlib and the encoder out of `serve`. Thumbnails are cached by
file and modification time, so a page of fifty rows costs fifty decodes once, not per refresh.
"""

from __future__ import annotations

import functools
import io
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image

from node.config import StorageConfig

KEY_IMAGE = "keyimage.dcm"
THUMBNAIL_WIDTH = 320


def key_image_path(storage: StorageConfig, job_id: int) -> Path | None:
    """The key image of the job's latest attempt, or None (not made yet, removed by retention, or NIfTI input)."""
    attempts = sorted(storage.job_outbox(job_id).glob(f"attempt-*/{KEY_IMAGE}"),
                      key=lambda p: int(p.parent.name.removeprefix("attempt-")))
    return attempts[-1] if attempts else None


def thumbnail_png(path: Path, width: int = THUMBNAIL_WIDTH) -> bytes:
    """A PNG `width` pixels wide of the key image at `path`."""
    return _thumbnail(path, path.stat().st_mtime_ns, width)


@functools.lru_cache(maxsize=256)
def _thumbnail(path: Path, mtime_ns: int, width: int) -> bytes:
    dataset = pydicom.dcmread(path)
    pixels = np.asarray(dataset.pixel_array)
    if dataset.PhotometricInterpretation != "RGB":
        pixels = _grey_to_rgb(pixels)
    image = Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8))
    height = max(1, round(image.height * width / image.width))
    buffer = io.BytesIO()
    image.resize((width, height), Image.Resampling.LANCZOS).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def _grey_to_rgb(pixels: np.ndarray) -> np.ndarray:
    """Any other key image (a future MONOCHROME2 one) is windowed to its full range."""
    low, high = float(pixels.min()), float(pixels.max())
    scaled = (pixels - low) * (255.0 / (high - low or 1.0))
    return np.repeat(scaled[..., None], 3, axis=-1)


def patient_name(path: Path) -> str:
    """The patient name in a DICOM header (only for `web.show_patient_names`)."""
    return _patient_name(path, path.stat().st_mtime_ns)


@functools.lru_cache(maxsize=1024)
def _patient_name(path: Path, mtime_ns: int) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PatientName"]).get("PatientName", ""))
