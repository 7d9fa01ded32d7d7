"""What `[biomarkers] liver = true` costs in the model: the resident engine with and without liver and spleen.

With the organs in roi_subset, TotalSegmentator runs part 291 (organs) beside 292 (vertebrae) and
294 (muscles). Both engines get one warm-up call, then `--rounds` calls each in alternating order,
so that a machine whose load changes penalises neither. It prints the wall time per CT and the
time in the networks' forward passes for both, and the extra per CT with its ratio.

Stand-in weights (tests/standin_weights.py) cannot tell where a real liver is, so the crop the
6 mm model draws is the same in both runs; with real weights the crop also grows to hold the
liver, and every part then runs on that larger region. The figure here is the extra part alone.

    .venv/bin/python bench/liver.py                                      # CPU, tiny networks
    .venv/bin/python bench/liver.py --real-architecture --patch 64       # CPU, real network size
    .venv/bin/python bench/liver.py --device gpu --shape 400 512 512 --real-architecture --patch 128
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from node.config import SegmenterConfig
from node.labels import roi_subset
from node.pipeline.ct import CTVolume
from node.pipeline.engine import ResidentEngine

RUNS = {"muscle and bone": False, "with liver": True}


def phantom_ct(shape: tuple[int, int, int]) -> CTVolume:
    from phantom import make_phantom  # not at the top: spawned processes re-import this script

    phantom = make_phantom(shape=shape)
    return CTVolume(hu=phantom.hu, spacing=phantom.spacing, origin=np.array(phantom.origin), direction=np.eye(3))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu, gpu or gpu:N")
    parser.add_argument("--shape", type=int, nargs=3, default=(40, 48, 48), metavar=("K", "R", "C"),
                        help="the test phantom's chest fitted into this many voxels")
    parser.add_argument("--rounds", type=int, default=2, help="timed calls per configuration after the warm-up")
    parser.add_argument("--real-architecture", action="store_true", help="stand-ins of the real network size")
    parser.add_argument("--patch", type=int, default=64, help="1.5 mm patch edge with --real-architecture (real: 128)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-weights-") as tmp:
        from standin_weights import write_standin_weights

        write_standin_weights(Path(tmp), fast=False, vertebrae_body=False, real_architecture=args.real_architecture,
                              part_patch=(args.patch,) * 3 if args.real_architecture else None)
        ct = phantom_ct(tuple(args.shape))
        config = SegmenterConfig(weights_dir=Path(tmp), device=args.device, vertebral_bodies="off")
        engines = {name: ResidentEngine(config, time_forward=True, roi_subset=roi_subset(liver))
                   for name, liver in RUNS.items()}
        wall: dict[str, list[float]] = {name: [] for name in RUNS}
        forward: dict[str, list[float]] = {name: [] for name in RUNS}
        try:
            for name, engine in engines.items():
                started = time.perf_counter()
                engine.segment(ct)
                print(f"warm-up {name}: {time.perf_counter() - started:.2f} s", flush=True)
            for round_index in range(args.rounds):
                order = list(RUNS) if round_index % 2 == 0 else list(RUNS)[::-1]
                for name in order:
                    started = time.perf_counter()
                    engines[name].segment(ct)
                    wall[name].append(time.perf_counter() - started)
                    forward[name].append(engines[name].last_forward_s or 0.0)
                    print(f"round {round_index + 1} {name}: {wall[name][-1]:.2f} s", flush=True)
        finally:
            for engine in engines.values():
                engine.close()

    print(f"CT {ct.shape} at {tuple(round(s, 2) for s in ct.spacing)} mm, device {args.device}, "
          f"{'real-size' if args.real_architecture else 'tiny'} stand-in networks")
    for name in RUNS:
        print(f"{name:>16}: {statistics.mean(wall[name]):6.2f} s per CT "
              f"({', '.join(f'{s:.2f}' for s in wall[name])}), forward passes {statistics.mean(forward[name]):6.2f} s")
    base, liver = (statistics.mean(wall[name]) for name in RUNS)
    print(f"liver and spleen add {liver - base:.2f} s per CT: {liver / base:.2f}x the muscle-and-bone time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
