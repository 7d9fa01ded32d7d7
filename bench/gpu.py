"""GPU cost of the node's segmentation, both engines, with stand-in weights of the real architecture.

The resident engine (issue 14): the model process's start (models loaded once), then per job its
stages as the engine times them (resampling, each model: nnU-Net preprocessing + sliding window +
export), the networks' forward passes, the node's overhead outside them (target: at most 25 % of
the model's time) and the model process's peak GPU memory (target: at most 12 GB).

The TotalSegmentator path (issue 6), `--engines totalsegmentator`:

Writes the stand-in weights and a phantom CT on the machine itself, then times the call as the node
makes it: roi_subset T1–T12 + autochthon, with and without vertebrae_body, and in fast mode. Each
run is split into stages by timing TotalSegmentator's and nnU-Net's own functions:

    crop model      the 6 mm model on the whole CT (its resampling included)
    resampling      TotalSegmentator's scipy resampling to 1.5/3 mm and back
    model NNN       one nnU-Net model run: preprocessing and export workers + sliding window
    sliding window  of which the network itself (the GPU part)
    other           cropping, reorientation, label merging, the vertebrae_body task's overhead

and reports peak GPU memory (torch.cuda.max_memory_allocated). Finally it times the node's own path
(TotalSegmentatorSegmenter.segment: model process start, files in and out) once per scenario.

    .venv/bin/python bench/gpu.py                                   # 512x512x400 on the GPU, both engines
    .venv/bin/python bench/gpu.py --engines resident --scenarios roi_subset+vertebrae_body --repeat 3
    .venv/bin/python bench/gpu.py --device cpu --size 48 --slices 32 --tiny --repeat 1 --scenarios fast   # smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from node.config import SegmenterConfig
from node.pipeline.ct import CTVolume
from node.pipeline.engine import ResidentEngine
from node.pipeline.model.env import configure_totalsegmentator
from node.pipeline.model.totalseg_child import run_totalsegmentator
from node.pipeline.segment import TotalSegmentatorSegmenter, nifti_affine

SCENARIOS = {  # name: (fast, vertebrae_body)
    "roi_subset": (False, False),
    "roi_subset+vertebrae_body": (False, True),
    "fast": (True, False),
    "fast+vertebrae_body": (True, True),
}


class StageClock:
    """Adds up wall time per stage by wrapping the library functions that make up a run."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.active: list[str] = []

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.active.append(name)
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - started
            self.active.pop()

    def wrap(self, owner: object, attribute: str, name_of: Callable[..., str]) -> None:
        original = getattr(owner, attribute)

        @functools.wraps(original)
        def timed(*args, **kwargs):
            with self.stage(name_of(*args, **kwargs)):
                return original(*args, **kwargs)

        setattr(owner, attribute, timed)

    def install(self) -> None:
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
        from totalsegmentator import nnunet

        self.wrap(nnunet, "nnUNet_predict_image",
                  lambda file_in, file_out, task_id, *a, **k: "crop model" if task_id == 298 else "task call")
        self.wrap(nnunet, "nnUNetv2_predict", lambda dir_in, dir_out, task_id, *a, **k: f"model {task_id}")
        self.wrap(nnunet, "change_spacing",
                  lambda *a, **k: "resampling (crop model)" if "crop model" in self.active else "resampling")
        self.wrap(nnUNetPredictor, "predict_sliding_window_return_logits",
                  lambda *a, **k: f"sliding window ({self._model()})")

    def _model(self) -> str:
        return next(name for name in reversed(self.active) if name.startswith("model"))

    def report(self, total: float) -> list[tuple[str, float]]:
        crop, resampling = self.seconds.get("crop model", 0.0), self.seconds.get("resampling", 0.0)
        models = {k: v for k, v in self.seconds.items() if k.startswith("model") and k != "model 298"}
        rows = [("total", total), ("crop model (6 mm, all of it)", crop), ("resampling", resampling)]
        for name in sorted(models):
            rows.append((f"{name} (workers + network)", models[name]))
            rows.append((f"  sliding window ({name})", self.seconds.get(f"sliding window ({name})", 0.0)))
        rows.append(("other (crop, reorient, merge, glue)", total - crop - resampling - sum(models.values())))
        return rows


def gpu_memory() -> Callable[[], str]:
    import torch

    if not torch.cuda.is_available():
        return lambda: "n/a (no CUDA)"
    torch.cuda.reset_peak_memory_stats()
    return lambda: (f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB allocated, "
                    f"{torch.cuda.max_memory_reserved() / 2**30:.2f} GiB reserved")


def time_in_process(clock: StageClock, image, device: str, fast: bool, body: bool) -> None:
    clock.seconds.clear()
    peak = gpu_memory()
    started = time.perf_counter()
    seg, _ = run_totalsegmentator(image, device, fast, body)
    total = time.perf_counter() - started
    for name, seconds in clock.report(total):
        print(f"    {name:<45} {seconds:7.2f} s")
    print(f"    peak GPU memory: {peak()}; labels {sorted(int(v) for v in np.unique(np.asanyarray(seg.dataobj)))}")


def run(args: argparse.Namespace, work: Path) -> None:
    # imported here, not at the top: every process that TotalSegmentator and nnU-Net spawn re-imports
    # this script, and the node's own entry point is as light
    from phantom import make_phantom
    from standin_weights import write_standin_weights

    weights_dir = args.weights_dir or work / "weights"
    started = time.perf_counter()
    write_standin_weights(weights_dir, real_architecture=not args.tiny, part_patch=(args.patch,) * 3,
                          crop_threshold_hu=args.crop_threshold_hu)
    print(f"stand-in weights ({'tiny' if args.tiny else f'real architecture, patch {args.patch}'}): "
          f"{time.perf_counter() - started:.1f} s")
    started = time.perf_counter()
    phantom = make_phantom(shape=(args.slices, args.size, args.size))
    ct = CTVolume(hu=phantom.hu, spacing=phantom.spacing, origin=np.array(phantom.origin), direction=np.eye(3))
    print(f"phantom CT {ct.shape} at {tuple(round(s, 3) for s in ct.spacing)} mm: {time.perf_counter() - started:.1f} s")

    if "resident" in args.engines:
        time_resident(args, weights_dir, ct)
    if "totalsegmentator" in args.engines:
        time_totalsegmentator(args, weights_dir, ct, work)


def time_resident(args: argparse.Namespace, weights_dir: Path, ct: CTVolume) -> None:
    for name in args.scenarios:
        fast, body = SCENARIOS[name]
        config = SegmenterConfig(weights_dir=weights_dir, device=args.device, fast=fast,
                                 vertebral_bodies="on" if body else "off")
        engine = ResidentEngine(config, time_forward=True)
        try:
            started = time.perf_counter()
            engine.start()
            print(f"{name}, resident engine start (process + every model loaded): {time.perf_counter() - started:.1f} s")
            for attempt in range(1, args.repeat + 1):
                started = time.perf_counter()
                seg = engine.segment(ct)
                wall = time.perf_counter() - started
                print(f"{name}, resident job {attempt}/{args.repeat}: {wall:.2f} s per CT")
                for stage, seconds in sorted(engine.last_stages.items()):
                    print(f"    {stage:<45} {seconds:7.2f} s")
                forward = engine.last_forward_s or 0.0
                print(f"    {'other (crop, reorient, merge, shared memory)':<45} {wall - sum(engine.last_stages.values()):7.2f} s")
                print(f"    {'forward passes':<45} {forward:7.2f} s")
                print(f"    {'outside them':<45} {wall - forward:7.2f} s ({(wall - forward) / max(forward, 1e-9):.0%} of the model's time)")
                peak = engine.last_peak_gpu_bytes
                print(f"    peak GPU memory: {'n/a (CPU)' if peak is None else f'{peak / 2**30:.2f} GiB'}; "
                      f"labels {sorted(int(v) for v in np.unique(seg.labels))}")
        finally:
            engine.close()


def time_totalsegmentator(args: argparse.Namespace, weights_dir: Path, ct: CTVolume, work: Path) -> None:
    configure_totalsegmentator(weights_dir, work / "totalseg_home")
    import nibabel as nib

    image = nib.Nifti1Image(np.ascontiguousarray(ct.hu.transpose(2, 1, 0)), nifti_affine(ct))
    clock = StageClock()
    clock.install()
    for name in args.scenarios:
        fast, body = SCENARIOS[name]
        for attempt in range(1, args.repeat + 1):
            print(f"{name}, in-process run {attempt}/{args.repeat}:")
            time_in_process(clock, image, args.device, fast, body)
    for name in args.scenarios:
        fast, body = SCENARIOS[name]
        config = SegmenterConfig(weights_dir=weights_dir, device=args.device, fast=fast,
                                 vertebral_bodies="on" if body else "off")
        started = time.perf_counter()
        TotalSegmentatorSegmenter(config).segment(ct)
        print(f"{name}, node path (TotalSegmentatorSegmenter.segment): {time.perf_counter() - started:.1f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="gpu")
    parser.add_argument("--size", type=int, default=512, help="in-plane matrix")
    parser.add_argument("--slices", type=int, default=400)
    parser.add_argument("--patch", type=int, default=128, help="1.5 mm patch edge (real: 128)")
    parser.add_argument("--crop-threshold-hu", type=float, default=0.0,
                        help="the stand-in crop model's ROI is HU >= this (0: soft tissue and bone; 150: bone)")
    parser.add_argument("--repeat", type=int, default=2, help="in-process runs per scenario (first warms up)")
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    parser.add_argument("--weights-dir", type=Path)
    parser.add_argument("--tiny", action="store_true", help="tiny stand-in networks (CPU smoke test)")
    parser.add_argument("--engines", nargs="+", default=["resident", "totalsegmentator"],
                        choices=["resident", "totalsegmentator"])
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        run(args, Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
