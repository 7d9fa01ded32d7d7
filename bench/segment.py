"""Both segmentation engines on the same CT, in one process tree: the resident engine vs. the TotalSegmentator path.

Each engine gets one warm-up call, then `--rounds` calls each in alternating order (resident
first in odd rounds, TotalSegmentator first in even ones), so that a machine whose load changes
during the run penalises neither. Per engine it prints the wall time per CT, the time inside the
networks' forward passes (timers around nnU-Net's call of the network, in both model processes)
and the time outside them; the last line is the ratio and whether the labels were identical.

Stand-in weights (tests/standin_weights.py): tiny networks by default, so that on a CPU the fixed
costs dominate as they do on a GPU; `--real-architecture` builds the real network sizes.

    .venv/bin/python bench/segment.py                                   # CPU, tiny networks
    .venv/bin/python bench/segment.py --device gpu --phantom --shape 400 512 512 --real-architecture --patch 128
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from node.config import SegmenterConfig
from node.pipeline.ct import CTVolume
from node.pipeline.engine import ResidentEngine
from node.pipeline.segment import TotalSegmentatorSegmenter

ENGINES = ("resident", "totalsegmentator")


def phantom_ct(shape: tuple[int, int, int]) -> CTVolume:
    """The test phantom's chest, with the spacing that fits it into `shape` (GPU runs)."""
    from phantom import make_phantom  # not at the top: spawned processes re-import this script

    phantom = make_phantom(shape=shape)
    return CTVolume(hu=phantom.hu, spacing=phantom.spacing, origin=np.array(phantom.origin), direction=np.eye(3))


def small_ct(shape: tuple[int, int, int]) -> CTVolume:
    """A few centimetres of noisy soft tissue and bone at 2 × 1.2 × 1.2 mm (CPU runs: the fixed costs dominate)."""
    rng = np.random.default_rng(0)
    hu = rng.integers(-560, -440, size=shape).astype(np.int16)
    k, r, c = shape
    hu[k // 5:3 * k // 4, r // 6:2 * r // 3, c // 8:c // 2] = rng.integers(-60, 420, size=(3 * k // 4 - k // 5, 2 * r // 3 - r // 6, c // 2 - c // 8))
    hu[k // 3:k // 2, r // 4:r // 2, c // 5:c // 3] = 1000
    return CTVolume(hu=hu, spacing=(2.0, 1.2, 1.2), origin=np.array([10.0, -20.0, 30.0]), direction=np.diag([1.0, 1.0, -1.0]))


@dataclass
class Runs:
    wall_s: list[float] = field(default_factory=list)
    forward_s: list[float] = field(default_factory=list)
    labels: list[np.ndarray] = field(default_factory=list)

    def line(self, name: str) -> str:
        wall, forward = statistics.mean(self.wall_s), statistics.mean(self.forward_s)
        return (f"{name:>16}: {wall:7.2f} s per CT (n={len(self.wall_s)}; "
                f"{', '.join(f'{s:.2f}' for s in self.wall_s)}), forward passes {forward:6.2f} s, "
                f"outside them {wall - forward:7.2f} s")


def timed_call(segmenter, ct: CTVolume) -> tuple[float, float, np.ndarray]:
    started = time.perf_counter()
    seg = segmenter.segment(ct)
    wall = time.perf_counter() - started
    labels = seg.labels if seg.body is None else np.stack([seg.labels, seg.body.astype(np.uint8)])
    return wall, segmenter.last_forward_s or 0.0, labels


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu, gpu or gpu:N")
    parser.add_argument("--shape", type=int, nargs=3, default=(32, 48, 48), metavar=("K", "R", "C"))
    parser.add_argument("--phantom", action="store_true", help="the test phantom's chest fitted into --shape")
    parser.add_argument("--rounds", type=int, default=2, help="timed calls per engine after the warm-up")
    parser.add_argument("--real-architecture", action="store_true", help="stand-ins of the real network size")
    parser.add_argument("--patch", type=int, default=64, help="1.5 mm patch edge with --real-architecture (real: 128)")
    parser.add_argument("--fast", action="store_true", help="3 mm model instead of the 1.5 mm parts")
    parser.add_argument("--no-body", action="store_true", help="skip the vertebrae_body task")
    parser.add_argument("--weights-dir", type=Path, help="reuse stand-in weights written here before")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-weights-") as tmp:
        weights_dir = args.weights_dir or Path(tmp)
        if not any(weights_dir.glob("Dataset*")):
            from standin_weights import write_standin_weights

            write_standin_weights(weights_dir, real_architecture=args.real_architecture,
                                  part_patch=(args.patch,) * 3 if args.real_architecture else None)
        ct = phantom_ct(tuple(args.shape)) if args.phantom else small_ct(tuple(args.shape))
        config = SegmenterConfig(weights_dir=weights_dir, device=args.device, fast=args.fast,
                                 vertebral_bodies="off" if args.no_body else "on")
        segmenters = {"resident": ResidentEngine(config, time_forward=True),
                      "totalsegmentator": TotalSegmentatorSegmenter(config, time_forward=True)}
        runs = {name: Runs() for name in ENGINES}
        try:
            for name in ENGINES:
                wall, _, labels = timed_call(segmenters[name], ct)
                runs[name].labels.append(labels)
                print(f"warm-up {name}: {wall:.2f} s", flush=True)
            for round_index in range(args.rounds):
                order = ENGINES if round_index % 2 == 0 else ENGINES[::-1]
                for name in order:
                    wall, forward, labels = timed_call(segmenters[name], ct)
                    runs[name].wall_s.append(wall)
                    runs[name].forward_s.append(forward)
                    runs[name].labels.append(labels)
                    print(f"round {round_index + 1} {name}: {wall:.2f} s", flush=True)
        finally:
            segmenters["resident"].close()

    print(f"CT {ct.shape} at {tuple(round(s, 2) for s in ct.spacing)} mm, device {args.device}, "
          f"{'real-size' if args.real_architecture else 'tiny'} stand-in networks, fast {args.fast}, "
          f"vertebrae_body {not args.no_body}")
    for name in ENGINES:
        print(runs[name].line(name))
    reference = runs["totalsegmentator"].labels[0]
    identical = all(np.array_equal(labels, reference) for name in ENGINES for labels in runs[name].labels)
    ratio = statistics.mean(runs["resident"].wall_s) / statistics.mean(runs["totalsegmentator"].wall_s)
    print(f"resident/totalsegmentator time per CT: {ratio:.2f}; labels identical: {'yes' if identical else 'no'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
