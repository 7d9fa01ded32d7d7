"""One series from disk to results on disk: load → segment → measure → encode.

The orchestration sits above both the computation (node.pipeline) and the encoders (dicom_sr),
so the pipeline never imports the encoders and each can be used and tested alone.

Both `paraspinal-node measure` and the worker run exactly this, so a result made by hand and
one made by the node are the same computation. The pipeline is cut into three stages where the
engine starts and ends (prepare on the CPU, segment on the engine, finish on the CPU), so that a
worker can run one job's CPU stages while the engine runs another job (`Stages`); `run_pipeline`
is the three in a row.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from node.config import Config
from node.labels import roi_subset
from node.pipeline.ct import CTVolume
from node.pipeline.ct_load import load_ct
from node.pipeline.measure import MeasurementResult, measure
from node.pipeline.mr_load import MRImages, is_mr, load_mr
from node.pipeline.mr_measure import MRMeasurementResult, measure_mr
from node.pipeline.report import write_mr_reports, write_reports
from node.pipeline.seg_load import load_mr_segmentation, load_segmentation
from node.pipeline.segment import Segmenter, close_segmenter, make_segmenter
from node.pipeline.segmentation import Segmentation
from node.priors.lookup import PriorSources
from node.screening import LevelStatus

log = logging.getLogger(__name__)


@dataclass
class PipelineResult:
    measurement: MeasurementResult | MRMeasurementResult
    files: dict[str, Path] = field(default_factory=dict)  # measurements_json, measurements_csv, seg, sr, keyimage
    seconds: dict[str, float] = field(default_factory=dict)  # load, segment, measure, encode: for the status page


@dataclass
class Prepared:
    """A series in memory, ready for the engine; `seconds` collects the stage timings as the job goes on.

    `ct` is the grid every result is drawn on: the CT, or the segmented MR series, whose Dixon
    fat image and pairing notes are in `mr`.
    """

    ct: CTVolume
    seconds: dict[str, float] = field(default_factory=dict)
    mr: MRImages | None = None


@dataclass
class Segmented:
    """A series and its labels, ready to be measured and encoded."""

    ct: CTVolume
    seg: Segmentation
    seconds: dict[str, float] = field(default_factory=dict)
    mr: MRImages | None = None


def prepare(path: Path) -> Prepared:
    """Load the CT, or the MR series with its Dixon partner (raises InputError for input to refuse)."""
    started = time.perf_counter()
    if is_mr(path):
        mr = load_mr(path)
        log.info("event=mr_loaded series=%s slices=%d dixon=%s", mr.image.series_uid, mr.image.shape[0],
                 mr.fat is not None)
        return Prepared(mr.image, {"load": time.perf_counter() - started}, mr)
    ct = load_ct(path)
    log.info("event=ct_loaded series=%s slices=%d", ct.series_uid, ct.shape[0])
    return Prepared(ct, {"load": time.perf_counter() - started})


def segment_prepared(prepared: Prepared, config: Config, segmenter: Segmenter | None = None,
                     seg_path: Path | None = None) -> Segmented:
    """The labels from `seg_path` when given, else from `segmenter` (or a one-off one); raises WeightsMissingError."""
    started = time.perf_counter()
    ct = prepared.ct
    if prepared.mr is not None:
        seg = load_mr_segmentation(seg_path, ct) if seg_path is not None else segment_mr(ct, config, segmenter)
    else:
        seg = load_segmentation(seg_path, ct) if seg_path is not None else segment(ct, config, segmenter)
    return Segmented(ct, seg, {**prepared.seconds, "segment": time.perf_counter() - started}, prepared.mr)


def finish(segmented: Segmented, out_dir: Path, config: Config, dicom: bool = True,
           priors: PriorSources | None = None) -> PipelineResult:
    """Measure, compare with `priors` when given (CT), write the reports and, with `dicom`, encode SEG, SR
    and key image into `out_dir` (the reports are written again then, naming the SR for later jobs)."""
    if segmented.mr is not None:
        return _finish_mr(segmented, segmented.mr, out_dir, config, dicom)
    seconds = dict(segmented.seconds)
    ct, seg = segmented.ct, segmented.seg
    started = time.perf_counter()
    result = measure(ct, seg, config.measure, config.biomarkers, config.protocols)
    started = _lap(seconds, "measure", started)
    if priors is not None:
        result.longitudinal = priors.look_up(result.to_dict())
        started = _lap(seconds, "priors", started)
    json_path, csv_path = write_reports(result, out_dir)
    files = {"measurements_json": json_path, "measurements_csv": csv_path}
    if dicom:  # NIfTI input is refused here in one line, after the reports are written
        files.update(_encode(ct, seg, result, out_dir, config))
        write_reports(result, out_dir)
        _lap(seconds, "encode", started)
    log.info("event=measured series=%s levels_present=%d protocol=%s", ct.series_uid,
             sum(lv.status is not LevelStatus.ABSENT for lv in result.levels), result.protocol)
    return PipelineResult(result, files, seconds)


def _finish_mr(segmented: Segmented, mr: MRImages, out_dir: Path, config: Config, dicom: bool) -> PipelineResult:
    """finish() for MR: the Dixon measurement and the MR encoders."""
    seconds = dict(segmented.seconds)
    started = time.perf_counter()
    result = measure_mr(mr, segmented.seg, config.measure, config.protocols)
    json_path, csv_path = write_mr_reports(result, out_dir)
    files = {"measurements_json": json_path, "measurements_csv": csv_path}
    started = _lap(seconds, "measure", started)
    if dicom:
        from dicom_sr.mr_results import write_mr_results
        from dicom_sr.options import EncodeOptions

        written = write_mr_results(mr, segmented.seg, result, out_dir, EncodeOptions.from_config(config))
        files.update({"seg": written.seg, "sr": written.sr, "keyimage": written.key_image})
        _lap(seconds, "encode", started)
    log.info("event=measured series=%s levels_present=%d protocol=%s dixon=%s", mr.image.series_uid,
             sum(lv.status is not LevelStatus.ABSENT for lv in result.levels), result.protocol, result.fat.dixon)
    return PipelineResult(result, files, seconds)


def run_pipeline(ct_path: Path, out_dir: Path, config: Config, seg_path: Path | None = None, dicom: bool = True,
                 segmenter: Segmenter | None = None) -> PipelineResult:
    """Raises InputError for input to refuse, WeightsMissingError when the model is not installed.

    The worker passes its long-lived `segmenter` (the resident engine); without one, a segmenter
    is made for this run and closed after it.
    """
    segmented = segment_prepared(prepare(ct_path), config, segmenter, seg_path)
    return finish(segmented, out_dir, config, dicom)


@dataclass(frozen=True)
class Stages:
    """run_pipeline cut where the engine starts and ends, so a worker can overlap jobs; each raises as it does."""

    prepare: Callable[[Path], Prepared]
    segment: Callable[[Prepared, Config], Segmented]
    finish: Callable[[Segmented, Path, Config], PipelineResult]

    @classmethod
    def with_segmenter(cls, segmenter: Segmenter | None = None, priors: PriorSources | None = None) -> Stages:
        """The real stages on `segmenter` (the worker's long-lived one; None: a one-off per job), comparing
        each result with its `priors` when given."""
        return cls(prepare, functools.partial(segment_prepared, segmenter=segmenter),
                   functools.partial(finish, priors=priors))


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


def segment_mr(image: CTVolume, config: Config, segmenter: Segmenter | None = None) -> Segmentation:
    if segmenter is not None:
        return segmenter.segment_mr(image)
    one_off = make_segmenter(config.segmenter, modalities=("MR",))  # a one-off engine loads MR's models alone
    try:
        return one_off.segment_mr(image)
    finally:
        close_segmenter(one_off)


def _encode(ct: CTVolume, seg: Segmentation, result: MeasurementResult, out_dir: Path, config: Config) -> dict[str, Path]:
    """Imported here: `measure --no-dicom` and NIfTI input never load highdicom and matplotlib."""
    from dicom_sr.options import EncodeOptions
    from dicom_sr.results import write_results

    written = write_results(ct, seg, result, out_dir, EncodeOptions.from_config(config))
    result.outputs["sr"] = written.sr_reference
    return {"seg": written.seg, "sr": written.sr, "keyimage": written.key_image}
