"""Load one CT series (DICOM folder or NIfTI file) into a `CTVolume`, or refuse it in one line.

Slices are ordered by their position along the slice normal, never by file name or
InstanceNumber, so any slice order, file order and in-plane orientation gives the same voxels.
Gantry-tilted series are refused rather than resampled: resampling would change the very
voxels the published method takes its median over.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from node.ingest.dicom import CT_IMAGE_STORAGE, multi_values
from node.ingest.dixon import MR_IMAGE_STORAGE
from node.pipeline.ct import CTVolume, InputError

log = logging.getLogger(__name__)

SPACING_TOLERANCE = 0.02  # relative to the nominal slice spacing
MIN_SPACING_TOLERANCE_MM = 0.01
MAX_TILT_DEGREES = 0.5  # declared GantryDetectorTilt
MAX_DRIFT_PIXELS = 0.5  # sideways drift of any slice from a straight stack, in pixels
MIN_AXIAL_COSINE = np.cos(np.radians(45.0))
_GEOMETRY_VALUES = {"ImagePositionPatient": 3, "ImageOrientationPatient": 6, "PixelSpacing": 2, "Rows": 1, "Columns": 1}


def load_ct(path: Path) -> CTVolume:
    path = Path(path)
    if path.is_dir():
        return load_dicom_series(path)
    if path.is_file() and path.name.endswith((".nii", ".nii.gz")):
        return load_nifti(path)
    if not path.exists():
        raise InputError(f"{path} does not exist: give a folder of one DICOM series or a NIfTI file")
    raise InputError(f"{path} is neither a folder of DICOM files nor a .nii/.nii.gz file")


def load_dicom_series(folder: Path) -> CTVolume:
    return volume_of(read_folder(folder), "CT")


def volume_of(datasets: list[Dataset], modality: str) -> CTVolume:
    """One series' datasets (CT, or MR for node.pipeline.mr_load) checked and stacked on their grid."""
    _check_one_series(datasets, modality)
    geometry = _check_geometry(datasets)
    normal = geometry["normal"]
    datasets.sort(key=lambda ds: float(np.dot(_position(ds), normal)))
    spacing_k = _check_spacing(datasets, normal)
    _check_tilt(datasets, normal)
    hu = _stack_hu(datasets)
    row_spacing, col_spacing = (float(v) for v in datasets[0].PixelSpacing)
    direction = np.column_stack([geometry["row_dir"], geometry["col_dir"], normal])
    thickness = datasets[0].get("SliceThickness")
    return CTVolume(
        hu=hu,
        spacing=(spacing_k, row_spacing, col_spacing),
        origin=_position(datasets[0]),
        direction=direction,
        slice_thickness=float(thickness) if thickness not in (None, "") else None,
        datasets=datasets,
    )


def load_nifti(path: Path) -> CTVolume:
    """Reorder the axes so that the array's first axis is the one closest to head-feet."""
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise InputError(f"{path} cannot be read as NIfTI: {str(exc).strip().splitlines()[-1]}") from None
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{path} is not a 3-D single-channel image")
    direction = np.array(image.GetDirection()).reshape(3, 3)
    slice_axis = int(np.argmax(np.abs(direction[2, :])))
    order = [a for a in range(3) if a != slice_axis] + [slice_axis]
    image = sitk.PermuteAxes(image, order)
    array = sitk.GetArrayFromImage(image)
    hu = array.astype(np.int16) if _integral_int16(array) else array.astype(np.float32)
    sx, sy, sz = image.GetSpacing()
    return CTVolume(
        hu=hu,
        spacing=(sz, sy, sx),
        origin=np.array(image.GetOrigin()),
        direction=np.array(image.GetDirection()).reshape(3, 3),
        slice_thickness=sz,
    )


def _integral_int16(array: np.ndarray) -> bool:
    if array.size == 0:
        return False
    low, high = array.min(), array.max()
    in_range = -32768 <= low and high <= 32767
    return bool(in_range and (np.issubdtype(array.dtype, np.integer) or np.array_equal(array, np.round(array))))


def read_folder(folder: Path) -> list[Dataset]:
    """Every DICOM file under `folder`, pixels included; raises InputError when there is none."""
    datasets = []
    for file in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        try:
            ds = pydicom.dcmread(file)
        except (InvalidDicomError, EOFError, OSError):
            log.info("event=skip_non_dicom file=%s", file.name)
            continue
        if _sop_class(ds) == "1.2.840.10008.1.3.10":  # DICOMDIR
            continue
        if not ds.get("SOPClassUID") and _sop_class(ds):
            ds.SOPClassUID = _sop_class(ds)
        datasets.append(ds)
    if not datasets:
        raise InputError(f"no DICOM files in {folder}: give the folder of one CT series")
    return datasets


_STORAGE = {"CT": (CT_IMAGE_STORAGE, "CT Image Storage"), "MR": (MR_IMAGE_STORAGE, "MR Image Storage")}


def _check_one_series(datasets: list[Dataset], wanted: str) -> None:
    series = sorted({str(ds.get("SeriesInstanceUID", "")) for ds in datasets})
    if len(series) > 1:
        raise InputError(f"mixed series: {len(series)} SeriesInstanceUIDs in one folder; give one series per folder")
    storage, storage_name = _STORAGE[wanted]
    for ds in datasets:
        modality = ds.get("Modality", "")
        if modality != wanted:
            raise InputError(f"not a {wanted} series: Modality is {modality or 'missing'}; only {wanted} is measured here")
        if _sop_class(ds) not in ("", storage):
            raise InputError(f"unsupported SOP class {_sop_class(ds)}: only {storage_name} (single-frame) is measured")
        if "LOCALIZER" in [str(v).upper() for v in ds.get("ImageType", [])]:
            raise InputError("localizer (scout) image in the series: send the axial CT reconstruction, not the scout")
        if "PixelData" not in ds:
            raise InputError(f"instance {ds.get('SOPInstanceUID', '?')} has no pixel data")
        for keyword, count in _GEOMETRY_VALUES.items():
            if len(multi_values(ds.get(keyword))) != count:
                raise InputError(
                    f"instance {ds.get('SOPInstanceUID', '?')} lacks a valid {keyword} ({count} values): "
                    "cannot place it in space"
                )
    if len(datasets) < 2:
        raise InputError(f"only one slice: a {wanted} volume needs at least two")


def _check_geometry(datasets: list[Dataset]) -> dict[str, np.ndarray]:
    first = datasets[0]
    iop = np.array(first.ImageOrientationPatient, dtype=float)
    for ds in datasets[1:]:
        if not np.allclose(np.array(ds.ImageOrientationPatient, dtype=float), iop, atol=1e-4):
            raise InputError("mixed series: slices have different ImageOrientationPatient")
        if (ds.Rows, ds.Columns) != (first.Rows, first.Columns):
            raise InputError("mixed series: slices have different Rows/Columns")
        if not np.allclose(np.array(ds.PixelSpacing, dtype=float), np.array(first.PixelSpacing, dtype=float), atol=1e-4):
            raise InputError("mixed series: slices have different PixelSpacing")
    row_dir, col_dir = _unit(iop[:3]), _unit(iop[3:])
    normal = _unit(np.cross(row_dir, col_dir))
    if abs(normal[2]) < MIN_AXIAL_COSINE:
        raise InputError("not an axial series (slice normal far from head-feet): send the axial reconstruction")
    return {"row_dir": row_dir, "col_dir": col_dir, "normal": normal}


def _check_spacing(datasets: list[Dataset], normal: np.ndarray) -> float:
    along = np.array([np.dot(_position(ds), normal) for ds in datasets])
    gaps = np.diff(along)
    if np.any(gaps < MIN_SPACING_TOLERANCE_MM):
        k = int(np.argmin(gaps))
        raise InputError(f"two slices at the same position ({along[k]:.2f} mm along the normal): duplicate or mixed series")
    nominal = float(np.median(gaps))
    tolerance = max(MIN_SPACING_TOLERANCE_MM, SPACING_TOLERANCE * nominal)
    worst = int(np.argmax(np.abs(gaps - nominal)))
    if abs(gaps[worst] - nominal) > tolerance:
        raise InputError(
            f"non-uniform slice spacing: gap of {gaps[worst]:.2f} mm between slices at {along[worst]:.2f} and "
            f"{along[worst + 1]:.2f} mm (expected {nominal:.2f} mm): missing or extra slices; resend the complete series"
        )
    return float((along[-1] - along[0]) / (len(along) - 1))


def _check_tilt(datasets: list[Dataset], normal: np.ndarray) -> None:
    """The volume is a straight stack along the normal; a slice that drifts sideways breaks that grid."""
    first = _position(datasets[0])
    offsets = np.array([_position(ds) - first for ds in datasets])
    sideways = offsets - np.outer(offsets @ normal, normal)
    drift = float(np.linalg.norm(sideways, axis=1).max())
    length = float(np.linalg.norm(offsets[-1]))
    tilt = float(np.degrees(np.arctan2(float(np.linalg.norm(sideways[-1])), abs(float(offsets[-1] @ normal)))))
    declared = abs(float(datasets[0].get("GantryDetectorTilt", 0) or 0))
    pixel = min(float(v) for v in datasets[0].PixelSpacing)
    if drift > MAX_DRIFT_PIXELS * pixel or declared > MAX_TILT_DEGREES:
        raise InputError(
            f"gantry tilt of {max(tilt, declared):.1f}° (slices drift {drift:.1f} mm sideways over {length:.0f} mm) "
            "is not supported (refused, not resampled): send a reconstruction without tilt"
        )


def _stack_hu(datasets: list[Dataset]) -> np.ndarray:
    """Apply each slice's own rescale; keep int16 when the HU are integers (half the memory)."""
    first = datasets[0]
    integral = all(_is_integer(ds.get("RescaleSlope", 1)) and _is_integer(ds.get("RescaleIntercept", 0)) for ds in datasets)
    hu = np.empty((len(datasets), first.Rows, first.Columns), dtype=np.int16 if integral else np.float32)
    for k, ds in enumerate(datasets):
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
        values = _pixels(ds).astype(np.float64 if not integral else np.int32) * (int(slope) if integral else slope)
        values = values + (int(intercept) if integral else intercept)
        if integral and (values.min() < -32768 or values.max() > 32767):
            hu = hu.astype(np.float32)
            integral = False
        hu[k] = values
        del ds.PixelData
    return hu


def _pixels(ds: Dataset) -> np.ndarray:
    syntax = ds.file_meta.get("TransferSyntaxUID")
    try:
        array = ds.pixel_array
    except Exception as exc:  # decoder plugins raise many types; the user needs one line
        fix = ("check that the pylibjpeg plugins (pylibjpeg-libjpeg, -openjpeg, -rle) are installed"
               if syntax is not None and syntax.is_compressed else "the file is damaged or truncated: resend it")
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InputError(
            f"cannot decode pixel data of instance {ds.get('SOPInstanceUID', '?')} "
            f"(transfer syntax {syntax or '?'}): {first_line}; {fix}"
        ) from None
    if array.ndim != 2:
        raise InputError(f"instance {ds.get('SOPInstanceUID', '?')} is not a single-frame greyscale image")
    return array


def _sop_class(ds: Dataset) -> str:
    """Some anonymisers blank SOPClassUID; the file meta still names it."""
    return str(ds.get("SOPClassUID", "") or ds.get("file_meta", Dataset()).get("MediaStorageSOPClassUID", ""))


def _is_integer(value: object) -> bool:
    return float(value or 0).is_integer()


def _position(ds: Dataset) -> np.ndarray:
    return np.array(ds.ImagePositionPatient, dtype=float)


def _unit(vector: np.ndarray) -> np.ndarray:
    return vector / np.linalg.norm(vector)
