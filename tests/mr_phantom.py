"""A synthetic lumbar Dixon MR phantom with exact truth per level and side.

Grid [k, r, c] as tests/phantom.py: columns run to the patient's left, rows to posterior,
slices upward (k = 0 is the most inferior); 3 mm slices, 4 mm pixels, 48 × 48 × 80 voxels.
From the bottom: the sacrum (8 slices), then L5..L1 (10 slices each) with a 3-slice disc below
each, and 4 slices of T12 at the top. Each autochthon is a 10 × 10 voxel column through every
slice, so each level holds exactly 1000 muscle voxels per side, of which a designed share is
fat (F/(F+W) ≥ 0.5), laid as streaks (whole rows through the level's slices). The shares sit on
the simplified Goutallier bounds: 5, 9.9, 10, 30, 50, 50.1 and 60 %. Lean and fat voxels vary in
fat fraction and in total signal F + W, so ΣF/Σ(F+W), the median voxel fraction and the fat
area all differ. A 16 mm ring of subcutaneous fat surrounds the body.

Series: water, fat, in-phase (W + F) and out-phase (|W − F|) (or "t2": the water image as a T2
series without Dixon), each with its own series UID and
one shared Frame of Reference, tagged in a vendor's style (Siemens, Philips or GE). Bad cases:
`swapped=True` writes the fat image as the water series and the other way round; `sixth_lumbar`
inserts an unlabelled vertebra and a second disc between L5 and the sacrum; `shift_fat` moves
the fat series by a slice (another geometry).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from node.labels import AUTOCHTHON_LEFT, AUTOCHTHON_RIGHT, LUMBAR, SACRUM, VERTEBRA_LABEL

SPACING = (3.0, 4.0, 4.0)  # dk, dr, dc
ROWS = COLS = 48
VERTEBRA_SLICES, DISC_SLICES, SACRUM_SLICES, T12_SLICES = 10, 3, 8, 4
MUSCLE_ROWS = range(26, 36)
RIGHT_COLS, LEFT_COLS = range(13, 23), range(25, 35)  # patient right has the lower column index
VERTEBRA_ROWS, VERTEBRA_COLS = range(10, 25), range(19, 29)
# Fat area share per level and side: every simplified Goutallier bound, from both sides.
DESIGN: dict[str, dict[str, float]] = {
    "L1": {"left": 0.05, "right": 0.099},
    "L2": {"left": 0.10, "right": 0.30},
    "L3": {"left": 0.50, "right": 0.501},
    "L4": {"left": 0.60, "right": 0.30},
    "L5": {"left": 0.099, "right": 0.10},
}
GRADE = {0.05: "normal", 0.099: "normal", 0.10: "moderate", 0.30: "moderate", 0.50: "moderate", 0.501: "severe",
         0.60: "severe"}
VENDORS = ("siemens", "philips", "ge")
_IMAGE_TYPE = {  # (vendor, image) -> ImageType, as the vendors' conformance statements write them
    **{("siemens", image): ["DERIVED", "PRIMARY", "DIXON", value] for image, value in
       (("water", "WATER"), ("fat", "FAT"), ("in", "IN_PHASE"), ("out", "OPP_PHASE"))},
    **{("philips", image): ["ORIGINAL", "PRIMARY", value, value] for image, value in
       (("water", "W"), ("fat", "F"), ("in", "IP"), ("out", "OP"))},
    **{("ge", image): ["DERIVED", "PRIMARY", "DIXON", value] for image, value in
       (("water", "WATER"), ("fat", "FAT"), ("in", "InPhase"), ("out", "OutPhase"))},
    **{(vendor, "t2"): ["ORIGINAL", "PRIMARY", "M", "ND"] for vendor in VENDORS},  # no Dixon
}
_DESCRIPTION = {
    "siemens": {"water": "t1_vibe_dixon_tra_W", "fat": "t1_vibe_dixon_tra_F", "in": "t1_vibe_dixon_tra_in",
                "out": "t1_vibe_dixon_tra_opp"},
    "philips": {"water": "mDIXON W", "fat": "mDIXON F", "in": "mDIXON IP", "out": "mDIXON OP"},
    "ge": {"water": "WATER: Ax LAVA-Flex", "fat": "FAT: Ax LAVA-Flex", "in": "InPhase: Ax LAVA-Flex",
           "out": "OutPhase: Ax LAVA-Flex"},
}
for _vendor in VENDORS:
    _DESCRIPTION[_vendor]["t2"] = "t2_tse_tra"
_MANUFACTURER = {"siemens": "SIEMENS", "philips": "Philips Medical Systems", "ge": "GE MEDICAL SYSTEMS"}


@dataclass
class MRPhantom:
    water: np.ndarray  # uint16 [k, r, c]
    fat: np.ndarray
    labels: np.ndarray  # uint8, `total` numbering (vertebrae, sacrum, autochthon)
    discs: np.ndarray  # bool
    slabs: dict[str, range]
    spacing: tuple[float, float, float] = SPACING
    origin: tuple[float, float, float] = (-96.0, -96.0, -120.0)
    seed: int = 7
    uids: dict[str, str] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.water.shape

    @property
    def fraction(self) -> np.ndarray:
        total = self.water.astype(np.float64) + self.fat
        return np.divide(self.fat, total, out=np.zeros(total.shape), where=total > 0)


def make_mr_phantom(sixth_lumbar: bool = False) -> MRPhantom:
    rng = np.random.default_rng(19)
    extra = VERTEBRA_SLICES + DISC_SLICES if sixth_lumbar else 0
    nk = SACRUM_SLICES + 5 * (VERTEBRA_SLICES + DISC_SLICES) + T12_SLICES + extra
    ratio = np.zeros((nk, ROWS, COLS))  # designed F/(F+W)
    total = np.zeros((nk, ROWS, COLS))  # designed F+W
    labels = np.zeros((nk, ROWS, COLS), np.uint8)
    discs = np.zeros((nk, ROWS, COLS), bool)
    rows, cols = np.mgrid[0:ROWS, 0:COLS]
    radius = np.hypot((rows - 23.5) / 22.0, (cols - 23.5) / 22.0)
    body, ring = radius <= 1.0, (radius > 0.8) & (radius <= 1.0)
    total[:, body] = 800.0
    ratio[:, body] = 0.08  # other soft tissue
    ratio[:, ring] = 0.92  # subcutaneous fat
    total[:, ring] = 1100.0
    vertebra = np.zeros((ROWS, COLS), bool)
    vertebra[VERTEBRA_ROWS.start : VERTEBRA_ROWS.stop, VERTEBRA_COLS.start : VERTEBRA_COLS.stop] = True
    slabs: dict[str, range] = {}
    k = 0

    def put_bone(slices: range, label: int) -> None:
        for j in slices:
            labels[j][vertebra] = label
            ratio[j][vertebra], total[j][vertebra] = 0.45, 700.0

    def put_disc(slices: range) -> None:
        for j in slices:
            discs[j][vertebra] = True
            ratio[j][vertebra], total[j][vertebra] = 0.03, 1200.0

    put_bone(range(0, SACRUM_SLICES), SACRUM)
    k = SACRUM_SLICES
    if sixth_lumbar:  # an unlabelled sixth lumbar vertebra with its own disc below it
        put_disc(range(k, k + DISC_SLICES))
        put_bone(range(k + DISC_SLICES, k + extra), 0)
        k += extra
    for level in reversed(LUMBAR):  # L5 first, from the bottom up
        put_disc(range(k, k + DISC_SLICES))
        k += DISC_SLICES
        slabs[level] = range(k, k + VERTEBRA_SLICES)
        put_bone(slabs[level], VERTEBRA_LABEL[level])
        k += VERTEBRA_SLICES
    put_bone(range(k, nk), VERTEBRA_LABEL["T12"])
    for side, columns, label in (("left", LEFT_COLS, AUTOCHTHON_LEFT), ("right", RIGHT_COLS, AUTOCHTHON_RIGHT)):
        box = (slice(None), slice(MUSCLE_ROWS.start, MUSCLE_ROWS.stop), slice(columns.start, columns.stop))
        labels[box] = label
        ratio[box] = rng.uniform(0.04, 0.16, ratio[box].shape)  # lean muscle, between slabs too
        total[box] = rng.uniform(850.0, 1150.0, ratio[box].shape)
        for level, slab in slabs.items():
            _streaks(ratio, total, slab, columns, DESIGN[level][side], rng)
    fat = np.rint(ratio * total)
    water = np.rint(total) - fat
    return MRPhantom(water.astype(np.uint16), fat.astype(np.uint16), labels, discs, slabs)


def _streaks(ratio: np.ndarray, total: np.ndarray, slab: range, columns: range, share: float,
             rng: np.random.Generator) -> None:
    """The first `share` × 1000 voxels in (row, column, slice) order become fat: streaks along the rows."""
    voxels = [(k, r, c) for r in MUSCLE_ROWS for c in columns for k in slab]
    n_fat = round(share * len(voxels))
    for k, r, c in voxels[:n_fat]:
        ratio[k, r, c] = rng.uniform(0.62, 0.95)
        total[k, r, c] = rng.uniform(900.0, 1300.0)


def truth(mr: MRPhantom, levels=LUMBAR) -> dict:
    """measurements.json's levels and lumbar_total, computed from the stored F and W integers."""
    fraction, fat, water = mr.fraction, mr.fat.astype(np.float64), mr.water.astype(np.float64)
    voxel_mm3 = float(np.prod(mr.spacing))

    def stats(mask: np.ndarray, n_slices: int) -> dict:
        n = int(mask.sum())
        f, w, ff = fat[mask], water[mask], fraction[mask]
        area_share = float((ff >= 0.5).sum() / n)
        return {"voxels": n, "volume_cm3": n * voxel_mm3 / 1000, "area_cm2": n * 16.0 / n_slices / 100,
                "fat_signal_fraction": float(f.sum() / (f.sum() + w.sum())),
                "median_fat_fraction": float(np.median(ff)), "fat_area_fraction": area_share}

    def sides(slices: list[int]) -> dict:
        sel = np.zeros(mr.shape, bool)
        sel[slices] = True
        left, right = sel & (mr.labels == AUTOCHTHON_LEFT), sel & (mr.labels == AUTOCHTHON_RIGHT)
        return {"left": stats(left, len(slices)), "right": stats(right, len(slices)),
                "combined": stats(left | right, len(slices))}

    out = {"levels": {level: {"slab": [mr.slabs[level].start, mr.slabs[level].stop - 1], **sides(list(mr.slabs[level]))}
                      for level in levels}}
    out["lumbar_total"] = sides(sorted({k for level in levels for k in mr.slabs[level]}))
    return out


@dataclass(frozen=True)
class MRStudy:
    folder: Path
    series: dict[str, Path]  # image (water, fat, in, out) -> folder
    uids: dict[str, str]


def write_study(mr: MRPhantom, folder: Path, vendor: str = "siemens", *, swapped: bool = False,
                shift_fat: bool = False, images: tuple[str, ...] = ("water", "fat", "in", "out"),
                mixed: bool = False) -> MRStudy:
    """The Dixon series as DICOM, one sub-folder per series (or all in `folder` with `mixed`)."""
    folder = Path(folder)
    study_uid = generate_uid(entropy_srcs=[vendor, str(mr.shape), "study"])
    frame = generate_uid(entropy_srcs=[study_uid, "frame"])
    water, fat = (mr.fat, mr.water) if swapped else (mr.water, mr.fat)
    pixels = {"water": water, "fat": fat, "in": water.astype(np.int32) + fat,
              "out": np.abs(water.astype(np.int32) - fat), "t2": water}
    written, uids = {}, {}
    for number, image in enumerate(images, start=1):
        uid = generate_uid()
        target = folder if mixed else folder / image
        target.mkdir(parents=True, exist_ok=True)
        common = _series_dataset(vendor, image, study_uid, uid, frame, number)
        offset = SPACING[0] if shift_fat and image == "fat" else 0.0
        for k in range(mr.shape[0]):
            position = np.array(mr.origin) + np.array([0.0, 0.0, k * SPACING[0] + offset])
            ds = _slice(common, pixels[image][k].astype(np.uint16), k + 1, position)
            ds.save_as(target / f"{image}-{k:03d}.dcm", enforce_file_format=True)
        written[image], uids[image] = target, uid
    return MRStudy(folder, written, uids)


def _series_dataset(vendor: str, image: str, study_uid: str, series_uid: str, frame: str, number: int) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = _IMAGE_TYPE[(vendor, image)]
    ds.SOPClassUID = MRImageStorage
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20240305"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "091000"
    ds.AccessionNumber = "MR000019"
    ds.Modality = "MR"
    ds.Manufacturer = _MANUFACTURER[vendor]
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "MRT LWS"
    ds.SeriesDescription = _DESCRIPTION[vendor][image]
    ds.PatientName = "Phantom^Lumbar"
    ds.PatientID = "MRPH19"
    ds.PatientBirthDate = "19650101"
    ds.PatientSex = "O"
    ds.BodyPartExamined = "LSPINE"
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = number
    ds.AcquisitionNumber = 1
    ds.FrameOfReferenceUID = frame
    ds.PositionReferenceIndicator = ""
    ds.ScanningSequence = "GR"
    ds.SequenceVariant = ["SP", "SK"]
    ds.ScanOptions = ""
    ds.MRAcquisitionType = "3D"
    ds.RepetitionTime = "6.8"
    ds.EchoTime = "2.39" if image != "out" else "1.2"
    ds.EchoTrainLength = "2"
    ds.MagneticFieldStrength = "3"
    ds.ImagingFrequency = "123.2"
    ds.ImagedNucleus = "1H"
    ds.SliceThickness = str(SPACING[0])
    ds.SpacingBetweenSlices = str(SPACING[0])
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.PixelSpacing = [str(SPACING[1]), str(SPACING[2])]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    return ds


def _slice(common: Dataset, pixels: np.ndarray, number: int, position: np.ndarray) -> Dataset:
    ds = Dataset()
    ds.update(common)
    ds.SOPInstanceUID = generate_uid()
    ds.InstanceNumber = number
    ds.ImagePositionPatient = [f"{v:.3f}" for v in position]
    ds.SliceLocation = f"{position[2]:.3f}"
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def write_masks(mr: MRPhantom, folder: Path) -> Path:
    """total_mr and vertebrae_mr outputs as TotalSegmentator names them, on the water grid (RAS NIfTI)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = {f"vertebrae_{level}": VERTEBRA_LABEL[level] for level in (*LUMBAR, "T12")}
    names |= {"sacrum": SACRUM, "autochthon_left": AUTOCHTHON_LEFT, "autochthon_right": AUTOCHTHON_RIGHT}
    for name, label in names.items():
        nib.save(nifti(mr, (mr.labels == label).astype(np.uint8)), folder / f"{name}.nii.gz")
    nib.save(nifti(mr, mr.discs.astype(np.uint8)), folder / "intervertebral_discs.nii.gz")
    return folder


def nifti(mr: MRPhantom, array: np.ndarray) -> nib.Nifti1Image:
    """A canonical [k, r, c] array as RAS NIfTI (axes c, r, k flipped to R, A)."""
    dk, dr, dc = mr.spacing
    ox, oy, oz = mr.origin
    affine = np.array([[-dc, 0, 0, -ox], [0, -dr, 0, -oy], [0, 0, dk, oz], [0, 0, 0, 1]], float)
    return nib.Nifti1Image(np.ascontiguousarray(array.transpose(2, 1, 0)), affine)
