"""One series from disk to results on disk: load → segment → measure → encode.

Both `paraspinal-node measure` and the worker run exactly this, so a result made by hand and
one made by the node are the same computation.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from node.config import Config
from node.labels import roi_subset
from node.pipeline.ct import CTVolume
from node.pipeline.ct_load import load_ct
from node.pipeline.measure import MeasurementResult, measure
from node.pipeline.report import write_reports
from node.pipeline.seg_load import load_segmentation
from node.pipeline.segment import Segmenter, close_segmenter, make_segmenter
from node.pipeline.segmentation import Segmentation
from node.screening import LevelStatus

log = logging.getLogger(__name__)


@dataclass
class PipelineResult:
    measurement: MeasurementResult
    files: dict[str, Path] = field(default_factory=dict)  # measurements_json, measurements_csv, seg, sr, keyimage
    seconds: dict[str, float] = field(default_factory=dict)  # load, segment, measure, encode: for the status page


def run_pipeline(ct_path: Path, out_dir: Path, config: Config, seg_path: Path | None = None, dicom: bool = True,
                 segmenter: Segmenter | None = None) -> PipelineResult:
    """Raises InputError for input to refuse, WeightsMissingError when the model is not installed.

    The worker passes its long-lived `segmenter` (the resident engine); without one, a segmenter
    is made for this run and closed after it.
    """
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    ct = load_ct(ct_path)
    log.info("event=ct_loaded series=%s slices=%d", ct.series_uid, ct.shape[0])
    started = _lap(seconds, "load", started)
    seg = load_segmentation(seg_path, ct) if seg_path is not None else segment(ct, config, segmenter)
    started = _lap(seconds, "segment", started)
    result = measure(ct, seg, config.measure, config.biomarkers)
    json_path, csv_path = write_reports(result, out_dir)
    files = {"measurements_json": json_path, "measurements_csv": csv_path}
    started = _lap(seconds, "measure", started)
    if dicom:  # NIfTI input is refused here in one line, after the reports are written
        files.update(_encode(ct, seg, result, out_dir, config))
        _lap(seconds, "encode", started)
    log.info("event=measured series=%s levels_present=%d", ct.series_uid, sum(lv.status is not LevelStatus.ABSENT for lv in result.levels))
    return PipelineResult(result, files, seconds)


def _lap(seconds: dict[str, float], stage: str, started: float) -> float:
    """Record how long `stage` took since `started`; returns when the next stage starts."""
    now = time.perf_counter()
    seconds[stage] = now - started
    return now


def segment(ct: CTVolume, config: Config, segmenter: Segmenter | None = None) -> Segmentation:
    if segmenter is not None:
        return segmenter.segment(ct)
    one_off = make_segmenter(config.segmenter, roi_subset(config.biomarkers.liver))
    try:
        return one_off.segment(ct)
    finally:
        close_segmenter(one_off)


def _encode(ct: CTVolume, seg: Segmentation, result: MeasurementResult, out_dir: Path, config: Config) -> dict[str, Path]:
    from dicom_sr.options import EncodeOptions
    from dicom_sr.results import write_results

    written = write_results(ct, seg, result, out_dir, EncodeOptions.from_config(config))
    return {"seg": written.seg, "sr": written.sr, "keyimage": written.key_image}
