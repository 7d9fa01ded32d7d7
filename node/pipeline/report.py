"""Write a measurement result as measurements.json and measurements.csv, atomically.

The CSV has one row per structure: each reported level (muscle and trabecular bone; T1..T10 on
chest CT, L1..L5 on abdominal CT), each span total (T1-T10, L1-L5; muscle), the other vertebrae
listed (bone only: T11, T12, L1 on chest CT), then liver and spleen (their parenchyma in the
first statistics columns) when the liver is measured. Cells that do not apply are empty.
An MR result has columns of its own (MR_COLUMNS): volume, area and the Dixon fat figures.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from node.durable import make_dirs, write_atomic
from node.pipeline.bone import VertebraResult
from node.pipeline.liver import OrganResult
from node.pipeline.measure import MeasurementResult, MuscleStats
from node.pipeline.mr_measure import MRMeasurementResult, MRSides
from node.screening import LevelStatus, coverage

STAT_COLUMNS = ("voxels", "volume_cm3", "median_hu", "mean_hu", "sd_hu", "p25_hu", "p75_hu", "fat_fraction", "fat_grade")
LEAN_COLUMNS = ("voxels", "volume_cm3", "median_hu", "mean_hu", "sd_hu", "p25_hu", "p75_hu")
BONE_COLUMNS = ("status", "mask", *LEAN_COLUMNS)


def csv_header() -> list[str]:
    """Seed-compatible first columns (level, combined volume and median), then everything else."""
    header = ["level", "status"]
    for side in ("combined", "left", "right"):
        prefix = "" if side == "combined" else f"{side}_"
        header += [prefix + name for name in STAT_COLUMNS]
        header += [f"{prefix}lean_{name}" for name in LEAN_COLUMNS]
    return header + [f"bone_{name}" for name in BONE_COLUMNS]


def csv_rows(result: MeasurementResult) -> list[list]:
    bone = {vertebra.level: _bone_cells(vertebra) for vertebra in result.vertebrae}
    blank_bone = [""] * len(BONE_COLUMNS)
    rows = [[level.level, level.status, *_side_cells(level.status, level.combined, level.left, level.right),
             *bone.pop(level.level, blank_bone)] for level in result.levels]
    for total in result.totals:
        status = coverage((level.level, level.status) for level in result.levels if level.level in total.span.levels).status
        sides = total.sides
        rows.append([total.span.name, status, *_side_cells(status, sides.combined, sides.left, sides.right), *blank_bone])
    muscle_blank = [""] * (len(csv_header()) - 2 - len(BONE_COLUMNS))
    rows += [[level, "", *muscle_blank, *cells] for level, cells in bone.items()]
    if result.liver is not None:
        rows += [_organ_row("liver", result.liver, len(muscle_blank) + len(BONE_COLUMNS)),
                 _organ_row("spleen", result.liver.spleen, len(muscle_blank) + len(BONE_COLUMNS))]
    return rows


def _bone_cells(vertebra: VertebraResult) -> list:
    cells = [vertebra.status, vertebra.mask, *(getattr(vertebra.trabecular, name) for name in LEAN_COLUMNS)]
    return ["" if value is None else value for value in cells]


def _organ_row(name: str, organ: OrganResult, width: int) -> list:
    cells = [getattr(organ.parenchyma, column) for column in LEAN_COLUMNS]
    cells = ["" if value is None else value for value in cells]
    return [name, organ.status, *cells, *[""] * (width - len(cells))]


def _side_cells(status: LevelStatus, *sides: MuscleStats) -> list:
    """Empty for an absent level: it was not measured, which a 0 cm3 volume would hide."""
    cells: list = []
    for stats in sides:
        cells += [getattr(stats, name) for name in STAT_COLUMNS]
        cells += [getattr(stats.lean, name) for name in LEAN_COLUMNS]
    return ["" if value is None or status is LevelStatus.ABSENT else value for value in cells]


MR_COLUMNS = ("voxels", "volume_cm3", "area_cm2", "fat_signal_fraction", "median_fat_fraction", "fat_area_fraction",
              "fat_grade")


def mr_csv_header() -> list[str]:
    """MR: level and status, then each side's volume, area and fat figures (combined first, as on CT)."""
    return ["level", "status"] + [f"{'' if side == 'combined' else side + '_'}{name}"
                                  for side in ("combined", "left", "right") for name in MR_COLUMNS]


def mr_csv_rows(result: MRMeasurementResult) -> list[list]:
    rows = [[level.level, level.status, *_mr_cells(level.status, level.sides)] for level in result.levels]
    for total in result.totals:
        status = coverage((level.level, level.status) for level in result.levels if level.level in total.span.levels).status
        rows.append([total.span.name, status, *_mr_cells(status, total.sides)])
    return rows


def _mr_cells(status: LevelStatus, sides: MRSides) -> list:
    values = [getattr(stats, name) for stats in (sides.combined, sides.left, sides.right) for name in MR_COLUMNS]
    return ["" if value is None or status is LevelStatus.ABSENT else value for value in values]


def write_reports(result: MeasurementResult, out_dir: Path) -> tuple[Path, Path]:
    return _write(result.to_dict(), csv_header(), csv_rows(result), out_dir)


def write_mr_reports(result: MRMeasurementResult, out_dir: Path) -> tuple[Path, Path]:
    return _write(result.to_dict(), mr_csv_header(), mr_csv_rows(result), out_dir)


def _write(data: dict, header: list[str], rows: list[list], out_dir: Path) -> tuple[Path, Path]:
    make_dirs(out_dir)
    json_path = out_dir / "measurements.json"
    csv_path = out_dir / "measurements.csv"
    write_atomic(json_path, (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode())
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    write_atomic(csv_path, buffer.getvalue().encode())
    return json_path, csv_path
