"""Load and measure a 512×512×400 CT with masks; prints seconds per stage and peak RSS.

Target (issue 2): ≤ 5 s and ≤ 3 GB peak RSS on the 2-core CI machine. The data are generated
first; the timed part runs in a fresh child process so that its peak RSS is its own.

    .venv/bin/python bench/measure.py [--shape 400 512 512] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def generate(shape: tuple[int, int, int], workdir: Path) -> tuple[Path, Path]:
    import phantom as ph

    started = time.perf_counter()
    body = ph.make_phantom(shape=shape)
    series = ph.write_dicom_series(body, workdir / "ct", ph.LAYOUTS["axial"])
    masks = ph.write_masks(body, workdir / "masks", "multilabel")
    print(f"generated {shape} phantom in {time.perf_counter() - started:.1f} s (not timed)")
    return series.folder, masks


def timed(ct_path: Path, seg_path: Path) -> dict:
    from node.config import MeasureConfig
    from node.pipeline.ct_load import load_ct
    from node.pipeline.measure import measure
    from node.pipeline.seg_load import load_segmentation

    times = {}
    t0 = time.perf_counter()
    ct = load_ct(ct_path)
    times["load_ct_s"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    seg = load_segmentation(seg_path, ct)
    times["load_masks_s"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    measure(ct, seg, MeasureConfig())
    times["measure_s"] = time.perf_counter() - t2
    times["total_s"] = time.perf_counter() - t0
    times["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(400, 512, 512), metavar=("K", "R", "C"))
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--child", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(timed(*args.child)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        ct_path, seg_path = generate(tuple(args.shape), workdir)
        out = subprocess.run([sys.executable, __file__, "--child", str(ct_path), str(seg_path)],
                             check=True, capture_output=True, text=True).stdout
        figures = json.loads(out.strip().splitlines()[-1])
    for name, value in figures.items():
        print(f"{name}: {value:.2f}")
    print(f"target: total ≤ 5 s, peak RSS ≤ 3 GB -> {'met' if figures['total_s'] <= 5 and figures['peak_rss_gb'] <= 3 else 'NOT met'}")


if __name__ == "__main__":
    main()
