"""An MR measurement's SEG (on the segmented series, the Dixon water image), SR and key image, written to a folder."""

from __future__ import annotations

from pathlib import Path

from node.durable import make_dirs
from node.pipeline.mr_load import MRImages
from node.pipeline.mr_measure import MRMeasurementResult
from node.pipeline.segmentation import Segmentation

from .keyimage import key_image_object
from .mr_keyimage import render_mr_key_image
from .mr_sr import build_mr_sr
from .options import EncodeOptions
from .results import ResultFiles, ResultObjects, check_referable, gc_paused, write_dataset
from .seg import build_seg, segment_map

MR_TASKS = "total_mr + vertebrae_mr"


def build_mr_results(images: MRImages, seg: Segmentation, result: MRMeasurementResult,
                     options: EncodeOptions) -> ResultObjects:
    grid = images.image
    check_referable(grid)
    segments = segment_map(seg, result)
    seg_object = build_seg(grid, segments, result, options, tasks=MR_TASKS)
    derivation = ("Rendered summary of the paraspinal muscle Dixon fat fraction" if result.fat.dixon
                  else "Rendered summary of the paraspinal muscle volume (no Dixon)")
    return ResultObjects(
        seg=seg_object,
        sr=build_mr_sr(grid, seg_object, result, options),
        key_image=key_image_object(grid, render_mr_key_image(images, segments, result), result.software, options,
                                   derivation),
    )


def write_mr_results(images: MRImages, seg: Segmentation, result: MRMeasurementResult, out_dir: Path,
                     options: EncodeOptions) -> ResultFiles:
    """DIR/seg.dcm, DIR/sr.dcm and DIR/keyimage.dcm, as for CT."""
    out_dir = Path(out_dir)
    files = ResultFiles(seg=out_dir / "seg.dcm", sr=out_dir / "sr.dcm", key_image=out_dir / "keyimage.dcm")
    with gc_paused():
        objects = build_mr_results(images, seg, result, options)
        make_dirs(out_dir)
        for dataset, path in ((objects.seg, files.seg), (objects.sr, files.sr), (objects.key_image, files.key_image)):
            write_dataset(dataset, path)
    return files
