"""The one entry point: build the SEG, the SR and the key image and write them to a folder."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import highdicom as hd
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from pydicom.dataset import Dataset

from node.durable import make_dirs, write_atomic
from node.pipeline.ct import CTVolume, InputError
from node.pipeline.measure import MeasurementResult
from node.pipeline.segmentation import Segmentation

from .biomarker_seg import append_bone_and_organ_segments
from .encoding import encode
from .keyimage import build_key_image
from .options import EncodeOptions
from .seg import build_seg, segment_map
from .sr import build_sr


@dataclass(frozen=True)
class ResultFiles:
    seg: Path
    sr: Path
    key_image: Path
    sr_reference: dict[str, str] = field(default_factory=dict)  # the SR's UIDs, for a later job's evidence


@dataclass(frozen=True)
class ResultObjects:
    seg: Dataset
    sr: Dataset
    key_image: Dataset


def warm_up() -> None:
    """Pay the encoders' one-time costs when a worker starts, not in its first patient's job:
    highdicom's load of the standard's tables (about 0.4 s) and matplotlib's font loading."""
    hd.sc.SCImage(
        pixel_array=np.zeros((2, 2), np.uint8), photometric_interpretation="MONOCHROME2", bits_allocated=8,
        coordinate_system="PATIENT", study_instance_uid=hd.UID(), series_instance_uid=hd.UID(),
        sop_instance_uid=hd.UID(), series_number=1, instance_number=1, manufacturer="paraspinal-node",
        patient_orientation=("L", "P"),
    )
    figure = Figure(figsize=(1, 1), dpi=72)
    figure.text(0.5, 0.5, "T1", weight="bold")
    FigureCanvasAgg(figure).draw()


@contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic garbage collection while the objects are built and written.

    They are hundreds of thousands of small pydicom objects, freed by reference counting; the
    collector's passes over them cost about 0.4 s per job. Collection resumes afterwards.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def build_results(ct: CTVolume, seg: Segmentation, result: MeasurementResult, options: EncodeOptions) -> ResultObjects:
    """All three objects in memory; the SR references the SEG built here."""
    check_referable(ct)
    segments = segment_map(seg, result)
    seg_object = build_seg(ct, segments, result, options)
    append_bone_and_organ_segments(seg_object, ct, seg, result, options, segments.boxes)
    return ResultObjects(
        seg=seg_object,
        sr=build_sr(ct, seg_object, result, options),
        key_image=build_key_image(ct, segments, result, options),
    )


def check_referable(ct: CTVolume) -> None:
    """Results must point at their source; anonymisers sometimes blank the UIDs they need."""
    blank = [kw for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")
             if any(not ds.get(kw) for ds in ct.datasets)]
    if blank:
        raise InputError(f"the source series has blank {', '.join(blank)}: DICOM results cannot reference it; "
                         "give the series its UIDs back, or use measurements.json/.csv")


def write_results(ct: CTVolume, seg: Segmentation, result: MeasurementResult, out_dir: Path,
                  options: EncodeOptions) -> ResultFiles:
    """DIR/seg.dcm, DIR/sr.dcm and DIR/keyimage.dcm, each renamed into place only when complete."""
    out_dir = Path(out_dir)
    with gc_paused():
        objects = build_results(ct, seg, result, options)
        sr = objects.sr
        files = ResultFiles(seg=out_dir / "seg.dcm", sr=out_dir / "sr.dcm", key_image=out_dir / "keyimage.dcm",
                            sr_reference={"study_uid": str(sr.StudyInstanceUID), "series_uid": str(sr.SeriesInstanceUID),
                                          "sop_instance_uid": str(sr.SOPInstanceUID), "sop_class_uid": str(sr.SOPClassUID)})
        make_dirs(out_dir)
        for dataset, path in ((objects.seg, files.seg), (objects.sr, files.sr), (objects.key_image, files.key_image)):
            write_dataset(dataset, path)
    return files


def write_dataset(dataset: Dataset, path: Path) -> None:
    """Durable before the worker records the job done and queues its deliveries."""
    write_atomic(path, encode(dataset))
