"""One TotalSegmentator call as the node makes it, with stand-in weights of the real architecture.

Prints the wall time of TotalSegmentatorSegmenter.segment (model process start included) and the
peak RSS of this process and of the model process. Stand-in networks of the real size cost what the
real ones cost (tests/standin_weights.py).

    .venv/bin/python bench/segment.py                      # CPU, small phantom, 64³ patches
    .venv/bin/python bench/segment.py --device gpu --shape 400 512 512 --patch 128
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from node.config import SegmenterConfig
from node.pipeline.ct import CTVolume
from node.pipeline.segment import TotalSegmentatorSegmenter


def phantom_ct(shape: tuple[int, int, int]) -> CTVolume:
    from phantom import make_phantom  # not at the top: spawned processes re-import this script

    phantom = make_phantom(shape=shape)
    return CTVolume(hu=phantom.hu, spacing=phantom.spacing, origin=np.array(phantom.origin), direction=np.eye(3))


def peak_rss_mb(who: int) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # kB on Linux


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu, gpu or gpu:N")
    parser.add_argument("--shape", type=int, nargs=3, default=(64, 96, 96), metavar=("K", "R", "C"))
    parser.add_argument("--patch", type=int, default=64, help="1.5 mm patch edge (real: 128)")
    parser.add_argument("--fast", action="store_true", help="3 mm model instead of the 1.5 mm parts")
    parser.add_argument("--no-body", action="store_true", help="skip the vertebrae_body task")
    parser.add_argument("--weights-dir", type=Path, help="reuse stand-in weights written here before")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-weights-") as tmp:
        weights_dir = args.weights_dir or Path(tmp)
        if not any(weights_dir.glob("Dataset*")):
            from standin_weights import write_standin_weights

            started = time.perf_counter()
            write_standin_weights(weights_dir, real_architecture=True, part_patch=(args.patch,) * 3)
            print(f"stand-in weights written in {time.perf_counter() - started:.1f} s")
        ct = phantom_ct(tuple(args.shape))
        config = SegmenterConfig(weights_dir=weights_dir, device=args.device, fast=args.fast,
                                 vertebral_bodies="off" if args.no_body else "on")
        started = time.perf_counter()
        seg = TotalSegmentatorSegmenter(config).segment(ct)
        seconds = time.perf_counter() - started
    print(f"CT {ct.shape} at {tuple(round(s, 2) for s in ct.spacing)} mm, device {args.device}, "
          f"patch {args.patch}, fast {args.fast}, vertebrae_body {not args.no_body}")
    print(f"labels found: {sorted(int(v) for v in np.unique(seg.labels))}")
    print(f"segment: {seconds:.1f} s")
    print(f"peak RSS: node {peak_rss_mb(resource.RUSAGE_SELF):.0f} MB, "
          f"model process {peak_rss_mb(resource.RUSAGE_CHILDREN):.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
