"""Self-tests of the phantom: its anatomy has the designed traps, its files hold its voxels.

The DICOM and NIfTI checks map every voxel back by physical coordinates with plain numpy,
independently of node/ct_load.py, so that the phantom can be trusted as a reference for it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import phantom as ph
import pydicom
import pytest

from node.labels import AUTOCHTHON_LEFT, AUTOCHTHON_RIGHT, LIVER, MEASURED_LEVELS, SPLEEN, THORACIC, VERTEBRA_LABEL


def _body_slices(p: ph.Phantom, level: str, body: np.ndarray | None = None, window: bool = True) -> np.ndarray:
    mask = (p.body == ph.BODY if body is None else body) & (p.labels == VERTEBRA_LABEL[level])
    if window:
        mask &= (p.hu >= 1) & (p.hu <= 700)
    return np.nonzero(mask.any(axis=(1, 2)))[0]


def _dilate6(mask: np.ndarray) -> np.ndarray:
    grown = mask.copy()
    for axis in range(3):
        grown |= np.roll(mask, 1, axis) | np.roll(mask, -1, axis)
    return grown


def test_spinous_process_of_each_level_reaches_into_the_next_body(phantom: ph.Phantom) -> None:
    for upper, lower in zip(THORACIC, THORACIC[1:]):
        next_body = _body_slices(phantom, lower)
        posterior = (phantom.labels[next_body] == VERTEBRA_LABEL[upper]) & (phantom.body[next_body] == 0)
        assert posterior.any(), f"{upper} does not reach {lower}'s body slices"


def test_whole_vertebra_slabs_overlap_but_body_slabs_do_not(phantom: ph.Phantom) -> None:
    body = [row["slab"] for row in ph.truth(phantom)["levels"]]
    whole = [row["slab"] for row in ph.truth(phantom, body_source="whole_vertebra")["levels"]]
    for upper, lower in zip(body, body[1:]):
        assert lower["last_slice"] < upper["first_slice"] - 1, "body slabs must be separated by discs"
    for upper, lower in zip(whole, whole[1:]):
        assert lower["last_slice"] >= upper["first_slice"], "whole-vertebra slabs should overlap"


def test_hu_window_and_disc_label_each_change_the_slab(phantom: ph.Phantom) -> None:
    for level in MEASURED_LEVELS:
        seed = _body_slices(phantom, level)
        assert _body_slices(phantom, level, window=False).size > seed.size, f"{level}: endplates"
    grown = [lv for lv in MEASURED_LEVELS if _body_slices(phantom, lv, body=phantom.body > 0).size
             > _body_slices(phantom, lv).size]
    assert len(grown) >= 5, "vertebra labels should bleed into discs on most levels"


def test_trabecular_bone_holds_values_at_both_window_edges(phantom: ph.Phantom) -> None:
    bone = phantom.hu[(phantom.body == ph.BODY) & np.isin(phantom.labels, list(VERTEBRA_LABEL.values()))]
    assert {0, 1, 700, 701} <= set(np.unique(bone).tolist())


def test_fat_fraction_per_level_is_as_designed(phantom_truth: dict) -> None:
    for row in phantom_truth["levels"]:
        for side in ph.SIDES:
            stats = row[side]
            designed = ph.DESIGNED_FAT_FRACTION[row["level"]][side]
            assert abs(stats["fat_fraction"] - designed) <= 0.5 / stats["voxels"] + 1e-12, (row["level"], side)
    left = [row["left"]["fat_fraction"] for row in phantom_truth["levels"]]
    assert left != sorted(left), "fat fraction should not be monotonic, so level shifts show"


def test_muscles_touch_neither_each_other_nor_bone(phantom: ph.Phantom) -> None:
    left, right = phantom.labels == AUTOCHTHON_LEFT, phantom.labels == AUTOCHTHON_RIGHT
    vertebra = np.isin(phantom.labels, list(VERTEBRA_LABEL.values())) | (phantom.body > 0)
    assert not (_dilate6(left) & (right | vertebra)).any()
    assert not (_dilate6(right) & vertebra).any()
    assert left.sum() > right.sum() > 0


def test_tissues_have_their_designed_hu(phantom: ph.Phantom) -> None:
    hu = phantom.hu
    assert hu.dtype == np.int16
    assert (hu[:, 0, :] == -1000).all() and (hu[:, :, -1] == -1000).all(), "air surrounds the body"
    assert ((hu >= -870) & (hu <= -830)).sum() > 0.05 * hu.size, "lungs"
    muscle = hu[np.isin(phantom.labels, [AUTOCHTHON_LEFT, AUTOCHTHON_RIGHT])]
    lean = muscle[muscle >= -29]
    assert set(np.unique(lean).tolist()) <= set(range(30, 61)) | {-29, 150, 151}
    assert muscle[muscle < -29].max() == -30


def test_every_level_is_complete_in_the_default_phantom(phantom_truth: dict) -> None:
    assert [row["level"] for row in phantom_truth["levels"]] == list(MEASURED_LEVELS)
    assert {row["status"] for row in phantom_truth["levels"]} == {"complete"}


def test_naive_truth_agrees_with_a_vectorised_count(phantom: ph.Phantom, phantom_truth: dict) -> None:
    union = np.zeros(phantom.shape[0], bool)
    for row in phantom_truth["levels"]:
        slab = slice(row["slab"]["first_slice"], row["slab"]["last_slice"] + 1)
        union[slab] = True
        muscle = phantom.hu[slab][np.isin(phantom.labels[slab], [AUTOCHTHON_LEFT, AUTOCHTHON_RIGHT])]
        assert row["combined"]["voxels"] == muscle.size
        assert row["combined"]["median_hu"] == np.median(muscle)
        assert row["combined"]["mean_hu"] == pytest.approx(muscle.mean(), rel=1e-12)
        assert row["combined"]["p75_hu"] == np.percentile(muscle, 75)
    total = phantom.hu[union][phantom.labels[union] == AUTOCHTHON_RIGHT]
    assert phantom_truth["total"]["right"]["voxels"] == total.size
    assert phantom_truth["total"]["right"]["volume_cm3"] == pytest.approx(total.size * 2.5 * 0.81 / 1000)


def test_truncation_through_t1_makes_only_t1_partial(phantom_truth: dict, truncated_phantom: ph.Phantom) -> None:
    cut = ph.truth(truncated_phantom)
    first, *rest = cut["levels"]
    assert first["status"] == "partial"
    assert 0 < first["combined"]["voxels"] < phantom_truth["levels"][0]["combined"]["voxels"]
    assert rest == phantom_truth["levels"][1:]


def test_in_plane_crop_through_a_muscle_makes_levels_partial(phantom: ph.Phantom) -> None:
    columns = np.nonzero((phantom.labels == AUTOCHTHON_LEFT).any(axis=(0, 1)))[0]
    cut = phantom.crop(c=slice(0, int(columns.mean())))
    assert {row["status"] for row in ph.truth(cut)["levels"]} == {"partial"}


def test_bench_sized_and_anisotropic_phantoms_keep_the_anatomy() -> None:
    small = ph.make_phantom(shape=(70, 64, 64), seed=3)
    assert small.shape == (70, 64, 64)
    aniso = ph.make_phantom(spacing=(3.0, 1.1, 0.8), seed=3)
    assert aniso.spacing == (3.0, 1.1, 0.8)
    assert {row["status"] for row in ph.truth(aniso)["levels"]} == {"complete"}
    with pytest.raises(ValueError, match="smaller than the phantom"):
        ph.make_phantom(shape=(40, 64, 64), spacing=(2.5, 0.9, 0.9))


def test_generation_is_deterministic(phantom: ph.Phantom) -> None:
    again = ph.make_phantom()
    assert np.array_equal(again.hu, phantom.hu) and np.array_equal(again.labels, phantom.labels)
    assert again.study_uid == phantom.study_uid


def test_mismatches_reports_differences_and_mirror_renumbers(phantom: ph.Phantom, phantom_truth: dict) -> None:
    assert ph.mismatches(phantom_truth, phantom_truth) == []
    changed = {**phantom_truth, "levels": [dict(row) for row in phantom_truth["levels"]]}
    changed["levels"][3] = {**changed["levels"][3], "left": {**changed["levels"][3]["left"], "voxels": 1}}
    assert ph.mismatches(changed, phantom_truth) == [
        f"T4.left.voxels: 1 != {phantom_truth['levels'][3]['left']['voxels']}"]
    last = phantom.shape[0] - 1
    mirrored = ph.mirror_slabs(phantom_truth, last + 1)
    assert mirrored["levels"][0]["slab"]["first_slice"] == last - phantom_truth["levels"][0]["slab"]["last_slice"]
    assert ph.mismatches(mirrored, phantom_truth, slabs=False) == []


# ---------------------------------------------------------------- files


def _read_series(folder: Path) -> tuple[np.ndarray, list[pydicom.Dataset]]:
    """HU volume sorted by position along the slice normal, and the datasets in that order."""
    datasets = [pydicom.dcmread(path) for path in sorted(folder.iterdir())]
    iop = np.array(datasets[0].ImageOrientationPatient, float)
    normal = np.cross(iop[:3], iop[3:])
    datasets.sort(key=lambda ds: float(np.dot(np.array(ds.ImagePositionPatient, float), normal)))
    volume = np.stack([ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in datasets])
    return volume, datasets


def _canonical_index(p: ph.Phantom, lps: np.ndarray) -> tuple[np.ndarray, ...]:
    """Canonical (k, r, c) of LPS positions; they must fall on voxel centres."""
    dk, dr, dc = p.spacing
    index = (lps - np.array(p.origin)) / np.array([dc, dr, dk])
    assert np.abs(index - np.round(index)).max() < 1e-3
    c, r, k = np.round(index).astype(int).transpose(-1, *range(lps.ndim - 1))
    return k, r, c


def _dicom_positions(datasets: list[pydicom.Dataset], shape: tuple[int, ...]) -> np.ndarray:
    iop = np.array(datasets[0].ImageOrientationPatient, float)
    row_step, col_step = (float(v) for v in datasets[0].PixelSpacing)
    ipp = np.array([ds.ImagePositionPatient for ds in datasets], float)
    i, j = np.indices(shape[1:])
    return (ipp[:, None, None, :] + j[None, ..., None] * col_step * iop[:3]
            + i[None, ..., None] * row_step * iop[3:])


@pytest.mark.parametrize("layout", sorted(ph.LAYOUTS))
def test_every_dicom_layout_holds_the_canonical_voxels(phantom: ph.Phantom, phantom_dicom, layout: str) -> None:
    series = phantom_dicom(layout)
    volume, datasets = _read_series(series.folder)
    k, r, c = _canonical_index(phantom, _dicom_positions(datasets, volume.shape))
    assert np.array_equal(volume, phantom.hu[k, r, c])
    assert sorted(np.unique(k).tolist()) == list(range(phantom.shape[0]))
    _check_order(ph.LAYOUTS[layout], series)


def _check_order(layout: ph.DicomLayout, series: ph.DicomSeries) -> None:
    z = [float(pydicom.dcmread(path, stop_before_pixels=True).ImagePositionPatient[2]) for path in series.paths]
    by_number = [z[series.instance_numbers.index(n)] for n in sorted(series.instance_numbers)]
    by_name = [z[series.paths.index(path)] for path in sorted(series.paths)]
    if layout.instance_order == "shuffled":
        assert by_number not in (sorted(z), sorted(z, reverse=True))
    else:
        assert by_number == sorted(z, reverse=layout.instance_order == "superior_first")
    if layout.file_names == "shuffled":
        assert by_name not in (by_number, sorted(z), sorted(z, reverse=True))


@pytest.mark.parametrize("layout", ["transposed", "rotated", "flipped"])
def test_anisotropic_in_plane_spacing_survives_each_orientation(tmp_path: Path, layout: str) -> None:
    aniso = ph.make_phantom(spacing=(3.0, 1.1, 0.8), seed=5)
    ph.write_dicom_series(aniso, tmp_path, ph.LAYOUTS[layout])
    volume, datasets = _read_series(tmp_path)
    k, r, c = _canonical_index(aniso, _dicom_positions(datasets, volume.shape))
    assert np.array_equal(volume, aniso.hu[k, r, c])


def test_signed_storage_and_non_ascii_names_round_trip(phantom: ph.Phantom, phantom_dicom) -> None:
    series = phantom_dicom("transposed", storage="signed", patient_name="Müller^Jörg",
                           specific_character_set="ISO_IR 192", slice_thickness=3.0)
    volume, datasets = _read_series(series.folder)
    first = datasets[0]
    assert first.PixelRepresentation == 1 and float(first.RescaleIntercept) == 0
    assert str(first.PatientName) == "Müller^Jörg" and float(first.SliceThickness) == 3.0
    k, r, c = _canonical_index(phantom, _dicom_positions(datasets, volume.shape))
    assert np.array_equal(volume, phantom.hu[k, r, c])


def test_dicom_headers_are_proper_ct(phantom: ph.Phantom, phantom_dicom) -> None:
    series = phantom_dicom("axial")
    other = phantom_dicom("flipped")
    first = pydicom.dcmread(series.paths[0], stop_before_pixels=True)
    assert first.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert first.SOPClassUID == pydicom.uid.CTImageStorage and first.Modality == "CT"
    assert list(first.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert (first.PixelRepresentation, first.BitsStored, float(first.RescaleIntercept)) == (0, 12, -1024.0)
    assert len(set(series.sop_instance_uids)) == phantom.shape[0]
    assert series.study_uid == other.study_uid == phantom.study_uid
    assert series.series_uid != other.series_uid


def test_unstorable_rescale_is_refused(phantom: ph.Phantom, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot store these HU exactly"):
        ph.write_dicom_series(phantom, tmp_path, rescale_slope=2.0)


@pytest.mark.parametrize(("form", "orientation"), [("folder", "RAS"), ("multilabel", "RAS"),
                                                   ("folder", "PIR"), ("multilabel", "LPI")])
def test_masks_map_back_to_the_canonical_labels(phantom: ph.Phantom, phantom_masks, form: str,
                                                orientation: str) -> None:
    written = phantom_masks(form, orientation)
    folder = written if form == "folder" else written.parent
    expected = {f"vertebrae_{lv}.nii.gz": phantom.labels == VERTEBRA_LABEL[lv] for lv in THORACIC}
    if form == "folder":
        expected |= {"autochthon_left.nii.gz": phantom.labels == AUTOCHTHON_LEFT,
                     "vertebrae_body.nii.gz": phantom.body == ph.BODY,
                     "intervertebral_discs.nii.gz": phantom.body == ph.DISC}
    else:
        expected = {written.name: phantom.labels, "vertebrae_body.nii.gz": phantom.body}
    images = {name: nib.load(folder / name) for name in expected}
    first = next(iter(images.values()))
    place = _nifti_to_canonical(phantom, first)
    for name, image in images.items():
        assert np.array_equal(image.affine, first.affine) and image.shape == first.shape, name
        assert nib.aff2axcodes(image.affine) == tuple(orientation) and image.get_data_dtype() == np.uint8
        assert np.array_equal(place(np.asarray(image.dataobj)), expected[name].astype(np.uint8)), name


def test_nifti_ct_maps_back_to_the_canonical_hu(phantom: ph.Phantom, tmp_path: Path) -> None:
    image = nib.load(ph.write_nifti_ct(phantom, tmp_path / "ct.nii.gz", orientation="ASL"))
    assert image.get_data_dtype() == np.int16
    assert np.array_equal(_nifti_to_canonical(phantom, image)(np.asarray(image.dataobj)), phantom.hu)


def _nifti_to_canonical(p: ph.Phantom, image: nib.Nifti1Image) -> Callable[[np.ndarray], np.ndarray]:
    """Places every voxel of arrays on `image`'s grid at its canonical index via the affine."""
    ijk = np.indices(image.shape).reshape(3, -1).T
    ras = nib.affines.apply_affine(image.affine, ijk)
    k, r, c = _canonical_index(p, ras * np.array([-1.0, -1.0, 1.0]))

    def place(data: np.ndarray) -> np.ndarray:
        out = np.full(p.shape, -1, np.int64)
        out[k, r, c] = data.reshape(-1)
        return out

    return place


def test_liver_is_cut_by_the_field_of_view_and_the_spleen_is_not(phantom: ph.Phantom) -> None:
    liver, spleen = phantom.labels == LIVER, phantom.labels == SPLEEN
    assert liver[0].any() and not liver[-1].any(), "the liver runs out of the bottom of the field of view"
    faces = (spleen[0], spleen[-1], spleen[:, 0], spleen[:, -1], spleen[:, :, 0], spleen[:, :, -1])
    assert spleen.any() and not any(face.any() for face in faces)


def test_liver_vessels_and_cyst_are_hypodense_and_the_organs_touch_no_muscle_or_bone(phantom: ph.Phantom) -> None:
    hu, organs = phantom.hu, phantom.organs
    parenchyma = hu[organs == ph.LIVER_PARENCHYMA]
    assert hu[organs == ph.LIVER_VESSEL].max() < parenchyma.min() and hu[organs == ph.LIVER_CYST].max() < parenchyma.min()
    assert (organs == ph.LIVER_VESSEL).sum() > 0.05 * parenchyma.size, "enough vessel to move a plain median"
    others = np.isin(phantom.labels, [AUTOCHTHON_LEFT, AUTOCHTHON_RIGHT, *VERTEBRA_LABEL.values()]) | (phantom.body > 0)
    assert not (_dilate6(np.isin(phantom.labels, [LIVER, SPLEEN])) & others).any()
