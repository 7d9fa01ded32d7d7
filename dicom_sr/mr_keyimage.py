"""The MR key image: a coronal water image through the paraspinal muscles with their fat fraction overlaid.

Left: the coronal plane at the muscles' mean anterior-posterior depth, patient right on the
viewer's left, head up; each measured muscle voxel on that plane is coloured by its fat
fraction F/(F+W) (0 % blue to 100 % yellow; without Dixon, by level as on CT), level names beside
it. Right: per level and span the volume, the mean cross-sectional area, the fat signal fraction
and fat area per side and the simplified Goutallier grade, then the Dixon caveat.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
from matplotlib import colormaps  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from node.pipeline.mr_load import MRImages  # noqa: E402
from node.pipeline.mr_measure import DixonStats, MRMeasurementResult  # noqa: E402
from node.screening import LevelStatus  # noqa: E402

from .keyimage import (  # noqa: E402
    DERIVED_BANNER,
    DPI,
    HEIGHT_PX,
    STATUS_MARK,
    WIDTH_PX,
    _colours,
    _coronal_axes,
    _label_levels,
    _level_of_voxel,
    _mark_sides,
    _muscle_depth,
    _orient,
    _picture_axes,
    dark_table,
)
from .seg import SegmentMap  # noqa: E402
from .sr import span_coverage  # noqa: E402
from .study import software_versions  # noqa: E402

FAT_COLOURS = colormaps["plasma"]
GRADE_NAME = {"normal": "I", "moderate": "II", "severe": "III"}


def render_mr_key_image(images: MRImages, segments: SegmentMap, result: MRMeasurementResult) -> np.ndarray:
    figure = Figure(figsize=(WIDTH_PX / DPI, HEIGHT_PX / DPI), dpi=DPI, facecolor="black")
    canvas = FigureCanvasAgg(figure)
    _draw_coronal(figure, images, segments)
    _draw_table(figure.add_axes((0.49, 0.10, 0.50, 0.80)), result)
    figure.text(0.5, 0.965, DERIVED_BANNER, color="yellow", ha="center", va="center", fontsize=16, weight="bold")
    title = "Paraspinal muscle fat fraction (Dixon)" if result.fat.dixon else "Paraspinal muscle (no Dixon)"
    figure.text(0.5, 0.925, f"{title}  |  " + ", ".join(software_versions(result.software)), color="white",
                ha="center", va="center", fontsize=10)
    caveat = result.fat.caveat if result.fat.dixon else result.fat.not_assessed_reason or ""
    figure.text(0.74, 0.05, _wrap(caveat, 95), color="#aaaaaa", ha="center", va="center", fontsize=8)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def _draw_coronal(figure: Figure, images: MRImages, segments: SegmentMap) -> None:
    grid = images.image
    levels = _level_of_voxel(segments)
    lr, ap = _coronal_axes(grid)
    spacing_lr = grid.spacing[1] if lr == 1 else grid.spacing[2]
    axes = _picture_axes(figure, grid.shape[lr] * spacing_lr, grid.shape[0] * grid.spacing[0], min_height=0.0)
    depth = _muscle_depth(levels.max(axis=0), ap)
    plane = np.take(grid.hu, depth, axis=ap).astype(np.float32)
    on_plane = np.take(levels, depth, axis=ap)
    low, high = np.percentile(plane, [1, 99.5]) if plane.size else (0.0, 1.0)
    axes.imshow(_orient(grid, plane, lr), cmap="gray", vmin=low, vmax=max(high, low + 1), aspect="auto",
                interpolation="bilinear")
    if images.fat is not None:
        fat = np.take(images.fat, depth, axis=ap)
        total = fat + plane
        fraction = np.divide(fat, total, out=np.zeros_like(total), where=total > 0)
        overlay = FAT_COLOURS(np.clip(fraction, 0.0, 1.0))
        overlay[..., 3] = np.where(on_plane > 0, 0.75, 0.0)
        axes.imshow(_orient(grid, overlay, lr), aspect="auto", interpolation="nearest")
    else:
        axes.imshow(_orient(grid, _colours(segments.levels)[on_plane], lr), aspect="auto", interpolation="nearest")
    _mark_sides(axes)
    _label_levels(figure, axes, _orient(grid, levels.max(axis=ap), lr), segments.levels)


def _draw_table(axes, result: MRMeasurementResult) -> None:
    axes.set_axis_off()
    header = ["Level", "Vol. cm³", "Area cm²", "Fat % L / R", "Fat area % L / R", "Grade L / R", "Status"]
    rows = [_row(level.level, level.left, level.right, level.combined, level.status, STATUS_MARK[level.status])
            for level in result.levels]
    for total in result.totals:
        status = span_coverage(result, total.span).status
        sides = total.sides
        rows.append(_row(total.span.name, sides.left, sides.right, sides.combined, status, STATUS_MARK[status]))
    dark_table(axes, header, rows, [0.09, 0.13, 0.11, 0.18, 0.2, 0.15, 0.12], 10,
               [level.level for level in result.levels], lambda row: row > len(result.levels))
    note = (f"Grade: simplified Goutallier of the {result.fat.grade_metric.replace('_', ' ')}\n"
            "I < 10 %, II 10-50 %, III > 50 %" if result.fat.dixon else "Fat grade not assessed: no Dixon")
    axes.text(0.5, 0.12, note, color="white" if result.fat.dixon else "orange", ha="center", va="center",
              fontsize=11, weight="bold", transform=axes.transAxes)
    if result.qc:
        axes.text(0.5, 0.05, "QC: " + ", ".join(item.code.replace("_", " ") for item in result.qc), color="orange",
                  ha="center", va="center", fontsize=9, transform=axes.transAxes)


def _row(name: str, left: DixonStats, right: DixonStats, combined: DixonStats, status: LevelStatus, mark: str) -> list[str]:
    if status is LevelStatus.ABSENT:
        return [name, "-", "-", "-", "-", "-", mark]
    return [name, f"{combined.volume_cm3:.1f}", _number(combined.area_cm2, 1),
            f"{_percent(left.fat_signal_fraction)} / {_percent(right.fat_signal_fraction)}",
            f"{_percent(left.fat_area_fraction)} / {_percent(right.fat_area_fraction)}",
            f"{GRADE_NAME.get(left.fat_grade or '', '-')} / {GRADE_NAME.get(right.fat_grade or '', '-')}", mark]


def _percent(fraction: float | None) -> str:
    return "-" if fraction is None else f"{100 * fraction:.1f}"


def _number(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _wrap(text: str, width: int) -> str:
    words, lines, line = text.split(), [], ""
    for word in words:
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return "\n".join([*lines, line])
