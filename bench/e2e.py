"""One CT on the node's own path (issue 6, item 2): load → segment → measure → encode, in seconds per stage.

Writes stand-in weights of the real architecture (tests/standin_weights.py) and a phantom DICOM
series on the machine itself, then calls node.run.run_pipeline, the function the worker runs,
with the stage functions it calls wrapped by timers:

    load CT    node.ct_load.load_ct on the DICOM folder
    segment    the configured engine (--engine), split into
                 process start   resident: CT into shared memory and the job to the (running) model
                             process; totalsegmentator: spawning the model process until it is called
                 model           the model process's work, split into stages
                 results back    labels out of the model process and back into the node
    measure    node.measure.measure
    reports    measurements JSON and CSV
    encode     SEG, SR and key image

Node overhead is everything but the model, as a percentage of the model's time (target ≤ 25 %).
The model process is timed from inside: multiprocessing "spawn" re-imports this script there as
__mp_main__, where it wraps the engine's job (the resident engine's `_Engine.run`, or
totalseg_child.run_totalsegmentator), writes the timings to a file and hands the phantom's true
labels back instead of the stand-in networks' output, so that measure and encode work on a
realistic segmentation. The resident engine is started once before the runs, as the worker does.

    .venv/bin/python bench/e2e.py                                             # 512x512x400 on the GPU
    .venv/bin/python bench/e2e.py --device cpu --size 64 --slices 64 --tiny --repeat 1   # smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

MODEL_TIMES = "PARASPINAL_BENCH_MODEL_TIMES"  # where the model process writes its timings
TRUTH = "PARASPINAL_BENCH_TRUTH"  # the phantom's labels, (c, r, k) as NIfTI wants them
MODEL_PROCESS = "totalsegmentator"  # the name node.pipeline.segment gives the reference engine's process
ENGINE_PROCESS = "segmentation-engine"  # the resident engine's process (node.pipeline.engine)
PIPELINE_STAGES = {"load_ct": "load CT", "segment": "segment", "measure": "measure",
                   "write_reports": "reports", "_encode": "encode"}


# ---------------------------------------------------------------- inside the model process


def hook_model_process() -> None:
    """In the node's model process: time the model's work and hand back the phantom's true labels.

    Only there: nnU-Net's own worker processes re-import the main script too, and stay untouched.
    The stand-in networks give constant or HU-step labels, on which measure and encode would do
    almost nothing; with the phantom's labels they cost what they cost on a real segmentation.
    """
    if not os.environ.get(TRUTH):
        return
    if multiprocessing.current_process().name == ENGINE_PROCESS:
        _hook_resident_engine()
    elif multiprocessing.current_process().name == MODEL_PROCESS:
        _hook_totalsegmentator()


def _hook_resident_engine() -> None:
    import numpy as np

    from node.pipeline.model import engine_child, roi_pipeline

    truth = np.load(os.environ[TRUTH])
    times_file = Path(os.environ[MODEL_TIMES]) if os.environ.get(MODEL_TIMES) else None
    original_total, original_body = roi_pipeline.RoiPipeline.total, roi_pipeline.RoiPipeline.vertebrae_body
    original_run = engine_child._Engine.run

    def total(self, image, fast, roi_subset):
        seg = original_total(self, image, fast, roi_subset)
        if truth["labels"].shape != seg.shape:
            raise RuntimeError(f"phantom truth {truth['labels'].shape} does not fit the CT {seg.shape}")
        return truth["labels"]

    def vertebrae_body(self, image):
        original_body(self, image)
        return truth["body"]

    def run(self, job):
        started = time.time()
        done = original_run(self, job)
        ended = time.time()
        stages = sorted(done.stages.items())
        stages.append(("other (crop, reorient, merge, shared memory)", ended - started - sum(done.stages.values())))
        peak = "n/a (CPU)" if done.peak_gpu_bytes is None else f"{done.peak_gpu_bytes / 2**30:.2f} GiB allocated"
        if times_file is not None:
            times_file.write_text(json.dumps({"started": started, "ended": ended, "gpu_memory": peak, "stages": stages}))
        return done

    roi_pipeline.RoiPipeline.total, roi_pipeline.RoiPipeline.vertebrae_body = total, vertebrae_body
    engine_child._Engine.run = run


def _hook_totalsegmentator() -> None:
    from node.pipeline.model import totalseg_child as segment

    original = segment.run_totalsegmentator
    times_file = Path(os.environ[MODEL_TIMES]) if os.environ.get(MODEL_TIMES) else None

    @functools.wraps(original)
    def timed(image, device: str, fast: bool, vertebral_bodies: bool):
        from gpu import (  # bench/gpu.py; TotalSegmentator is configured by now
            StageClock,
            gpu_memory,
        )

        clock = StageClock()
        clock.install()
        peak = gpu_memory()
        started = time.time()
        seg, body = original(image, device, fast, vertebral_bodies)
        ended = time.time()
        if times_file is not None:
            times_file.write_text(json.dumps({"started": started, "ended": ended, "gpu_memory": peak(),
                                              "stages": clock.report(ended - started)}))
        return _true_labels(seg, body, Path(os.environ[TRUTH]))

    segment.run_totalsegmentator = timed


def _true_labels(seg, body, truth_file: Path):
    import nibabel as nib
    import numpy as np

    truth = np.load(truth_file)
    if truth["labels"].shape != seg.shape:
        raise RuntimeError(f"phantom truth {truth['labels'].shape} does not fit the CT {seg.shape}: remove {truth_file}")
    true_body = None if body is None else nib.Nifti1Image(truth["body"], body.affine)
    return nib.Nifti1Image(truth["labels"], seg.affine), true_body


if __name__ == "__mp_main__":
    hook_model_process()


# ---------------------------------------------------------------- shared with bench/throughput.py


def add_ct_arguments(parser: argparse.ArgumentParser) -> None:
    """The CT, the stand-in networks and the segmenter settings, alike in both node benches."""
    parser.add_argument("--device", default="gpu", help="cpu, gpu or gpu:N")
    parser.add_argument("--engine", default="resident", choices=["resident", "totalsegmentator"],
                        help="segmenter.engine: the resident model process, or a fresh TotalSegmentator process per job")
    parser.add_argument("--size", type=int, default=512, help="in-plane matrix")
    parser.add_argument("--slices", type=int, default=400)
    parser.add_argument("--spacing", type=float, nargs=3, metavar=("DK", "DR", "DC"),
                        help="mm; default: fitted to the phantom's anatomy as bench/gpu.py does "
                             "(0.225 mm pixels at 512); e.g. 1.0 0.7 0.7 for a chest CT's field of view")
    parser.add_argument("--patch", type=int, default=128, help="1.5 mm patch edge (real: 128)")
    parser.add_argument("--tiny", action="store_true", help="tiny stand-in networks (CPU smoke test)")
    parser.add_argument("--crop-threshold-hu", type=float, default=0.0,
                        help="the stand-in crop model's ROI is HU >= this (0: soft tissue and bone; 150: bone)")
    parser.add_argument("--fast", action="store_true", help="3 mm model instead of the 1.5 mm parts")
    parser.add_argument("--no-body", action="store_true", help="skip the vertebrae_body task")
    parser.add_argument("--work-dir", type=Path,
                        help="keep weights and CT series here and reuse them on the next run (default: temporary)")


def standin_weights(work: Path, args: argparse.Namespace) -> Path:
    """Stand-in weights for these settings, written once per work folder."""
    name = "tiny" if args.tiny else f"real-patch{args.patch}"
    folder = work / f"weights-{name}-crop{args.crop_threshold_hu:g}"
    if not (folder / "complete").exists():
        from standin_weights import write_standin_weights

        started = time.perf_counter()
        shutil.rmtree(folder, ignore_errors=True)
        write_standin_weights(folder, real_architecture=not args.tiny, part_patch=(args.patch,) * 3,
                              crop_threshold_hu=args.crop_threshold_hu)
        (folder / "complete").touch()
        print(f"stand-in weights ({name}) written in {time.perf_counter() - started:.1f} s")
    return folder


def phantom_series(work: Path, args: argparse.Namespace, count: int) -> list[Path]:
    """`count` DICOM series of the same phantom with their own UIDs, written once per work folder.

    Also sets TRUTH for the model processes started from here on (see hook_model_process).
    """
    from phantom import make_phantom, write_dicom_series

    spacing = "fitted" if args.spacing is None else "x".join(f"{s:g}" for s in args.spacing)
    root = work / f"ct-{args.slices}x{args.size}x{args.size}-{spacing}"
    folders = [root / f"series-{i:02d}" for i in range(count)]
    truth = root / "truth.npz"
    missing = [f for f in folders if not (f / "complete").exists()]
    if missing or not truth.exists():
        import numpy as np

        started = time.perf_counter()
        ct = make_phantom(spacing=args.spacing, shape=(args.slices, args.size, args.size))
        for folder in missing:
            shutil.rmtree(folder, ignore_errors=True)
            write_dicom_series(ct, folder, series_description="Bench thorax")
            (folder / "complete").touch()
        np.savez(truth, labels=ct.labels.transpose(2, 1, 0), body=ct.body.transpose(2, 1, 0))
        print(f"{len(missing)} phantom DICOM series {ct.shape} at {tuple(round(s, 3) for s in ct.spacing)} mm "
              f"written in {time.perf_counter() - started:.1f} s")
    os.environ[TRUTH] = str(truth)
    return folders


def segmenter_settings(args: argparse.Namespace, weights: Path) -> dict[str, object]:
    return {"weights_dir": weights, "device": args.device, "fast": args.fast,
            "vertebral_bodies": "off" if args.no_body else "on", "engine": args.engine}


def describe_machine(device: str) -> str:
    """CPU, core count and GPU, so that a printed figure says where it was measured."""
    cpu = next((line.split(":", 1)[1].strip() for line in _read_lines("/proc/cpuinfo")
                if line.startswith("model name")), "unknown CPU")
    gpu = "no nvidia-smi"
    if shutil.which("nvidia-smi"):
        query = subprocess.run(["nvidia-smi", "--query-gpu=index,name,memory.total,driver_version",
                                "--format=csv,noheader"], check=False, capture_output=True, text=True, timeout=30)
        gpu = "; ".join(query.stdout.strip().splitlines()) or query.stderr.strip()
    return f"{cpu}, {os.cpu_count()} cores; GPU: {gpu}; device {device}"


def _read_lines(path: str) -> list[str]:
    try:
        return Path(path).read_text().splitlines()
    except OSError:
        return []


@contextlib.contextmanager
def work_folder(args: argparse.Namespace, prefix: str) -> Iterator[Path]:
    """A temporary work folder unless --work-dir keeps one."""
    if args.work_dir is not None:
        args.work_dir.mkdir(parents=True, exist_ok=True)
        yield args.work_dir
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield Path(tmp)


# ---------------------------------------------------------------- the node's path, timed


class Spans:
    """Wall-clock (start, end) of each call of the wrapped pipeline functions, by stage name."""

    def __init__(self) -> None:
        self.spans: dict[str, tuple[float, float]] = {}

    def wrap(self, owner: object, attribute: str, name: str) -> None:
        original: Callable = getattr(owner, attribute)

        @functools.wraps(original)
        def timed(*args, **kwargs):
            started = time.time()
            try:
                return original(*args, **kwargs)
            finally:
                self.spans[name] = (started, time.time())

        setattr(owner, attribute, timed)

    def seconds(self, name: str) -> float:
        started, ended = self.spans.get(name, (0.0, 0.0))
        return ended - started


def run_once(series: Path, out_dir: Path, config, spans: Spans, times_file: Path, segmenter) -> None:
    from node.run import run_pipeline

    spans.spans.clear()
    times_file.unlink(missing_ok=True)
    started = time.time()
    result = run_pipeline(series, out_dir, config, segmenter=segmenter)
    total = time.time() - started
    model = json.loads(times_file.read_text())
    report(spans, model, total)
    present = sum(level.status != "absent" for level in result.measurement.levels)
    print(f"    results: {', '.join(sorted(result.files))}; levels present {present}")


def report(spans: Spans, model: dict, total: float) -> None:
    model_s = model["ended"] - model["started"]
    segment_start, segment_end = spans.spans["segment"]
    rows = [("load CT", spans.seconds("load CT")), ("segment", spans.seconds("segment")),
            ("  process start", model["started"] - segment_start)]
    rows += [(f"  model: {name}", seconds) for name, seconds in model["stages"]]
    rows += [("  results back", segment_end - model["ended"])]
    rows += [(name, spans.seconds(name)) for name in ("measure", "reports", "encode")]
    rows += [("total (run_pipeline)", total)]
    for name, seconds in rows:
        print(f"    {name:<50} {seconds:8.2f} s")
    overhead = total - model_s
    print(f"    node overhead outside the model: {overhead:.2f} s = {100 * overhead / model_s:.0f} % of the "
          f"model's {model_s:.2f} s (target <= 25 %)")
    print(f"    peak GPU memory (model process): {model['gpu_memory']}")


def run(args: argparse.Namespace, work: Path) -> None:
    from node import run as pipeline
    from node.config import Config, SegmenterConfig

    weights = standin_weights(work, args)
    (series,) = phantom_series(work, args, 1)
    config = Config()
    config.segmenter = SegmenterConfig(**segmenter_settings(args, weights))
    spans = Spans()
    for attribute, name in PIPELINE_STAGES.items():
        spans.wrap(pipeline, attribute, name)
    from node.pipeline.segment import close_segmenter
    from node.service.worker import start_segmenter

    times_file = work / "model-times.json"
    os.environ[MODEL_TIMES] = str(times_file)  # read by the model process when it starts
    started = time.perf_counter()
    segmenter = start_segmenter(config)  # as the worker does: the resident engine loads its models now
    print(f"segmenter started ({args.engine}): {time.perf_counter() - started:.1f} s")
    try:
        for attempt in range(1, args.repeat + 1):
            print(f"run {attempt}/{args.repeat}:")
            out_dir = work / f"out-{attempt}"
            shutil.rmtree(out_dir, ignore_errors=True)
            run_once(series, out_dir, config, spans, times_file, segmenter)
    finally:
        close_segmenter(segmenter)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_ct_arguments(parser)
    parser.add_argument("--repeat", type=int, default=2, help="pipeline runs (the first also warms disk caches)")
    args = parser.parse_args()

    print(f"machine: {describe_machine(args.device)}")
    print(f"settings: CT {args.slices}x{args.size}x{args.size}, spacing {args.spacing or 'fitted'}, "
          f"{'tiny networks' if args.tiny else f'real architecture, patch {args.patch}'}, "
          f"crop ROI HU >= {args.crop_threshold_hu:g}, fast {args.fast}, vertebrae_body {not args.no_body}")
    with work_folder(args, "bench-e2e-") as work:
        run(args, work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
