"""Synthetic thoracic and abdominal CT phantoms with known truth, for voxel-exact tests of the measurement.

Real CTs have no ground truth, so this phantom is built such that each trap of the published
seed method changes the numbers when it is handled wrongly:

- endplates (first and last slice of each body) are all above 700 HU, and trabecular bone holds
  some 0/1/700/701 HU voxels, so dropping or shifting the 1..700 HU window moves the slab;
- spinous processes slope caudally into the next level's body z-range, so using the whole
  vertebra instead of `vertebrae_body` makes slabs overlap;
- each vertebra label bleeds up to 1.5 mm into the adjacent discs, which are label 2 of the
  `vertebrae_body` mask, so treating "body > 0" as body grows the slab;
- left and right muscles differ in size and fat fraction, and fat fraction changes from level
  to level non-monotonically, so left/right swaps, flips and level shifts all show;
- trabecular attenuation is shifted per level (T1..T12, L1) by a non-monotonic design, so a level
  mix-up in the bone numbers shows; L1 is cut by the bottom of the field of view;
- the abdominal phantom (``make_phantom(region="abdomen")``) holds the lower 10 mm of T10, then
  T11..L4 and the upper 16 mm of L5 (cut by the field of view), no lungs, and its own designed
  fat fraction per level T10..L5;
- a liver, cut by the bottom of the field of view, has hypodense vessels and a cyst inside and a
  1.5 mm rim of its label in the surrounding fat, so that skipping the erosion or the parenchyma
  window moves its median by more than 1.5 HU; a spleen lies wholly inside the field of view.
  Liver, spleen and the bone shift draw from their own random stream, so the muscle voxels (and
  every muscle truth) are those of the phantom without them.

Canonical grid: arrays are indexed [k, r, c]; voxel (k, r, c) lies at patient LPS position
``origin + (c*dc, r*dr, k*dk)``: columns run to the patient's left, rows to posterior and
slices upward (k = 0 is the most inferior slice). Every writer permutes these same voxels, so
the truth is identical, voxel for voxel, in every geometry.

API (tests import it as ``import phantom``; pytest puts tests/ on sys.path, benches add it):

- ``make_phantom(spacing=..., shape=..., seed=...) -> Phantom``; ``Phantom.crop(...)`` and
  ``Phantom.truncated_through("T1")`` give cut fields of view.
- ``truth(phantom, body_source=...)`` gives the seed method's result shaped like the
  "levels"/"total" part of measurements.json; ``mismatches(result, expected)`` compares them;
  ``bone_truth(phantom)`` and ``vertebra_mismatches`` do the same for "vertebrae";
  ``liver_truth(phantom)`` gives the designed liver and spleen parenchyma;
  ``mirror_slabs(expected, n_slices)`` renumbers slabs for a volume whose slice 0 is the top
  (a loader sorting along the slice normal does that when ``layout.normal_z < 0``).
- ``write_dicom_series(phantom, folder, layout=LAYOUTS["axial"], ...) -> DicomSeries``.
- ``write_masks(phantom, folder, form="folder"|"multilabel", orientation="RAS", ...)`` and
  ``write_nifti_ct(phantom, path, orientation="RAS")``: TotalSegmentator-style NIfTI files.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import nibabel as nib
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from node.labels import (
    AUTOCHTHON_LEFT,
    AUTOCHTHON_RIGHT,
    LIVER,
    LUMBAR,
    MEASURED_LEVELS,
    SPINE,
    SPINE_LEVELS,
    SPLEEN,
    THORACIC,
    VERTEBRA_LABEL,
)

BODY = 1
DISC = 2
FAT_BELOW_HU = -29
LEAN_RANGE_HU = (-29, 150)
BODY_WINDOW_HU = (1, 700)
SIDES = ("left", "right")
SIDE_LABEL = {"left": AUTOCHTHON_LEFT, "right": AUTOCHTHON_RIGHT}

# Designed share of muscle voxels below -29 HU on each level's slab; non-monotonic on purpose.
_FAT_LEFT = (0.04, 0.06, 0.05, 0.09, 0.12, 0.10, 0.15, 0.18, 0.22, 0.25, 0.28, 0.30)
DESIGNED_FAT_FRACTION: dict[str, dict[str, float]] = {
    level: {"left": left, "right": round(left + 0.03, 2)} for level, left in zip(THORACIC, _FAT_LEFT)
}
# The abdominal phantom's own design, T10..L5: fattier caudally, as lumbar multifidus is, and non-monotonic.
_FAT_LEFT_ABDOMEN = (0.08, 0.12, 0.09, 0.16, 0.13, 0.21, 0.19, 0.27)
ABDOMEN_FAT_FRACTION: dict[str, dict[str, float]] = {
    level: {"left": left, "right": round(left + 0.04, 2)} for level, left in zip(("T10", "T11", "T12", *LUMBAR), _FAT_LEFT_ABDOMEN)
}

DEFAULT_SPACING = (2.5, 0.9, 0.9)  # (dk, dr, dc) mm
_FOV_XY_MM = 115.2  # in-plane field of view the anatomy is designed for, centred on the spine
_FOV_CENTRE_Y = 2.0
_ORIGIN_Z = -350.25

# Inclusive HU ranges of the tissues.
_AIR = -1000
_SUBCUT_FAT = (-120, -80)
_SOFT = (30, 50)
_LUNG = (-870, -830)
_CANAL = (5, 25)
_DISC = (70, 90)
_TRABECULAR = (150, 300)
# Added to every trabecular value (not the window-edge ones) per level; distinct and non-monotonic.
TRABECULAR_SHIFT_HU: dict[str, int] = dict(zip(
    SPINE, (30, 15, 40, 5, 20, -5, 10, -20, -10, -35, -25, -45, -60, -50, -70, -55, -80)))
_TRABECULAR_ODD = (0, 1, 700, 701, -15, 730)  # edges of the 1..700 window
_CORTICAL = (750, 1200)
_ARCH = (400, 900)
_SPINOUS = (300, 650)
_LEAN = (30, 60)
_LEAN_ODD = ((-29, 0.01), (150, 0.005), (151, 0.005))  # edges of the lean window
_FAT = (-130, -30)
_LIVER = (50, 64)  # parenchyma, unenhanced
_LIVER_VESSEL = (18, 30)  # unenhanced blood is hypodense to normal liver
_LIVER_CYST = (0, 12)
_SPLEEN = (40, 52)
_ORGAN_FAT = (-120, -80)
# `Phantom.organs` codes: what each voxel is by design (the labels hold what a segmenter sees).
LIVER_PARENCHYMA, LIVER_VESSEL, LIVER_CYST, SPLEEN_PARENCHYMA = 1, 2, 3, 4
_LIVER_CENTRE, _LIVER_RADII = (-29.0, -18.0), (10.0, 11.0)
_SPLEEN_CENTRE, _SPLEEN_RADII = (33.0, -3.0), (9.0, 8.0)
_VESSELS = ((-31.0, -15.0), (-26.0, -21.0), (-31.5, -22.0))  # tubes along z, radius 2 mm
_LABEL_BLEED_MM = 1.5  # organ labels reach this far into the surrounding fat


@dataclass(frozen=True)
class _Level:
    """One vertebra of the design, in depth mm below the top of the anatomy."""

    name: str
    top: float
    bottom: float
    rx: float
    ry: float
    next_centre: float

    @property
    def centre(self) -> float:
        return (self.top + self.bottom) / 2

    @property
    def cy(self) -> float:
        return -(7.0 + self.ry)

    @property
    def label(self) -> int:
        return VERTEBRA_LABEL.get(self.name, 0)


REGIONS: dict[str, tuple[str, ...]] = {"chest": ("C7", *THORACIC, "L1"), "abdomen": ("T10", "T11", "T12", *LUMBAR)}


def _design(region: str = "chest") -> tuple[list[_Level], float]:
    """Chest: C7 (lower 10 mm), T1..T12 and L1 (upper 16 mm); abdomen: T10 (lower 10 mm), T11..L4
    and L5 (upper 16 mm); with discs. Each vertebra has the size it has in the whole spine's design.
    Returns levels and length."""
    names = list(REGIONS[region])
    first = ("C7", *SPINE).index(names[0]) - 1
    tops, heights = [], []
    depth = 10.0 - (13.0 + 0.55 * (first + 1))
    for i in range(first, first + len(names)):
        tops.append(depth)
        heights.append(15.5 + 0.55 * i)
        depth += heights[-1] + 4.0 + 0.1 * i
    centres = [top + height / 2 for top, height in zip(tops, heights)]
    next_centres = centres[1:] + [centres[-1] + 22.0]
    levels = [_Level(name, top, top + height, 11.0 + 0.45 * i, 9.0 + 0.35 * i, after)
              for i, (name, top, height, after) in enumerate(zip(names, tops, heights, next_centres), start=first)]
    return levels, levels[-1].top + 16.0


@dataclass(frozen=True)
class Phantom:
    """Canonical CT and masks; see the module docstring for the grid convention."""

    hu: np.ndarray  # int16 [k, r, c]
    labels: np.ndarray  # uint8, TotalSegmentator `total` numbers: vertebrae T1..T12, autochthon
    body: np.ndarray  # uint8, `vertebrae_body` task: 1 vertebral body, 2 intervertebral disc
    spacing: tuple[float, float, float]  # (dk, dr, dc) mm
    origin: tuple[float, float, float]  # LPS (x, y, z) of voxel [0, 0, 0]
    seed: int = 0
    study_uid: str = ""
    patient_id: str = "PHANTOM-0"
    fat_fraction: dict[str, dict[str, float]] = field(default_factory=lambda: DESIGNED_FAT_FRACTION)
    organs: np.ndarray | None = None  # uint8 design codes LIVER_PARENCHYMA..SPLEEN_PARENCHYMA, 0 elsewhere
    region: str = "chest"

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.hu.shape)  # type: ignore[return-value]

    @property
    def voxel_volume_mm3(self) -> float:
        return float(np.prod(self.spacing))

    def position(self, k: np.ndarray | float, r: np.ndarray | float, c: np.ndarray | float) -> np.ndarray:
        """LPS mm of canonical voxel indices (broadcast; last axis is x, y, z)."""
        dk, dr, dc = self.spacing
        ox, oy, oz = self.origin
        return np.stack(np.broadcast_arrays(ox + np.asarray(c) * dc, oy + np.asarray(r) * dr,
                                            oz + np.asarray(k) * dk), axis=-1)

    def crop(self, k: slice = slice(None), r: slice = slice(None), c: slice = slice(None)) -> Phantom:
        """A smaller field of view of the same patient (same physical positions)."""
        if any(s.step not in (None, 1) for s in (k, r, c)):
            raise ValueError("Phantom.crop takes contiguous slices (step 1); resampling would change the truth")
        k0, r0, c0 = (s.indices(n)[0] for s, n in zip((k, r, c), self.shape))
        origin = tuple(float(v) for v in np.round(self.position(k0, r0, c0), 6))
        return replace(self, hu=self.hu[k, r, c].copy(), labels=self.labels[k, r, c].copy(),
                       body=self.body[k, r, c].copy(), origin=origin,  # type: ignore[arg-type]
                       organs=None if self.organs is None else self.organs[k, r, c].copy())

    def truncated_through(self, level: str = "T1") -> Phantom:
        """Field of view whose top slice cuts `level`'s vertebral body at its middle slice."""
        ks = np.nonzero(((self.body == BODY) & (self.labels == VERTEBRA_LABEL[level])).any(axis=(1, 2)))[0]
        middle = int(ks[len(ks) // 2])
        return self.crop(k=slice(0, middle + 1))


# ---------------------------------------------------------------- generation


def make_phantom(spacing: Sequence[float] | None = None, shape: Sequence[int] | None = None,
                 seed: int = 0, region: str = "chest") -> Phantom:
    """Build the phantom of `region` ("chest" or "abdomen", see REGIONS).

    Give `spacing` (dk, dr, dc) and the shape follows from the anatomy (default 2.5/0.9/0.9 mm,
    about 124x128x128); give `shape` alone and the spacing is chosen to fit (e.g. (400, 512, 512)
    for benches); give both and the anatomy is centred in that field, which must hold it.
    """
    levels, length = _design(region)
    extent = (length, _FOV_XY_MM, _FOV_XY_MM)
    if shape is None:
        spacing = tuple(spacing or DEFAULT_SPACING)
        shape = tuple(max(1, math.ceil(round(e / s, 6))) for e, s in zip(extent, spacing))
    elif spacing is None:
        spacing = tuple(e / n for e, n in zip(extent, shape))
    spacing = tuple(float(s) for s in spacing)
    shape = tuple(int(n) for n in shape)
    if any(n * s < e - 1e-6 for n, s, e in zip(shape, spacing, extent)):
        raise ValueError(f"field {shape} x {spacing} mm is smaller than the phantom's anatomy "
                         f"{tuple(round(e, 1) for e in extent)} mm; enlarge shape or spacing, "
                         "or crop the phantom afterwards with Phantom.crop")
    nk, nr, nc = shape
    dk, dr, dc = spacing
    origin = (round(-(nc - 1) * dc / 2, 4), round(_FOV_CENTRE_Y - (nr - 1) * dr / 2, 4), _ORIGIN_Z)
    depth = (nk - 1 - np.arange(nk)) * dk + dk / 2 - (nk * dk - length) / 2
    y_grid, x_grid = np.meshgrid(origin[1] + np.arange(nr) * dr, origin[0] + np.arange(nc) * dc, indexing="ij")
    painter = _Painter(x_grid, y_grid, levels, length, depth, np.random.default_rng(seed),
                       np.random.default_rng([seed, 104729]), region)
    hu = np.empty(shape, np.int16)
    labels = np.zeros(shape, np.uint8)
    body = np.zeros(shape, np.uint8)
    organs = np.zeros(shape, np.uint8)
    for k in range(nk):
        painter.paint(k, hu[k], labels[k], body[k], organs[k])
    painter.infiltrate_fat(hu, labels, body)
    entropy = ["paraspinal-node phantom study", str(seed)] + ([] if region == "chest" else [region])
    study_uid = str(generate_uid(entropy_srcs=entropy))
    fat = DESIGNED_FAT_FRACTION if region == "chest" else ABDOMEN_FAT_FRACTION
    return Phantom(hu=hu, labels=labels, body=body, spacing=spacing, origin=origin,  # type: ignore[arg-type]
                   seed=seed, study_uid=study_uid, patient_id=f"PHANTOM-{seed}", organs=organs, fat_fraction=fat,
                   region=region)


def _rim(mask: np.ndarray) -> np.ndarray:
    """Voxels of `mask` with a 4-neighbour outside it: the cortical shell in-plane."""
    inner = mask.copy()
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    inner[[0, -1], :] = False
    inner[:, [0, -1]] = False
    return mask & ~inner


class _Painter:
    """Paints slices on one in-plane grid (x, y in LPS mm per [r, c]); z-invariant masks are made once."""

    def __init__(self, x: np.ndarray, y: np.ndarray, levels: list[_Level], length: float,
                 depth: np.ndarray, rng: np.random.Generator, organ_rng: np.random.Generator, region: str) -> None:
        self.x, self.y, self.levels, self.length, self.depth, self.rng = x, y, levels, length, depth, rng
        self.with_lungs = region == "chest"
        self.fat = DESIGNED_FAT_FRACTION if region == "chest" else ABDOMEN_FAT_FRACTION
        self.organ_rng = organ_rng  # organs and bone shift: the main stream stays the muscle's
        by_name = {lv.name: lv for lv in levels}
        self.liver_top = by_name["T10"].top
        self.spleen_depths = (by_name["T10"].centre, by_name["T12"].bottom)
        self.cyst_depth = by_name["T11"].centre
        self.body_slices = {lv.name: np.nonzero((depth >= lv.top) & (depth < lv.bottom))[0] for lv in levels}
        torso = self.ellipse(0.0, _FOV_CENTRE_Y, 54.0, 53.0)
        self.inner = self.ellipse(0.0, _FOV_CENTRE_Y, 46.0, 45.0)
        self.subcutaneous = torso & ~self.inner
        lungs = self.ellipse(33.0, -14.0, 14.0, 24.0) | self.ellipse(-33.0, -14.0, 14.0, 24.0)
        self.lungs = lungs & self.ellipse(0.0, _FOV_CENTRE_Y, 44.0, 43.0)
        rho = np.hypot(x, y)
        self.canal = rho <= 6.0
        self.arch = (rho > 6.0) & (rho <= 9.5) & (y > -5.0)
        self.spine_column = (np.abs(x) <= 3.0) & (y > 9.5) & (y <= 39.0)

    def ellipse(self, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
        return ((self.x - cx) / rx) ** 2 + ((self.y - cy) / ry) ** 2 <= 1.0

    def fill(self, plane: np.ndarray, mask: np.ndarray, hu_range: tuple[int, int]) -> None:
        plane[mask] = self.rng.integers(hu_range[0], hu_range[1] + 1, size=int(mask.sum()))

    def muscles(self, depth: float) -> dict[str, np.ndarray]:
        """Left bigger than right, both growing caudally; they never touch bone or each other."""
        grow = 1.0 + 0.12 * min(max(depth / self.length, 0.0), 1.0)
        return {"left": self.ellipse(19.0, 24.0, 11.5 * grow, 12.5 * grow),
                "right": self.ellipse(-19.0, 24.0, 10.5 * grow, 12.0 * grow)}

    def paint(self, k: int, hu: np.ndarray, labels: np.ndarray, body: np.ndarray, organs: np.ndarray) -> None:
        """Soft tissues first, bone last, so later structures own their voxels."""
        depth = float(self.depth[k])
        hu[:] = _AIR
        self.fill(hu, self.subcutaneous, _SUBCUT_FAT)
        self.fill(hu, self.inner, _SOFT)
        if self.with_lungs and depth < self.levels[-2].centre:
            self.fill(hu, self.lungs, _LUNG)
        self.paint_liver(depth, hu, labels, organs)
        self.paint_spleen(depth, hu, labels, organs)
        for side, mask in self.muscles(depth).items():
            self.fill_lean(hu, mask)
            labels[mask] = SIDE_LABEL[side]
        self.fill(hu, self.canal, _CANAL)
        for upper, lower in zip(self.levels, self.levels[1:] + [None]):
            if upper.top <= depth < upper.bottom:
                self.paint_body(k, hu, labels, body, upper)
            elif lower is not None and upper.bottom <= depth < lower.top:
                self.paint_disc(depth, hu, labels, body, upper, lower)
            if upper.centre - 5.5 <= depth <= upper.next_centre + 3.5:
                self.paint_spinous(depth, hu, labels, upper)

    def organ_fill(self, hu: np.ndarray, mask: np.ndarray, hu_range: tuple[int, int]) -> None:
        hu[mask] = self.organ_rng.integers(hu_range[0], hu_range[1] + 1, size=int(mask.sum()))

    def paint_organ(self, hu: np.ndarray, labels: np.ndarray, organs: np.ndarray, centre: tuple[float, float],
                    radii: tuple[float, float], label: int, code: int, hu_range: tuple[int, int]) -> np.ndarray:
        """Fat around the organ, its label bleeding 1.5 mm into that fat; returns the organ's own voxels."""
        (cx, cy), (rx, ry) = centre, radii
        self.organ_fill(hu, self.ellipse(cx, cy, rx + 3.0, ry + 3.0), _ORGAN_FAT)
        labels[self.ellipse(cx, cy, rx + _LABEL_BLEED_MM, ry + _LABEL_BLEED_MM)] = label
        inside = self.ellipse(cx, cy, rx, ry)
        self.organ_fill(hu, inside, hu_range)
        organs[inside] = code
        return inside

    def paint_liver(self, depth: float, hu: np.ndarray, labels: np.ndarray, organs: np.ndarray) -> None:
        """From T10's top (a dome over its first 8 mm) down past the bottom of the field of view."""
        if depth < self.liver_top:
            return
        scale = math.sqrt(max(0.0, 1.0 - ((self.liver_top + 8.0 - depth) / 8.0) ** 2)) if depth < self.liver_top + 8.0 else 1.0
        if scale < 0.3:
            return
        radii = (_LIVER_RADII[0] * scale, _LIVER_RADII[1] * scale)
        inside = self.paint_organ(hu, labels, organs, _LIVER_CENTRE, radii, LIVER, LIVER_PARENCHYMA, _LIVER)
        vessels = inside & np.logical_or.reduce([self.ellipse(x, y, 2.0, 2.0) for x, y in _VESSELS])
        self.organ_fill(hu, vessels, _LIVER_VESSEL)
        organs[vessels] = LIVER_VESSEL
        cyst_r = math.sqrt(max(0.0, 3.5**2 - (depth - self.cyst_depth) ** 2))
        cyst = inside & self.ellipse(-25.0, -13.0, cyst_r, cyst_r) if cyst_r > 0 else np.zeros_like(inside)
        self.organ_fill(hu, cyst, _LIVER_CYST)
        organs[cyst] = LIVER_CYST

    def paint_spleen(self, depth: float, hu: np.ndarray, labels: np.ndarray, organs: np.ndarray) -> None:
        top, bottom = self.spleen_depths
        if top <= depth < bottom:
            self.paint_organ(hu, labels, organs, _SPLEEN_CENTRE, _SPLEEN_RADII, SPLEEN, SPLEEN_PARENCHYMA, _SPLEEN)

    def fill_lean(self, hu: np.ndarray, mask: np.ndarray) -> None:
        values = self.rng.integers(_LEAN[0], _LEAN[1] + 1, size=int(mask.sum()))
        draw = self.rng.random(values.size)
        edge = 0.0
        for value, share in _LEAN_ODD:
            values[(draw >= edge) & (draw < edge + share)] = value
            edge += share
        hu[mask] = values

    def paint_body(self, k: int, hu: np.ndarray, labels: np.ndarray, body: np.ndarray, lv: _Level) -> None:
        """Endplates (first/last slice of a body of >= 4 slices) are cortical throughout."""
        mask = self.ellipse(0.0, lv.cy, lv.rx, lv.ry)
        body[mask] = BODY
        labels[mask] = lv.label
        slices = self.body_slices[lv.name]
        cortical = mask if len(slices) >= 4 and k in (slices[0], slices[-1]) else _rim(mask)
        trabecular = mask & ~cortical
        self.fill(hu, cortical, _CORTICAL)
        values = self.rng.integers(_TRABECULAR[0], _TRABECULAR[1] + 1, size=int(trabecular.sum()))
        odd = self.rng.random(values.size) < 0.025
        values[~odd] += TRABECULAR_SHIFT_HU.get(lv.name, 0)
        values[odd] = self.rng.choice(_TRABECULAR_ODD, size=int(odd.sum()))
        hu[trabecular] = values
        self.fill(hu, self.arch, _ARCH)
        labels[self.arch] = lv.label

    def paint_disc(self, depth: float, hu: np.ndarray, labels: np.ndarray, body: np.ndarray,
                   upper: _Level, lower: _Level) -> None:
        """Vertebra labels bleed 1.5 mm into the disc, as real vertebra masks often do."""
        rx, ry = (upper.rx + lower.rx) / 2, (upper.ry + lower.ry) / 2
        mask = self.ellipse(0.0, -(7.0 + ry), rx, ry)
        body[mask] = DISC
        self.fill(hu, mask, _DISC)
        if depth < upper.bottom + 1.5:
            labels[mask] = upper.label
        elif depth >= lower.top - 1.5:
            labels[mask] = lower.label

    def paint_spinous(self, depth: float, hu: np.ndarray, labels: np.ndarray, lv: _Level) -> None:
        """From the arch (y 9.5 mm) back to y 39 mm, its tip at the next body's centre depth."""
        root = lv.centre - 2.0
        centre = root + (self.y - 9.5) / 29.5 * (lv.next_centre - root)
        mask = self.spine_column & (np.abs(depth - centre) <= 3.5)
        self.fill(hu, mask, _SPINOUS)
        labels[mask] = lv.label

    def infiltrate_fat(self, hu: np.ndarray, labels: np.ndarray, body: np.ndarray) -> None:
        """Exactly round(f * n) muscle voxels per side become fat on each slab; elsewhere per slice."""
        on_slab = np.zeros(hu.shape[0], bool)
        designed = [lv for lv in self.levels if lv.name in self.fat]
        for lv in designed:
            ks = self.body_slices[lv.name]
            window = (hu[ks] >= BODY_WINDOW_HU[0]) & (hu[ks] <= BODY_WINDOW_HU[1])
            found = ks[((body[ks] == BODY) & (labels[ks] == lv.label) & window).any(axis=(1, 2))]
            if found.size == 0:
                continue
            slab = slice(int(found[0]), int(found[-1]) + 1)
            on_slab[slab] = True
            for side in SIDES:
                self.make_fat(hu[slab], labels[slab] == SIDE_LABEL[side], self.fat[lv.name][side])
        centres = np.array([lv.centre for lv in designed])
        for k in np.nonzero(~on_slab)[0]:
            nearest = designed[int(np.argmin(np.abs(centres - self.depth[k])))].name
            for side in SIDES:
                self.make_fat(hu[k], labels[k] == SIDE_LABEL[side], self.fat[nearest][side])

    def make_fat(self, hu: np.ndarray, mask: np.ndarray, fraction: float) -> None:
        where = np.flatnonzero(mask)
        chosen = self.rng.permutation(where)[: round(fraction * where.size)]
        values = self.rng.integers(_FAT[0], _FAT[1] + 1, size=chosen.size)
        values[self.rng.random(chosen.size) < 0.03] = _FAT[1]
        hu.reshape(-1)[chosen] = values


# ---------------------------------------------------------------- truth (the oracle)


def truth(phantom: Phantom, body_source: str = "vertebrae_body",
          levels: Iterable[str] = MEASURED_LEVELS) -> dict:
    """The published seed method, computed naively on the canonical arrays.

    Deliberately simple (loops over slices, pure-Python statistics) so that it is obviously
    right. Slab indices are canonical (k = 0 most inferior); height_mm = slices x dk.
    SD is the population SD; percentiles interpolate linearly (numpy's default); the lean
    statistics use -29 <= HU <= 150; fat_fraction is the share below -29 HU.
    """
    if body_source not in ("vertebrae_body", "whole_vertebra"):
        raise ValueError(f"body_source {body_source!r} is not 'vertebrae_body' or 'whole_vertebra'")
    level_rows = []
    union: set[int] = set()
    for level in levels:
        slab = _slab_slices(phantom, level, body_source)
        union.update(slab)
        level_rows.append({"level": level, "status": _status(phantom, level, slab),
                           "slab": _slab_dict(phantom, slab), **_sides(phantom, sorted(slab))})
    return {"levels": level_rows, "total": _sides(phantom, sorted(union))}


def _slab_slices(phantom: Phantom, level: str, body_source: str) -> range:
    label = VERTEBRA_LABEL[level]
    lo, hi = BODY_WINDOW_HU
    found = []
    for k in range(phantom.shape[0]):
        is_body = phantom.body[k] == BODY if body_source == "vertebrae_body" else True
        hu = phantom.hu[k]
        if np.any(is_body & (phantom.labels[k] == label) & (hu >= lo) & (hu <= hi)):
            found.append(k)
    return range(min(found), max(found) + 1) if found else range(0)


def _slab_dict(phantom: Phantom, slab: range) -> dict | None:
    if not slab:
        return None
    return {"first_slice": slab.start, "last_slice": slab.stop - 1,
            "height_mm": len(slab) * phantom.spacing[0]}


def _status(phantom: Phantom, level: str, slab: range) -> str:
    """absent: no body voxels; partial: vertebra on the first/last slice or muscle on the border."""
    if not slab:
        return "absent"
    vertebra = phantom.labels == VERTEBRA_LABEL[level]
    if vertebra[0].any() or vertebra[-1].any():
        return "partial"
    for k in slab:
        muscle = np.isin(phantom.labels[k], list(SIDE_LABEL.values()))
        if muscle[0].any() or muscle[-1].any() or muscle[:, 0].any() or muscle[:, -1].any():
            return "partial"
    return "complete"


def _sides(phantom: Phantom, slices: Sequence[int]) -> dict:
    values: dict[str, list[int]] = {"left": [], "right": []}
    for k in slices:
        for side in SIDES:
            values[side].extend(phantom.hu[k][phantom.labels[k] == SIDE_LABEL[side]].tolist())
    mm3 = phantom.voxel_volume_mm3
    return {"left": _stats(values["left"], mm3, True), "right": _stats(values["right"], mm3, True),
            "combined": _stats(values["left"] + values["right"], mm3, True)}


def _stats(values: list[int], voxel_mm3: float, with_fat: bool) -> dict:
    ordered = sorted(values)
    n = len(ordered)
    out: dict = {"voxels": n, "volume_cm3": n * voxel_mm3 / 1000.0}
    if n == 0:
        out.update(dict.fromkeys(("median_hu", "mean_hu", "sd_hu", "p25_hu", "p75_hu"), None))
    else:
        mean = sum(ordered) / n
        out.update({"median_hu": _quantile(ordered, 0.5), "mean_hu": mean,
                    "sd_hu": math.sqrt(sum((v - mean) ** 2 for v in ordered) / n),
                    "p25_hu": _quantile(ordered, 0.25), "p75_hu": _quantile(ordered, 0.75)})
    if with_fat:
        out["fat_fraction"] = sum(1 for v in ordered if v < FAT_BELOW_HU) / n if n else None
        lo, hi = LEAN_RANGE_HU
        out["lean"] = _stats([v for v in ordered if lo <= v <= hi], voxel_mm3, False)
    return out


def _quantile(ordered: list[int], q: float) -> float:
    position = q * (len(ordered) - 1)
    below = math.floor(position)
    above = min(below + 1, len(ordered) - 1)
    return ordered[below] + (ordered[above] - ordered[below]) * (position - below)


def bone_truth(phantom: Phantom, body_source: str = "vertebrae_body") -> list[dict]:
    """The "vertebrae" list of measurements.json, naively: per level T1..T12, L1 (abdomen: T1..L5) the statistics of
    every voxel of vertebrae_body ∩ vertebra ∩ 1..700 HU (the whole vertebra without bodies).

    Status: absent without such voxels; partial when the vertebra is on the first or last slice.
    """
    lo, hi = BODY_WINDOW_HU
    rows = []
    for level in SPINE_LEVELS if phantom.region == "chest" else SPINE:
        if phantom.region != "chest" and level not in LUMBAR and not (phantom.labels == VERTEBRA_LABEL[level]).any():
            continue  # abdominal CT lists L1..L5 and any other vertebra present
        values: list[int] = []
        vertebra = phantom.labels == VERTEBRA_LABEL[level]
        for k in range(phantom.shape[0]):
            hu = phantom.hu[k]
            mask = vertebra[k] & (hu >= lo) & (hu <= hi)
            if body_source == "vertebrae_body":
                mask &= phantom.body[k] == BODY
            values.extend(hu[mask].tolist())
        status = "absent" if not values else "partial" if vertebra[0].any() or vertebra[-1].any() else "complete"
        rows.append({"level": level, "status": status,
                     "mask": "vertebral_body" if body_source == "vertebrae_body" else "whole_vertebra",
                     "trabecular": _stats(values, phantom.voxel_volume_mm3, False)})
    return rows


def vertebra_mismatches(result: dict, expected: list[dict], rel: float = 1e-6) -> list[str]:
    """Differences between measurements.json's "vertebrae" and `bone_truth()`, level by level."""
    found = {row["level"]: row for row in result.get("vertebrae", [])}
    problems = []
    for row in expected:
        got = found.get(row["level"])
        problems += [f"{row['level']}: missing from result"] if got is None else _diff(got, row, row["level"], rel)
    return problems


def liver_truth(phantom: Phantom) -> dict:
    """The designed organs, shaped like measurements.json's "liver".

    Parenchyma figures are over every voxel designed as liver (spleen) parenchyma, vessels and cyst
    excluded: what an ideal method reports, which a real one may approach but not hit exactly.
    Covered volumes and status are exact: the label voxels, and partial when a label touches a face.
    """
    if phantom.organs is None:
        raise ValueError("this phantom has no organ design")
    out: dict = {}
    for name, label, code in (("liver", LIVER, LIVER_PARENCHYMA), ("spleen", SPLEEN, SPLEEN_PARENCHYMA)):
        mask = phantom.labels == label
        faces = [mask[0], mask[-1], mask[:, 0], mask[:, -1], mask[:, :, 0], mask[:, :, -1]]
        values = sorted(phantom.hu[phantom.organs == code].tolist())
        status = "absent" if not mask.any() else "partial" if any(face.any() for face in faces) else "complete"
        out[name] = {"status": status, "covered_volume_cm3": int(mask.sum()) * phantom.voxel_volume_mm3 / 1000.0,
                     "parenchyma": {"median_hu": _quantile(values, 0.5) if values else None,
                                    "mean_hu": sum(values) / len(values) if values else None}}
    liver, spleen = out["liver"], out.pop("spleen")
    liver["spleen"] = spleen
    medians = liver["parenchyma"]["median_hu"], spleen["parenchyma"]["median_hu"]
    liver["liver_minus_spleen_hu"] = None if None in medians else medians[0] - medians[1]
    return liver


def mirror_slabs(expected: dict, n_slices: int) -> dict:
    """The truth renumbered for a volume whose slice 0 is the most superior."""
    levels = []
    for row in expected["levels"]:
        slab = row["slab"]
        if slab is not None:
            slab = {**slab, "first_slice": n_slices - 1 - slab["last_slice"],
                    "last_slice": n_slices - 1 - slab["first_slice"]}
        levels.append({**row, "slab": slab})
    return {**expected, "levels": levels}


def mismatches(result: dict, expected: dict, rel: float = 1e-6, slabs: bool = True) -> list[str]:
    """Human-readable differences between a measurements.json-like dict and `truth()`.

    Compares every key present in `expected` (integers exactly, floats to `rel`), level by level
    name, plus the total; extra keys in `result` are ignored. The default `rel` admits NIfTI's
    float32 voxel sizes in volumes; HU statistics of the right voxels match far closer.
    """
    found = {row["level"]: row for row in result.get("levels", [])}
    problems = []
    for row in expected["levels"]:
        got = found.get(row["level"])
        if got is None:
            problems.append(f"{row['level']}: missing from result")
            continue
        keys = row if slabs else {key: v for key, v in row.items() if key != "slab"}
        problems += _diff(got, keys, row["level"], rel)
    problems += _diff(result.get("total", {}), expected["total"], "total", rel)
    return problems


def _diff(got: object, want: object, where: str, rel: float) -> list[str]:
    if isinstance(want, dict):
        if not isinstance(got, dict):
            return [f"{where}: expected an object, got {got!r}"]
        return [p for key, value in want.items() for p in _diff(got.get(key), value, f"{where}.{key}", rel)]
    if isinstance(want, float) and isinstance(got, (int, float)) and not isinstance(got, bool):
        return [] if math.isclose(got, want, rel_tol=rel, abs_tol=rel) else [f"{where}: {got!r} != {want!r}"]
    return [] if got == want else [f"{where}: {got!r} != {want!r}"]


# ---------------------------------------------------------------- DICOM


_LPS_UNIT = {"L": (1, 0, 0), "R": (-1, 0, 0), "P": (0, 1, 0), "A": (0, -1, 0)}


@dataclass(frozen=True)
class DicomLayout:
    """How the canonical voxels are laid out in files.

    in_plane: patient direction of increasing column then of increasing row: "LP" is the
      standard axial IOP (1,0,0,0,1,0); "RA" is (-1,0,0,0,-1,0); "PL" is transposed (0,1,0,1,0,0).
    instance_order: which slice gets InstanceNumber 1 ("superior_first" = head first, IPP z
      falls as InstanceNumber rises; "inferior_first"; "shuffled" = numbers unrelated to position).
    file_names: "instance" (IM00001.dcm follows InstanceNumber) or "shuffled" (unrelated to both).
    """

    in_plane: str = "LP"
    instance_order: str = "superior_first"
    file_names: str = "instance"

    @property
    def iop(self) -> tuple[int, ...]:
        return _LPS_UNIT[self.in_plane[0]] + _LPS_UNIT[self.in_plane[1]]

    @property
    def normal_z(self) -> int:
        """Sign of the slice normal (row x column cosines) along LPS z."""
        (a, b, _), (c, d, _) = _LPS_UNIT[self.in_plane[0]], _LPS_UNIT[self.in_plane[1]]
        return 1 if a * d - b * c > 0 else -1


LAYOUTS: dict[str, DicomLayout] = {
    "axial": DicomLayout(),
    "feet_first": DicomLayout(instance_order="inferior_first"),
    "flipped": DicomLayout(in_plane="RA"),
    "transposed": DicomLayout(in_plane="PL"),
    "rotated": DicomLayout(in_plane="AL", instance_order="inferior_first"),
    "shuffled": DicomLayout(instance_order="shuffled", file_names="shuffled"),
    "flipped_feet_first_shuffled": DicomLayout(in_plane="RA", instance_order="inferior_first",
                                               file_names="shuffled"),
}


@dataclass(frozen=True)
class DicomSeries:
    """What write_dicom_series wrote; `paths[k]` holds canonical slice k."""

    folder: Path
    paths: list[Path]
    study_uid: str
    series_uid: str
    sop_instance_uids: list[str]
    instance_numbers: list[int]


def to_stored(plane: np.ndarray, in_plane: str) -> np.ndarray:
    """A canonical [.., r, c] array as the stored rows/columns of orientation `in_plane`."""
    col_dir, row_dir = in_plane
    if {col_dir, row_dir} not in ({"L", "P"}, {"L", "A"}, {"R", "P"}, {"R", "A"}):
        raise ValueError(f"in-plane orientation {in_plane!r} needs one of L/R and one of P/A")
    out = np.swapaxes(plane, -1, -2) if col_dir in "PA" else plane
    if col_dir in "RA":
        out = out[..., :, ::-1]
    if row_dir in "RA":
        out = out[..., ::-1, :]
    return out


def write_dicom_series(phantom: Phantom, folder: Path | str, layout: DicomLayout = LAYOUTS["axial"], *,
                       storage: str = "unsigned", rescale_slope: float = 1.0,
                       rescale_intercept: float | None = None, slice_thickness: float | None = None,
                       study_uid: str | None = None, series_uid: str | None = None, series_number: int = 1,
                       series_description: str = "Phantom thorax", patient_name: str = "Phantom^Thorax",
                       patient_id: str | None = None, specific_character_set: str = "ISO_IR 100",
                       header: dict[str, object] | None = None) -> DicomSeries:
    """CT Image Storage files, explicit VR little endian, one per canonical slice.

    storage "unsigned": PixelRepresentation 0, 12 bits stored, intercept -1024 by default;
    "signed": PixelRepresentation 1, 16 bits, intercept 0 by default. The stored values must
    reproduce the HU exactly through slope and intercept. Study UID defaults to the phantom's
    (shared across writes); series and instance UIDs are fresh unless given. `header` sets further
    attributes by keyword on every slice, e.g. {"ContrastBolusAgent": "Iomeprol"}.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stored = _stored_pixels(phantom.hu, storage, rescale_slope, rescale_intercept)
    intercept = rescale_intercept if rescale_intercept is not None else (-1024.0 if storage == "unsigned" else 0.0)
    study_uid = study_uid or phantom.study_uid
    series_uid = series_uid or str(generate_uid())
    nk = phantom.shape[0]
    numbers, names = _instance_numbers(nk, layout, phantom.seed)
    common = _series_dataset(phantom, layout, study_uid, series_uid, series_number, series_description,
                             patient_name, patient_id or phantom.patient_id, specific_character_set)
    for keyword, value in (header or {}).items():
        setattr(common, keyword, value)
    common.RescaleSlope = _ds(rescale_slope)
    common.RescaleIntercept = _ds(intercept)
    common.SliceThickness = _ds(slice_thickness if slice_thickness is not None else phantom.spacing[0])
    common.PixelRepresentation = 0 if storage == "unsigned" else 1
    common.BitsStored = 12 if storage == "unsigned" else 16
    common.HighBit = common.BitsStored - 1
    corner = to_stored(np.indices(phantom.shape[1:]), layout.in_plane)[:, 0, 0]
    paths, uids = [], []
    for k in range(nk):
        ds = _slice_dataset(common, to_stored(stored[k], layout.in_plane), numbers[k],
                            phantom.position(k, corner[0], corner[1]))
        path = folder / names[k]
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
        uids.append(str(ds.SOPInstanceUID))
    return DicomSeries(folder, paths, study_uid, series_uid, uids, numbers)


def _stored_pixels(hu: np.ndarray, storage: str, slope: float, intercept: float | None) -> np.ndarray:
    if storage not in ("unsigned", "signed"):
        raise ValueError(f"storage {storage!r} is not 'unsigned' or 'signed'")
    if intercept is None:
        intercept = -1024.0 if storage == "unsigned" else 0.0
    raw = (hu.astype(np.float64) - intercept) / slope
    dtype, bits = (np.uint16, 12) if storage == "unsigned" else (np.int16, 16)
    info = (0, 2**bits - 1) if storage == "unsigned" else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    if not np.array_equal(raw, np.round(raw)) or raw.min() < info[0] or raw.max() > info[1]:
        raise ValueError(f"slope {slope} / intercept {intercept} cannot store these HU exactly in "
                         f"{storage} {bits}-bit pixels; choose slope 1 (or 0.5) and a fitting intercept")
    return raw.astype(dtype)


def _instance_numbers(nk: int, layout: DicomLayout, seed: int) -> tuple[list[int], list[str]]:
    """InstanceNumber and file name of each canonical slice k (k = 0 most inferior)."""
    rng = np.random.default_rng(seed + 7919)
    if layout.instance_order == "superior_first":
        numbers = [nk - k for k in range(nk)]
    elif layout.instance_order == "inferior_first":
        numbers = [k + 1 for k in range(nk)]
    elif layout.instance_order == "shuffled":
        numbers = [int(n) + 1 for n in rng.permutation(nk)]
    else:
        raise ValueError(f"instance_order {layout.instance_order!r} is not superior_first, "
                         "inferior_first or shuffled")
    if layout.file_names == "instance":
        names = [f"IM{n:05d}.dcm" for n in numbers]
    elif layout.file_names == "shuffled":
        names = [f"IM{int(n) + 1:05d}.dcm" for n in rng.permutation(nk)]
    else:
        raise ValueError(f"file_names {layout.file_names!r} is not 'instance' or 'shuffled'")
    return numbers, names


def _ds(value: float) -> str:
    """A DS string (<= 16 characters) for a millimetre or rescale value."""
    text = f"{float(value):.4f}".rstrip("0").rstrip(".")
    return "0" if text in ("", "-0") else text


def _series_dataset(phantom: Phantom, layout: DicomLayout, study_uid: str, series_uid: str,
                    series_number: int, description: str, patient_name: str, patient_id: str,
                    charset: str) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = charset
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20240102"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "101500"
    ds.AccessionNumber = f"PH{phantom.seed:06d}"
    ds.Modality = "CT"
    ds.Manufacturer = "paraspinal-node phantom"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "CT Chest phantom"
    ds.SeriesDescription = description
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19600101"
    ds.PatientSex = "O"
    ds.BodyPartExamined = "CHEST"
    ds.KVP = "120"
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = series_number
    ds.AcquisitionNumber = 1
    ds.FrameOfReferenceUID = generate_uid(entropy_srcs=[study_uid, "frame of reference"])
    ds.PositionReferenceIndicator = ""
    ds.ImageOrientationPatient = [str(v) for v in layout.iop]
    dk, dr, dc = phantom.spacing
    row_step, col_step = (dr, dc) if layout.in_plane[0] in "LR" else (dc, dr)
    ds.PixelSpacing = [_ds(row_step), _ds(col_step)]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.RescaleType = "HU"
    ds.WindowCenter = "40"
    ds.WindowWidth = "400"
    return ds


def _slice_dataset(common: Dataset, pixels: np.ndarray, number: int, position: np.ndarray) -> Dataset:
    ds = Dataset()
    ds.update(common)
    ds.SOPInstanceUID = generate_uid()
    ds.InstanceNumber = number
    ds.ImagePositionPatient = [_ds(v) for v in position]
    ds.SliceLocation = _ds(position[2])
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


# ---------------------------------------------------------------- NIfTI


def nifti_image(phantom: Phantom, array: np.ndarray, orientation: str = "RAS") -> nib.Nifti1Image:
    """A canonical [k, r, c] array as NIfTI with axes `orientation` (nibabel axis codes, RAS world)."""
    dk, dr, dc = phantom.spacing
    ox, oy, oz = phantom.origin
    affine = np.array([[-dc, 0, 0, -ox], [0, -dr, 0, -oy], [0, 0, dk, oz], [0, 0, 0, 1]], float)
    image = nib.Nifti1Image(np.ascontiguousarray(array.transpose(2, 1, 0)), affine)
    target = nib.orientations.axcodes2ornt(tuple(orientation))
    image = image.as_reoriented(nib.orientations.ornt_transform(
        nib.orientations.axcodes2ornt(("L", "P", "S")), target))
    image.set_qform(image.affine, code=1)
    image.set_sform(image.affine, code=1)
    return image


def write_nifti_ct(phantom: Phantom, path: Path | str, orientation: str = "RAS") -> Path:
    """The CT as int16 HU NIfTI, oriented like dicom2nifti/TotalSegmentator input by default."""
    path = Path(path)
    nib.save(nifti_image(phantom, phantom.hu, orientation), path)
    return path


def write_masks(phantom: Phantom, folder: Path | str, form: str = "folder", orientation: str = "RAS",
                include_body: bool = True, multilabel_name: str = "segmentations.nii.gz",
                organs: bool = True) -> Path:
    """TotalSegmentator-style outputs (uint8 NIfTI); returns the folder or the multilabel file.

    "folder": vertebrae_T1..T12, vertebrae_L1..L5, autochthon_left/right, liver and spleen as binary
    files, plus vertebrae_body and intervertebral_discs (binary, as the vertebrae_body task writes
    per class); `organs=False` leaves liver and spleen out.
    "multilabel": one file in `total` numbering, plus vertebrae_body.nii.gz beside it holding
    the vertebrae_body task's multilabel values (1 body, 2 disc) - readers must use == 1.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if form == "folder":
        classes = {f"vertebrae_{lv}": VERTEBRA_LABEL[lv] for lv in SPINE} | {
            "autochthon_left": AUTOCHTHON_LEFT, "autochthon_right": AUTOCHTHON_RIGHT}
        if organs:
            classes |= {"liver": LIVER, "spleen": SPLEEN}
        for name, label in classes.items():
            _save_mask(phantom, phantom.labels == label, folder / f"{name}.nii.gz", orientation)
        if include_body:
            _save_mask(phantom, phantom.body == BODY, folder / "vertebrae_body.nii.gz", orientation)
            _save_mask(phantom, phantom.body == DISC, folder / "intervertebral_discs.nii.gz", orientation)
        return folder
    if form == "multilabel":
        labels = phantom.labels if organs else np.where(np.isin(phantom.labels, (LIVER, SPLEEN)), 0, phantom.labels)
        _save_mask(phantom, labels, folder / multilabel_name, orientation)
        if include_body:
            _save_mask(phantom, phantom.body, folder / "vertebrae_body.nii.gz", orientation)
        return folder / multilabel_name
    raise ValueError(f"mask form {form!r} is not 'folder' or 'multilabel'")


def _save_mask(phantom: Phantom, array: np.ndarray, path: Path, orientation: str) -> None:
    nib.save(nifti_image(phantom, array.astype(np.uint8), orientation), path)
