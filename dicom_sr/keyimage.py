"""The key image: a colour Secondary Capture any PACS can show, for people rather than software.

Left: a coronal view through the paraspinal muscles (the CT plane at the muscles' mean
anterior-posterior depth) with each level's muscle projected onto it in the level's colour,
patient right on the viewer's left, head up, level names in a strip of their own beside it.
A series too short for a readable coronal picture (a 20-slice scan is a thin strip) gets an
axial slice through the middle of the measured muscle instead. Right: per-level volume,
median HU and status, each span's totals (T1-T10, L1-L5) marked incomplete when they miss
levels, and the T1-T10 screening flag (the only span with a muscle threshold); a bone column
(trabecular median HU per vertebra, with the vertebrae that have no muscle row below the
totals), the low-bone flag and, when the liver is measured, a liver line. When the patient has
earlier results (node.priors), two small trend plots under the picture: T1-T10 muscle median HU
and the bone-flag vertebra's HU over time, a prior not comparable with this scan drawn hollow
with the reasons noted.
"""

from __future__ import annotations

from collections.abc import Callable

import matplotlib

matplotlib.use("Agg")

from dataclasses import dataclass  # noqa: E402
from datetime import date  # noqa: E402

import highdicom as hd  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.dates import DateFormatter, YearLocator  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from pydicom.dataset import Dataset  # noqa: E402

from node.labels import THORACIC_SPAN  # noqa: E402
from node.pipeline.bone import BODY_MASK, VertebraResult  # noqa: E402
from node.pipeline.ct import CTVolume  # noqa: E402
from node.pipeline.flags import Flag, FlagState  # noqa: E402
from node.pipeline.measure import LevelResult, MeasurementResult, MuscleStats, Software, SpanTotal  # noqa: E402
from node.priors.change import Origin, Quantity, QuantityKey, parse_da, snapshot_from_result  # noqa: E402
from node.screening import Coverage, LevelStatus, low_attenuation  # noqa: E402

from . import codes  # noqa: E402
from .options import MANUFACTURER, EncodeOptions  # noqa: E402
from .seg import SegmentMap  # noqa: E402
from .sr import span_coverage  # noqa: E402
from .study import character_set, copy_patient_and_study, software_versions, source_images  # noqa: E402

WIDTH_PX, HEIGHT_PX, DPI = 1280, 800, 100
PANEL = (0.01, 0.04, 0.46, 0.86)  # figure fractions (left, bottom, width, height) of the picture and its labels
TREND_PANEL = (0.01, 0.33, 0.46, 0.57)  # the picture's panel when trend plots take the bottom of the left half
TREND_HEIGHT = 0.22
LABEL_STRIP_PX = 48  # room for "T10" left of the picture, inside the figure
MIN_CORONAL_HEIGHT = 0.4  # of the panel: flatter coronal pictures are replaced by an axial slice
WINDOW_HU = (-160.0, 240.0)  # soft-tissue window: muscle and fat apart
DERIVED_BANNER = "DERIVED BY SOFTWARE - NOT FOR DIAGNOSIS"
# DICOM's defined Body Part Examined terms a CT through the thorax may carry. Another value (a
# vendor's PARTIALBODY, say) or none is not copied: readers cannot tell whether it is a paired
# part, so Laterality is written empty, which DICOM prescribes when laterality is unknown.
BODY_PARTS = frozenset({"CHEST", "ABDOMEN", "PELVIS", "ABDOMENPELVIS", "CHESTABDOMEN", "CHESTABDPELVIS", "NECKCHEST",
                        "NECKCHESTABDOMEN", "NECKCHESTABDPELV", "HEADNECK", "WHOLEBODY", "SPINE", "CSPINE", "TSPINE",
                        "LSPINE", "CTSPINE", "TLSPINE", "LSSPINE", "HEART", "NECK"})
STATUS_MARK = {LevelStatus.COMPLETE: "ok", LevelStatus.PARTIAL: "PARTIAL", LevelStatus.ABSENT: "ABSENT"}
TOTAL_MARK = {LevelStatus.COMPLETE: "ok", LevelStatus.PARTIAL: "INCOMPLETE", LevelStatus.ABSENT: "ABSENT"}


def render_key_image(ct: CTVolume, segments: SegmentMap, result: MeasurementResult, options: EncodeOptions) -> np.ndarray:
    """RGB uint8 [rows, columns, 3], muscle coloured as the SEG draws it."""
    figure = Figure(figsize=(WIDTH_PX / DPI, HEIGHT_PX / DPI), dpi=DPI, facecolor="black")
    canvas = FigureCanvasAgg(figure)
    levels = _level_of_voxel(segments)
    trends = trend_series(result)
    panel = TREND_PANEL if trends else PANEL
    if not _draw_coronal(figure, ct, levels, segments.levels, panel):
        _draw_axial(figure, ct, levels, segments.levels, panel)
    _draw_trends(figure, trends)
    _draw_table(figure.add_axes((0.49, 0.04, 0.50, 0.86)), result, options)
    figure.text(0.5, 0.965, DERIVED_BANNER, color="yellow", ha="center", va="center", fontsize=16, weight="bold")
    spans = " and ".join(total.span.name for total in result.totals)
    figure.text(0.5, 0.925, f"Paraspinal muscle {spans}  |  " + ", ".join(software_versions(result.software)),
                color="white", ha="center", va="center", fontsize=10)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def _level_of_voxel(segments: SegmentMap) -> np.ndarray:
    """i on the muscle of segments.levels[i - 1] (the SEG's owner of a shared slice), 0 elsewhere."""
    muscle = 2 * len(segments.levels)
    level_of_segment = np.zeros(256, dtype=np.uint8)
    level_of_segment[1 : muscle + 1] = (np.arange(muscle) // 2) + 1
    return level_of_segment[segments.numbers]


def _colours(levels: tuple[str, ...]) -> np.ndarray:
    colours = np.zeros((len(levels) + 1, 4))
    for i, level in enumerate(levels, start=1):
        colours[i] = (*(v / 255 for v in codes.LEVEL_RGB[level]), 0.55)
    return colours


def _picture_axes(figure: Figure, width_mm: float, height_mm: float, min_height: float = MIN_CORONAL_HEIGHT,
                  panel: tuple[float, float, float, float] = PANEL):
    """Axes of the picture's true aspect, as large as the panel allows, right of the label strip, top-aligned.

    None when the picture would be lower than `min_height` of the panel.
    """
    left, bottom, width, height = (panel[0] * WIDTH_PX, panel[1] * HEIGHT_PX, panel[2] * WIDTH_PX, panel[3] * HEIGHT_PX)
    scale = min((width - LABEL_STRIP_PX) / width_mm, height / height_mm)
    w_px, h_px = width_mm * scale, height_mm * scale
    if h_px < min_height * height:
        return None
    rect = ((left + LABEL_STRIP_PX) / WIDTH_PX, (bottom + height - h_px) / HEIGHT_PX, w_px / WIDTH_PX, h_px / HEIGHT_PX)
    return figure.add_axes(rect)


def _coronal_axes(ct: CTVolume) -> tuple[int, int]:
    """Array axes (1 = rows, 2 = columns) closest to patient left-right and anterior-posterior."""
    lr = 1 + int(np.argmax(np.abs([ct.direction[0, 1], ct.direction[0, 0]])))
    return lr, 3 - lr


def _draw_coronal(figure: Figure, ct: CTVolume, level_of_voxel: np.ndarray, names: tuple[str, ...],
                  panel: tuple[float, float, float, float]) -> bool:
    lr, ap = _coronal_axes(ct)
    spacing_lr = ct.spacing[1] if lr == 1 else ct.spacing[2]
    axes = _picture_axes(figure, ct.shape[lr] * spacing_lr, ct.shape[0] * ct.spacing[0], panel=panel)
    if axes is None:
        return False
    depth = _muscle_depth(level_of_voxel.max(axis=0), ap)
    plane = np.take(ct.hu, depth, axis=ap).astype(np.float32)  # [k, lr]
    projected = level_of_voxel.max(axis=ap)  # the level seen along anterior-posterior
    plane, projected = _orient(ct, plane, lr), _orient(ct, projected, lr)
    axes.imshow(plane, cmap="gray", vmin=WINDOW_HU[0], vmax=WINDOW_HU[1], aspect="auto", interpolation="bilinear")
    axes.imshow(_colours(names)[projected], aspect="auto", interpolation="nearest")
    _mark_sides(axes)
    _label_levels(figure, axes, projected, names)
    return True


def _draw_axial(figure: Figure, ct: CTVolume, level_of_voxel: np.ndarray, names: tuple[str, ...],
                panel: tuple[float, float, float, float]) -> None:
    """One axial slice, patient right on the viewer's left and anterior up, through the measured muscle."""
    with_muscle = np.flatnonzero(level_of_voxel.any(axis=(1, 2)))
    k = int(with_muscle[len(with_muscle) // 2]) if with_muscle.size else ct.shape[0] // 2
    plane, levels = _axial(ct, ct.hu[k].astype(np.float32)), _axial(ct, level_of_voxel[k])
    transposed = abs(ct.direction[0, 1]) > abs(ct.direction[0, 0])
    row_mm, col_mm = (ct.spacing[2], ct.spacing[1]) if transposed else (ct.spacing[1], ct.spacing[2])
    axes = _picture_axes(figure, plane.shape[1] * col_mm, plane.shape[0] * row_mm, min_height=0.0, panel=panel)
    axes.imshow(plane, cmap="gray", vmin=WINDOW_HU[0], vmax=WINDOW_HU[1], aspect="auto", interpolation="bilinear")
    axes.imshow(_colours(names)[levels], aspect="auto", interpolation="nearest")
    _mark_sides(axes)
    shown = [names[i - 1] for i in np.unique(levels) if i > 0]
    caption = f"Axial slice {k + 1} of {ct.shape[0]}" + (f": {', '.join(shown)}" if shown else ": no muscle measured")
    axes.text(0.5, -0.02, caption, color="white", transform=axes.transAxes, ha="center", va="top", fontsize=11)


def _axial(ct: CTVolume, plane: np.ndarray) -> np.ndarray:
    """A [r, c] slice with columns running to patient left and rows to posterior."""
    if abs(ct.direction[0, 1]) > abs(ct.direction[0, 0]):  # rows run left-right: transpose
        plane, x_sign, y_sign = plane.T, ct.direction[0, 1], ct.direction[1, 0]
    else:
        x_sign, y_sign = ct.direction[0, 0], ct.direction[1, 1]
    if x_sign < 0:
        plane = plane[:, ::-1]
    if y_sign < 0:
        plane = plane[::-1]
    return plane


def _mark_sides(axes) -> None:
    axes.set_axis_off()
    axes.text(0.01, 0.99, "R", color="white", transform=axes.transAxes, va="top", fontsize=12)
    axes.text(0.99, 0.99, "L", color="white", transform=axes.transAxes, va="top", ha="right", fontsize=12)


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


def _label_levels(figure: Figure, axes, projected: np.ndarray, names: tuple[str, ...]) -> None:
    """Level names in the strip left of the picture, at each coloured band's vertical centre."""
    left, bottom, _, height = axes.get_position().bounds
    n_rows = projected.shape[0]
    for i, level in enumerate(names, start=1):
        rows = np.flatnonzero((projected == i).any(axis=1))
        if rows.size == 0:
            continue
        y = bottom + height * (1 - (float(rows.mean()) + 0.5) / n_rows)
        figure.text(left - 4 / WIDTH_PX, y, level, color=np.array(codes.LEVEL_RGB[level]) / 255, ha="right",
                    va="center", fontsize=10, weight="bold")


@dataclass(frozen=True)
class Trend:
    """One quantity over time: (date, value, comparable with now) for each earlier result, then now."""

    title: str
    points: tuple[tuple[date, float, bool], ...]
    note: str


def trend_series(result: MeasurementResult) -> list[Trend]:
    """T1-T10 muscle median HU and the bone-flag vertebra's HU over the same patient's results."""
    longitudinal = result.longitudinal
    now = parse_da(result.acquisition.study_date) if result.acquisition else None
    if longitudinal is None or now is None:
        return []
    earlier = [p for p in longitudinal.priors if not p.identity and (p.interval_days or 0) > 0]
    level = str(result.method.parameters.get("bone_flag_level", ""))
    current = snapshot_values(result)
    trends = []
    for title, key in ((f"{THORACIC_SPAN.name} muscle median HU", QuantityKey(THORACIC_SPAN.name, "combined",
                                                                                 Quantity.MUSCLE_MEDIAN_HU)),
                       (f"{level} trabecular median HU", QuantityKey(level, "", Quantity.BONE_MEDIAN_HU))):
        points = [(p.snapshot.study_day, p.snapshot.values[key], p.comparable) for p in reversed(earlier)
                  if key in p.snapshot.values and p.snapshot.study_day is not None]
        if points and key in current:
            reasons = sorted({reason.split(":")[0] for p in earlier for reason in p.reasons})
            note = "hollow: not comparable (" + ", ".join(reasons) + ")" if reasons else "all comparable"
            trends.append(Trend(title, (*points, (now, current[key], True)), note))
    return trends


def _draw_trends(figure: Figure, trends: list[Trend]) -> None:
    """Small plots under the picture; a prior not comparable with now is drawn hollow."""
    for i, trend in enumerate(trends):
        axes = figure.add_axes((0.05 + 0.235 * i, 0.08, 0.19, TREND_HEIGHT), facecolor="black")
        days = [point[0] for point in trend.points]
        values = [point[1] for point in trend.points]
        axes.plot(days, values, color="#888888", linewidth=1)
        for day, value, comparable in trend.points:
            axes.plot([day], [value], "o", markersize=6, color="white", markerfacecolor="white" if comparable else "none")
        axes.set_title(trend.title, color="white", fontsize=9)
        axes.tick_params(colors="white", labelsize=7)
        axes.xaxis.set_major_locator(YearLocator())
        axes.xaxis.set_major_formatter(DateFormatter("%Y"))
        for spine in axes.spines.values():
            spine.set_color("#555555")
        axes.text(0.5, -0.22, trend.note, color="orange" if "not" in trend.note else "#aaaaaa", fontsize=7,
                  ha="center", va="top", transform=axes.transAxes)


def snapshot_values(result: MeasurementResult) -> dict[QuantityKey, float]:
    return dict(snapshot_from_result(result.to_dict(), Origin.CURRENT).values)


def dark_table(axes, header: list[str], rows: list[list[str]], widths: list[float], fontsize: int,
               levels: list[str], bold: Callable[[int], bool]):
    """The key image's table, white on black: the header and the `bold` rows in bold, the first len(levels)
    rows' names in their SEG colours (CT and MR tables alike)."""
    table = axes.table(cellText=rows, colLabels=header, loc="upper center", cellLoc="center", colWidths=widths)
    table.auto_set_font_size(False)
    table.set_fontsize(fontsize)
    table.scale(1.0, 1.6)
    for (row, column), cell in table.get_celld().items():
        cell.set_facecolor("black")
        cell.set_edgecolor("#555555")
        cell.get_text().set_color("white")
        if row == 0 or bold(row):
            cell.get_text().set_weight("bold")
        if column == 0 and 0 < row <= len(levels):
            cell.get_text().set_color(np.array(codes.LEVEL_RGB[levels[row - 1]]) / 255)
    return table


def _draw_table(axes, result: MeasurementResult, options: EncodeOptions) -> None:
    axes.set_axis_off()
    header = ["Level", "Volume (cm³)", "Median HU", "HU left / right", "Status", "Bone HU"]
    levels = result.levels
    bone = {vertebra.level: _bone_cell(vertebra) for vertebra in result.vertebrae}
    rows = [[*_level_row(level), bone.pop(level.level, "-")] for level in levels]
    rows += [[*_total_row(result, total), ""] for total in result.totals]
    rows += [[level, "", "", "", "", cell] for level, cell in bone.items()]
    incomplete = {len(levels) + 1 + i for i, total in enumerate(result.totals)
                  if span_coverage(result, total.span).status is not LevelStatus.COMPLETE}
    table = dark_table(axes, header, rows, [0.1, 0.18, 0.16, 0.22, 0.16, 0.18], 11, [level.level for level in levels],
                       lambda row: len(levels) < row <= len(levels) + len(result.totals))
    for row in incomplete:
        table[row, 4].get_text().set_color("orange")
        table[row, 4].get_text().set_fontsize(8)  # "INCOMPLETE" fits the status column
    _draw_flag(axes, result, options)
    _draw_biomarkers(axes, result)


def _total_row(result: MeasurementResult, total: SpanTotal) -> list[str]:
    status = span_coverage(result, total.span).status
    sides = total.sides
    return _row(total.span.name, sides.combined, sides.left, sides.right, status, TOTAL_MARK[status])


def _bone_cell(vertebra: VertebraResult) -> str:
    """Trabecular median; "*" marks a partial vertebra, "(whole)" a mask without vertebral bodies."""
    if vertebra.status is LevelStatus.ABSENT:
        return "-"
    mark = "*" if vertebra.status is LevelStatus.PARTIAL else ""
    return _hu(vertebra.trabecular.median_hu) + mark + ("" if vertebra.mask == BODY_MASK else " (whole)")


def _draw_biomarkers(axes, result: MeasurementResult) -> None:
    """The bone flag and the liver line, above the muscle flag; "not assessed" says why in short."""
    lines = []
    if any(vertebra.status is LevelStatus.PARTIAL for vertebra in result.vertebrae):
        lines.append(("Bone HU: * vertebra cut by the field of view", "#aaaaaa"))
    if result.bone_flag is not None:
        lines.append(_flag_line("Bone", result.bone_flag))
    if result.liver is not None:
        liver = result.liver
        cut = " (partial: cut by the field of view)" if liver.status is LevelStatus.PARTIAL else ""
        text = (f"Liver {_hu(liver.parenchyma.median_hu)} HU, spleen {_hu(liver.spleen.parenchyma.median_hu)} HU, "
                f"liver - spleen {_hu(liver.liver_minus_spleen_hu)} HU{cut}")
        lines += [(text, "white"), _flag_line("Liver", liver.flag)]
    for i, (text, colour) in enumerate(lines):
        axes.text(0.5, 0.34 - 0.05 * i, text, color=colour, ha="center", va="center", fontsize=10,
                  weight="bold" if colour == "red" else "normal", transform=axes.transAxes)


def _flag_line(name: str, flag: Flag) -> tuple[str, str]:
    if flag.state is FlagState.LOW:
        return f"LOW {name.upper()} ATTENUATION: {_hu(flag.value_hu)} HU (flag: {flag.rule})", "red"
    if flag.state is FlagState.NOT_LOW:
        return f"{name}: {_hu(flag.value_hu)} HU, not low (flag: {flag.rule})", "white"
    return f"{name} flag not assessed: {(flag.reason or '').split(':')[0].split(' (')[0]}", "orange"


def _level_row(level: LevelResult) -> list[str]:
    return _row(level.level, level.combined, level.left, level.right, level.status, STATUS_MARK[level.status])


def _row(name: str, combined: MuscleStats, left: MuscleStats, right: MuscleStats, status: LevelStatus, mark: str) -> list[str]:
    """An absent row shows dashes: nothing was measured, which is not 0 cm³."""
    volume = "-" if status is LevelStatus.ABSENT else f"{combined.volume_cm3:.1f}"
    return [name, volume, _hu(combined.median_hu), f"{_hu(left.median_hu)} / {_hu(right.median_hu)}", mark]


def _hu(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def screening_flag(result: MeasurementResult, threshold_hu: float) -> bool:
    """Raised when the T1-T10 median attenuation is below the configured threshold."""
    total = result.total
    return bool(low_attenuation(None if total is None else total.combined.median_hu, threshold_hu))


def _draw_flag(axes, result: MeasurementResult, options: EncodeOptions) -> None:
    """The first span's median under the table: the T1-T10 screening flag, or a span's median where no threshold exists."""
    total = result.totals[0]
    name, totals = total.span.name, span_coverage(result, total.span)
    median, threshold = total.sides.combined.median_hu, options.low_attenuation_hu
    incomplete = totals.status is not LevelStatus.COMPLETE
    mark = " - INCOMPLETE" if incomplete else ""
    if median is None:
        text, colour = f"No {name} muscle measured: no screening result", "orange"
    elif total.span != THORACIC_SPAN:
        text, colour = f"{name} median {median:.0f} HU (no screening threshold){mark}", "orange" if incomplete else "white"
    elif screening_flag(result, threshold):
        text, colour = f"LOW MUSCLE ATTENUATION: T1-T10 median {median:.0f} HU < {threshold:g} HU{mark}", "red"
    else:
        text, colour = f"T1-T10 median {median:.0f} HU (flag below {threshold:g} HU){mark}", "orange" if incomplete else "white"
    axes.text(0.5, 0.08, text, color=colour, ha="center", va="center", fontsize=12, weight="bold",
              transform=axes.transAxes, bbox={"facecolor": "black", "edgecolor": colour, "pad": 6})
    if incomplete and totals.included:
        axes.text(0.5, 0.015, _coverage_note(name, totals), color="orange", ha="center", va="center", fontsize=10,
                  transform=axes.transAxes)


def _coverage_note(name: str, totals: Coverage) -> str:
    """'T1-T10 totals cover T4-T10 only (T1, T2, T3 absent)', or name the partial levels they include."""
    if totals.missing:
        return f"{name} totals cover {totals.describe()} only"
    return f"{name} totals include partial {'level' if len(totals.partial) == 1 else 'levels'} {', '.join(totals.partial)}"


def build_key_image(ct: CTVolume, segments: SegmentMap, result: MeasurementResult, options: EncodeOptions) -> hd.sc.SCImage:
    return key_image_object(ct, render_key_image(ct, segments, result, options), result.software, options,
                            "Rendered summary of the paraspinal muscle measurement")


def key_image_object(ct: CTVolume, pixels: np.ndarray, software: Software, options: EncodeOptions,
                     derivation: str) -> hd.sc.SCImage:
    """The Secondary Capture around a rendered RGB picture, in the source's study, referencing its images."""
    sources = source_images(ct)
    settings = options.results
    image = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=sources[0],
        pixel_array=pixels,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=hd.UID(),
        series_number=settings.key_image_series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        patient_orientation=("L", "F"),
        series_description=settings.key_image_series_description,
        institution_name=options.institution_name,
        software_versions=software_versions(software),
        specific_character_set=character_set(sources[0], options.texts()),
    )
    copy_patient_and_study(ct.datasets[0], image)
    image.BurnedInAnnotation = "YES"
    body_part = str(ct.datasets[0].get("BodyPartExamined", "")).upper()
    if body_part in BODY_PARTS:
        image.BodyPartExamined = body_part
    else:
        if "BodyPartExamined" in image:  # highdicom copies it from the reference
            del image.BodyPartExamined
        image.Laterality = ""
    modality = str(ct.datasets[0].get("Modality", "CT"))
    image.ImageComments = f"Derived by paraspinal-node from the {modality} series; not for diagnosis"
    image.DerivationDescription = derivation
    image.SourceImageSequence = [_reference(ds) for ds in sources]
    return image


def _reference(source: Dataset) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    return item
