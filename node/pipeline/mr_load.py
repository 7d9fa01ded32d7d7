"""Load a lumbar MR study: the series to segment and, for Dixon, its fat image on the same grid.

A folder may hold one series (a spool series folder, whose partners lie in the sibling folders
of its study) or a whole study (one sub-folder per series, or all files mixed). The series to
segment is the Dixon water image, else the study's only other MR series (T1 or T2 without
Dixon). Its fat partner must share the study, the Frame of Reference and the geometry; a
partner that differs in any of them is not used, and the reason becomes a QC finding, so the
series is measured without fat figures rather than with wrong ones.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from node.ingest.dicom import multi_values
from node.ingest.dixon import DixonRole, dixon_role
from node.pipeline.ct import CTVolume, InputError
from node.pipeline.ct_load import read_folder, volume_of

log = logging.getLogger(__name__)

GRID_TOLERANCE_MM = 0.01


@dataclass(frozen=True)
class PairingNote:
    """Why a series is measured without Dixon fat figures; a QC finding of the measurement."""

    code: str
    message: str


@dataclass
class MRImages:
    """The segmented MR series and, with Dixon, the fat signal on its grid.

    `image.hu` holds the water (or T1/T2) signal: CTVolume is the node's grid type, whatever the modality.
    """

    image: CTVolume
    role: DixonRole
    fat: np.ndarray | None = None  # float32 [k, r, c], on image's grid
    fat_series_uid: str | None = None
    notes: list[PairingNote] = field(default_factory=list)

    @property
    def water(self) -> np.ndarray | None:
        """The water signal, when the segmented series is the water image of a Dixon pair."""
        return self.image.hu if self.fat is not None else None


def is_mr(path: Path) -> bool:
    """Whether the first DICOM file under `path` is an MR image (NIfTI and CT are not)."""
    path = Path(path)
    if not path.is_dir():
        return False
    for file in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")):
        header = _header(file)
        if header is not None:
            return str(header.get("Modality", "")) == "MR"
    return False


def load_mr(path: Path) -> MRImages:
    """Raises InputError for a folder without a measurable MR series."""
    series = _by_series(read_folder(Path(path)))
    chosen_uid = _series_to_segment(series)
    chosen = series.pop(chosen_uid)
    role = _role(chosen[0])
    image = volume_of(chosen, "MR")
    images = MRImages(image, role)
    if role is not DixonRole.WATER:
        return images
    partners = [datasets for datasets in series.values() if _role(datasets[0]) is DixonRole.FAT]
    if not partners:
        partners = _sibling_fat_series(Path(path), image.datasets[0])
    if not partners:
        images.notes.append(PairingNote("dixon_partner_missing", "the Dixon fat series of this water series was not "
                                        "received: fat figures not assessed; send the fat series with the water series"))
        return images
    _pair(images, partners[0])
    return images


def _header(file: Path) -> Dataset | None:
    try:
        return pydicom.dcmread(file, stop_before_pixels=True)
    except (InvalidDicomError, EOFError, OSError):
        return None


def _by_series(datasets: list[Dataset]) -> dict[str, list[Dataset]]:
    """MR image series only (other modalities and objects a study folder may hold are left out)."""
    series: dict[str, list[Dataset]] = defaultdict(list)
    for ds in datasets:
        if str(ds.get("Modality", "")) == "MR" and "PixelData" in ds:
            series[str(ds.get("SeriesInstanceUID", ""))].append(ds)
    if not series:
        raise InputError("no MR images in the folder: give the folder of a lumbar MR series or study")
    return dict(series)


def _role(ds: Dataset) -> DixonRole:
    return dixon_role([str(v) for v in multi_values(ds.get("ImageType"))], str(ds.get("SeriesDescription", "")))


def _series_to_segment(series: dict[str, list[Dataset]]) -> str:
    roles = {uid: _role(datasets[0]) for uid, datasets in series.items()}
    water = [uid for uid, role in roles.items() if role is DixonRole.WATER]
    if water:
        return water[0]
    plain = [uid for uid, role in roles.items() if role is DixonRole.NONE]
    if len(plain) == 1:
        return plain[0]
    found = ", ".join(sorted(role.value for role in roles.values()))
    raise InputError(f"cannot tell which MR series to segment (found {found}): give the Dixon water series, "
                     "or one T1/T2 series per folder")


def _sibling_fat_series(folder: Path, water: Dataset) -> list[list[Dataset]]:
    """A spool series folder: the fat partner is another series folder of the same study beside it."""
    if not folder.is_dir() or folder.parent == folder:
        return []
    study = str(water.get("StudyInstanceUID", ""))
    found = []
    for sibling in sorted(p for p in folder.parent.iterdir() if p.is_dir() and p != folder):
        first = next((f for f in sorted(sibling.iterdir()) if f.is_file() and not f.name.startswith(".")), None)
        header = _header(first) if first is not None else None
        if header is not None and str(header.get("StudyInstanceUID", "")) == study and _role(header) is DixonRole.FAT:
            found.append([ds for ds in read_folder(sibling) if str(ds.get("Modality", "")) == "MR"])
    return found


def _pair(images: MRImages, fat_datasets: list[Dataset]) -> None:
    """Use the fat series only when it shares the Frame of Reference and lies on the water series' grid."""
    water = images.image
    first = fat_datasets[0]
    if str(first.get("FrameOfReferenceUID", "")) != str(water.datasets[0].get("FrameOfReferenceUID", "")):
        images.notes.append(PairingNote("dixon_geometry_mismatch", "the fat series has another Frame of Reference than "
                                        "the water series: fat figures not assessed; send the pair of one acquisition"))
        return
    try:
        fat = volume_of(fat_datasets, "MR")
    except InputError as exc:
        images.notes.append(PairingNote("dixon_partner_unreadable", f"the fat series cannot be used: {exc}"))
        return
    mismatch = _grid_mismatch(water, fat)
    if mismatch:
        images.notes.append(PairingNote("dixon_geometry_mismatch", f"the fat series is not on the water series' grid "
                                        f"({mismatch}): fat figures not assessed; send the pair of one acquisition"))
        return
    images.fat = fat.hu.astype(np.float32)
    images.image.hu = images.image.hu.astype(np.float32)
    images.fat_series_uid = fat.series_uid
    log.info("event=dixon_paired water=%s fat=%s", water.series_uid, fat.series_uid)


def _grid_mismatch(a: CTVolume, b: CTVolume) -> str | None:
    if a.shape != b.shape:
        return f"{b.shape} voxels against {a.shape}"
    if not np.allclose(a.direction, b.direction, atol=1e-4):
        return "another orientation"
    if not np.allclose(a.spacing, b.spacing, atol=GRID_TOLERANCE_MM):
        return f"spacing {tuple(round(s, 3) for s in b.spacing)} mm against {tuple(round(s, 3) for s in a.spacing)} mm"
    if np.linalg.norm(np.asarray(a.origin) - np.asarray(b.origin)) > GRID_TOLERANCE_MM:
        return "another position"
    return None
