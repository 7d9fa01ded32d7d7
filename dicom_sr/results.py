"""The one entry point: build the SEG, the SR and the key image and write them to a folder."""

from __future__ import annotations

from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

from pydicom.dataset import Dataset

from node.ct import CTVolume, InputError
from node.durable import make_dirs, write_atomic
from node.segmentation import Segmentation

from .keyimage import build_key_image
from .options import EncodeOptions
from .seg import build_seg, segment_map
from .sr import build_sr


@dataclass(frozen=True)
class ResultFiles:
    seg: Path
    sr: Path
    key_image: Path


@dataclass(frozen=True)
class ResultObjects:
    seg: Dataset
    sr: Dataset
    key_image: Dataset


def build_results(ct: CTVolume, seg: Segmentation, result: dict, options: EncodeOptions) -> ResultObjects:
    """All three objects in memory; the SR references the SEG built here."""
    _check_referable(ct)
    segments = segment_map(seg, result)
    seg_object = build_seg(ct, segments, result, options)
    return ResultObjects(
        seg=seg_object,
        sr=build_sr(ct, seg_object, result, options),
        key_image=build_key_image(ct, segments, result, options),
    )


def _check_referable(ct: CTVolume) -> None:
    """Results must point at their source; anonymisers sometimes blank the UIDs they need."""
    blank = [kw for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")
             if any(not ds.get(kw) for ds in ct.datasets)]
    if blank:
        raise InputError(f"the source series has blank {', '.join(blank)}: DICOM results cannot reference it; "
                         "give the series its UIDs back, or use measurements.json/.csv")


def write_results(ct: CTVolume, seg: Segmentation, result: dict, out_dir: Path, options: EncodeOptions) -> ResultFiles:
    """DIR/seg.dcm, DIR/sr.dcm and DIR/keyimage.dcm, each renamed into place only when complete."""
    objects = build_results(ct, seg, result, options)
    out_dir = Path(out_dir)
    make_dirs(out_dir)
    files = ResultFiles(seg=out_dir / "seg.dcm", sr=out_dir / "sr.dcm", key_image=out_dir / "keyimage.dcm")
    for dataset, path in ((objects.seg, files.seg), (objects.sr, files.sr), (objects.key_image, files.key_image)):
        _write(dataset, path)
    return files


def _write(dataset: Dataset, path: Path) -> None:
    """Durable before the worker records the job done and queues its deliveries."""
    buffer = BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    write_atomic(path, buffer.getvalue())
