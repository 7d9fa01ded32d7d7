"""Write a measurement result as measurements.json and measurements.csv, atomically."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from node.durable import make_dirs, write_atomic
from node.pipeline.measure import MeasurementResult, MuscleStats
from node.screening import coverage

STAT_COLUMNS = ("voxels", "volume_cm3", "median_hu", "mean_hu", "sd_hu", "p25_hu", "p75_hu", "fat_fraction")
LEAN_COLUMNS = ("voxels", "volume_cm3", "median_hu", "mean_hu", "sd_hu", "p25_hu", "p75_hu")
TOTAL_ROW = "T1-T10"


def csv_header() -> list[str]:
    """Seed-compatible first columns (level, combined volume and median), then everything else."""
    header = ["level", "status"]
    for side in ("combined", "left", "right"):
        prefix = "" if side == "combined" else f"{side}_"
        header += [prefix + name for name in STAT_COLUMNS]
        header += [f"{prefix}lean_{name}" for name in LEAN_COLUMNS]
    return header


def csv_rows(result: MeasurementResult) -> list[list]:
    rows = [[level.level, level.status, *_side_cells(level.combined, level.left, level.right)] for level in result.levels]
    total_status = coverage((level.level, level.status) for level in result.levels).status
    rows.append([TOTAL_ROW, total_status, *_side_cells(result.total.combined, result.total.left, result.total.right)])
    return rows


def _side_cells(*sides: MuscleStats) -> list:
    cells: list = []
    for stats in sides:
        cells += [getattr(stats, name) for name in STAT_COLUMNS]
        cells += [getattr(stats.lean, name) for name in LEAN_COLUMNS]
    return ["" if value is None else value for value in cells]


def write_reports(result: MeasurementResult, out_dir: Path) -> tuple[Path, Path]:
    make_dirs(out_dir)
    json_path = out_dir / "measurements.json"
    csv_path = out_dir / "measurements.csv"
    write_atomic(json_path, (json.dumps(result.to_dict(), indent=2, ensure_ascii=False) + "\n").encode())
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(csv_header())
    writer.writerows(csv_rows(result))
    write_atomic(csv_path, buffer.getvalue().encode())
    return json_path, csv_path
