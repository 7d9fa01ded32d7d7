"""The key image: a colour Secondary Capture any PACS can show, for people rather than software.

Left: a coronal view through the paraspinal muscles (the CT plane at the muscles' mean
anterior-posterior depth) with each level's muscle projected onto it in the level's colour,
patient right on the viewer's left, head up. Right: per-level volume, median HU and status,
the T1–T10 totals and the screening flag.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import highdicom as hd  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from node.labels import MEASURED_LEVELS  # noqa: E402
from node.pipeline.ct import CTVolume  # noqa: E402

from . import codes  # noqa: E402
from .options import EncodeOptions  # noqa: E402
from .seg import MUSCLE_SEGMENTS, SegmentMap  # noqa: E402
from .study import character_set, software_versions, source_images  # noqa: E402

WIDTH_PX, HEIGHT_PX, DPI = 1280, 800, 100
WINDOW_HU = (-160.0, 240.0)  # soft-tissue window: muscle and fat apart
DERIVED_BANNER = "DERIVED BY SOFTWARE - NOT FOR DIAGNOSIS"
STATUS_MARK = {"complete": "ok", "partial": "PARTIAL", "absent": "ABSENT"}


def render_key_image(ct: CTVolume, segments: SegmentMap, result: dict, options: EncodeOptions) -> np.ndarray:
    """RGB uint8 [rows, columns, 3], muscle coloured as the SEG draws it."""
    figure = Figure(figsize=(WIDTH_PX / DPI, HEIGHT_PX / DPI), dpi=DPI, facecolor="black")
    canvas = FigureCanvasAgg(figure)
    _draw_coronal(figure.add_axes((0.01, 0.04, 0.45, 0.86)), ct, segments.numbers)
    _draw_table(figure.add_axes((0.49, 0.04, 0.50, 0.86)), result, options)
    figure.text(0.5, 0.965, DERIVED_BANNER, color="yellow", ha="center", va="center", fontsize=16, weight="bold")
    figure.text(0.5, 0.925, "Paraspinal muscle T1-T10  |  " + ", ".join(software_versions(result)),
                color="white", ha="center", va="center", fontsize=10)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def _coronal_axes(ct: CTVolume) -> tuple[int, int]:
    """Array axes (1 = rows, 2 = columns) closest to patient left-right and anterior-posterior."""
    lr = 1 + int(np.argmax(np.abs([ct.direction[0, 1], ct.direction[0, 0]])))
    return lr, 3 - lr


def _draw_coronal(axes, ct: CTVolume, numbers: np.ndarray) -> None:
    lr, ap = _coronal_axes(ct)
    level_of_segment = np.zeros(256, dtype=np.uint8)
    level_of_segment[1 : MUSCLE_SEGMENTS + 1] = (np.arange(MUSCLE_SEGMENTS) // 2) + 1
    level_of_voxel = level_of_segment[numbers]  # 1..10 on muscle, 0 elsewhere
    depth = _muscle_depth(level_of_voxel.max(axis=0), ap)
    plane = np.take(ct.hu, depth, axis=ap).astype(np.float32)  # [k, lr]
    projected = level_of_voxel.max(axis=ap)  # the level seen along anterior-posterior
    colours = np.zeros((len(MEASURED_LEVELS) + 1, 4))
    for i, level in enumerate(MEASURED_LEVELS, start=1):
        colours[i] = (*(v / 255 for v in codes.LEVEL_RGB[level]), 0.55)
    overlay = colours[projected]
    plane, overlay = _orient(ct, plane, lr), _orient(ct, overlay, lr)
    spacing_lr = ct.spacing[1] if lr == 1 else ct.spacing[2]
    axes.imshow(plane, cmap="gray", vmin=WINDOW_HU[0], vmax=WINDOW_HU[1], aspect=ct.spacing[0] / spacing_lr,
                interpolation="bilinear")
    axes.imshow(overlay, aspect=ct.spacing[0] / spacing_lr, interpolation="nearest")
    axes.set_axis_off()
    axes.text(0.01, 0.99, "R", color="white", transform=axes.transAxes, va="top", fontsize=12)
    axes.text(0.99, 0.99, "L", color="white", transform=axes.transAxes, va="top", ha="right", fontsize=12)
    _label_levels(axes, ct, projected)


def _muscle_depth(footprint: np.ndarray, ap: int) -> int:
    """The muscles' mean row or column along anterior-posterior in the in-plane footprint [r, c];
    the middle of the image when there is no muscle."""
    profile = np.count_nonzero(footprint, axis=2 - ap)
    if profile.sum() == 0:
        return footprint.shape[ap - 1] // 2
    return int(round(float(np.average(np.arange(profile.size), weights=profile))))


def _orient(ct: CTVolume, image: np.ndarray, lr: int) -> np.ndarray:
    """Head up (superior slices first) and patient right on the viewer's left (LPS x increasing)."""
    if ct.superior_sign > 0:
        image = image[::-1]
    lr_direction = ct.direction[0, 1] if lr == 1 else ct.direction[0, 0]
    return image[:, ::-1] if lr_direction < 0 else image


def _label_levels(axes, ct: CTVolume, projected: np.ndarray) -> None:
    """Level names beside each coloured band, at its vertical centre."""
    n_slices = projected.shape[0]
    for i, level in enumerate(MEASURED_LEVELS, start=1):
        slices = np.flatnonzero((projected == i).any(axis=1))
        if slices.size == 0:
            continue
        centre = float(slices.mean())
        row = n_slices - 1 - centre if ct.superior_sign > 0 else centre
        axes.text(-0.5, row, level + " ", color=np.array(codes.LEVEL_RGB[level]) / 255, ha="right", va="center",
                  fontsize=9, weight="bold", clip_on=False)


def _draw_table(axes, result: dict, options: EncodeOptions) -> None:
    axes.set_axis_off()
    header = ["Level", "Volume (cm³)", "Median HU", "HU left / right", "Status"]
    rows = [_row(level["level"], level) for level in result["levels"]]
    rows.append(_row("T1-T10", {**result["total"], "status": ""}))
    table = axes.table(cellText=rows, colLabels=header, loc="upper center", cellLoc="center",
                       colWidths=[0.14, 0.22, 0.2, 0.26, 0.18])
    table.auto_set_font_size(False)
    table.set_fontsize(11)
    table.scale(1.0, 1.6)
    for (row, column), cell in table.get_celld().items():
        cell.set_facecolor("black")
        cell.set_edgecolor("#555555")
        cell.get_text().set_color("white")
        if row == 0 or row == len(rows):
            cell.get_text().set_weight("bold")
        if column == 0 and 0 < row <= len(MEASURED_LEVELS):
            cell.get_text().set_color(np.array(codes.LEVEL_RGB[MEASURED_LEVELS[row - 1]]) / 255)
    _draw_flag(axes, result, options)


def _row(name: str, entry: dict) -> list[str]:
    combined = entry["combined"]
    sides = f"{_hu(entry['left']['median_hu'])} / {_hu(entry['right']['median_hu'])}"
    return [name, f"{combined['volume_cm3']:.1f}", _hu(combined["median_hu"]), sides, STATUS_MARK.get(entry["status"], "")]


def _hu(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def screening_flag(result: dict, threshold_hu: float) -> bool:
    """Raised when the T1–T10 median attenuation is below the configured threshold."""
    median = result["total"]["combined"]["median_hu"]
    return median is not None and median < threshold_hu


def _draw_flag(axes, result: dict, options: EncodeOptions) -> None:
    median = result["total"]["combined"]["median_hu"]
    if screening_flag(result, options.low_attenuation_hu):
        text, colour = (f"LOW MUSCLE ATTENUATION: T1-T10 median {median:.0f} HU < {options.low_attenuation_hu:g} HU",
                        "red")
    elif median is None:
        text, colour = "No T1-T10 muscle measured: no screening result", "orange"
    else:
        text, colour = f"T1-T10 median {median:.0f} HU (flag below {options.low_attenuation_hu:g} HU)", "white"
    axes.text(0.5, 0.08, text, color=colour, ha="center", va="center", fontsize=13, weight="bold",
              transform=axes.transAxes, bbox={"facecolor": "black", "edgecolor": colour, "pad": 6})
    statuses = [level["level"] for level in result["levels"] if level["status"] != "complete"]
    if statuses:
        axes.text(0.5, 0.015, "Not complete: " + ", ".join(statuses), color="orange", ha="center", va="center",
                  fontsize=10, transform=axes.transAxes)


def build_key_image(ct: CTVolume, segments: SegmentMap, result: dict, options: EncodeOptions) -> hd.sc.SCImage:
    sources = source_images(ct)
    image = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=sources[0],
        pixel_array=render_key_image(ct, segments, result, options),
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=hd.UID(),
        series_number=options.key_image_series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=options.manufacturer,
        patient_orientation=("L", "F"),
        series_description=options.key_image_series_description,
        institution_name=options.institution_name,
        software_versions=software_versions(result),
        specific_character_set=character_set(sources[0], options.texts()),
    )
    image.BurnedInAnnotation = "YES"
    image.BodyPartExamined = "CHEST"  # what the image shows; a paired part (e.g. PARTIALBODY's kin) would need Laterality
    image.ImageComments = "Derived by paraspinal-node from the CT series; not for diagnosis"
    image.DerivationDescription = "Rendered summary of the paraspinal muscle measurement"
    return image
