"""The faster encoding writes what highdicom's and pydicom's plain paths write, item for item.

dicom_sr/encoding.py builds the SR without highdicom's walks of the content tree and writes
without pydicom's repeated VR corrections. Here a phantom is encoded twice, once through
those plain paths (the code before the change) and once as the node does, and the three files
are compared element by element in file order. Only what is generated per run may differ:
UIDs are numbered by first appearance across the three files (so every reference between
them must still match) and the creation dates and times are masked.
"""

from __future__ import annotations

import hashlib
from io import BytesIO
from pathlib import Path

import highdicom as hd
import numpy as np
import phantom as ph
import pydicom
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

import dicom_sr.mr_sr
import dicom_sr.results
import dicom_sr.sr
from dicom_sr import encoding
from dicom_sr.encoding import comprehensive_3d_sr, encode
from dicom_sr.options import EncodeOptions
from dicom_sr.results import build_results, write_results
from node.config import MeasureConfig, ResultsConfig
from node.pipeline.ct_load import load_ct
from node.pipeline.measure import measure
from node.pipeline.segmentation import Segmentation

GENERATED = {"ContentDate", "ContentTime", "InstanceCreationDate", "InstanceCreationTime", "SeriesDate",
             "SeriesTime", "ContributionDateTime", "AcquisitionDateTime", "DateOfSecondaryCapture",
             "TimeOfSecondaryCapture",
             "FileMetaInformationGroupLength"}  # follows the length of the generated UIDs


def plain_encode(dataset: Dataset) -> bytes:
    buffer = BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def canonical(paths: list[Path]) -> list[str]:
    """Every element of the files, in file order, with UIDs numbered and creation times masked."""
    uids: dict[str, str] = {}
    lines: list[str] = []

    def uid(value: str) -> str:
        return value if value.startswith("1.2.840.10008.") else uids.setdefault(value, f"UID{len(uids)}")

    def walk(dataset: Dataset, depth: str) -> None:
        for element in dataset:
            head = f"{depth}{element.tag} {element.VR}"
            if element.VR == "SQ":
                lines.append(f"{head} {len(element.value)} items")
                for i, item in enumerate(element.value):
                    walk(item, f"{depth}  {i}:")
            elif element.keyword in GENERATED:
                lines.append(f"{head} <generated>")
            elif element.VR == "UI":
                values = element.value if element.VM > 1 else [element.value]
                lines.append(f"{head} {[uid(str(v)) for v in values]}")
            elif isinstance(element.value, bytes) and len(element.value) > 64:
                lines.append(f"{head} sha256 {hashlib.sha256(element.value).hexdigest()}")
            else:
                lines.append(f"{head} {element.value!r}")

    for path in paths:
        dataset = pydicom.dcmread(path)
        lines.append(f"== {path.name} preamble {dataset.preamble!r}")
        walk(dataset.file_meta, "meta ")
        walk(dataset, "")
    return lines


def assert_same(old: list[str], new: list[str]) -> None:
    assert len(old) == len(new), f"{len(old)} elements before, {len(new)} now"
    for before, now in zip(old, new):
        assert before == now


def files(written) -> list[Path]:
    return [written.seg, written.sr, written.key_image]


@pytest.fixture(scope="module")
def measured_ct(tmp_path_factory):
    """A series read from files (raw data elements, ISO_IR 100 with a non-ASCII name)."""
    small = ph.make_phantom(spacing=(2.5, 1.8, 1.8))
    folder = tmp_path_factory.mktemp("ct")
    ph.write_dicom_series(small, folder, patient_name="Müller^Jörg", specific_character_set="ISO_IR 100")
    ct = load_ct(folder)
    seg = Segmentation(np.ascontiguousarray(small.labels), small.body == ph.BODY, "2.18.0")
    return ct, seg, measure(ct, seg, MeasureConfig())


@pytest.mark.parametrize("results", [ResultsConfig(), ResultsConfig(labelmap=True, institution_name="Spital Zürich"),
                                     ResultsConfig(jpeg2000=True)],
                         ids=["binary", "labelmap-utf8", "jpeg2000"])
def test_ct_results_equal_the_plain_encoders(measured_ct, results, tmp_path, monkeypatch):
    ct, seg, result = measured_ct
    options = EncodeOptions(results)
    with monkeypatch.context() as patch:
        patch.setattr(dicom_sr.sr, "comprehensive_3d_sr", hd.sr.Comprehensive3DSR)
        patch.setattr(dicom_sr.results, "encode", plain_encode)
        old = canonical(files(write_results(ct, seg, result, tmp_path / "old", options)))
    new = canonical(files(write_results(ct, seg, result, tmp_path / "new", options)))
    assert_same(old, new)


def test_mr_results_equal_the_plain_encoders(tmp_path, monkeypatch):
    import mr_phantom as mp

    from node.config import Config
    from node.run import run_pipeline

    mr = mp.make_mr_phantom()
    masks = mp.write_masks(mr, tmp_path / "masks")
    study = tmp_path / "study"
    mp.write_study(mr, study, "siemens", images=("water", "fat"))
    with monkeypatch.context() as patch:
        patch.setattr(dicom_sr.mr_sr, "comprehensive_3d_sr", hd.sr.Comprehensive3DSR)
        patch.setattr(dicom_sr.results, "encode", plain_encode)
        old = run_pipeline(study, tmp_path / "old", Config(), seg_path=masks, dicom=True)
    new = run_pipeline(study, tmp_path / "new", Config(), seg_path=masks, dicom=True)
    paths = [Path(old.files[name]) for name in ("seg", "sr", "keyimage")]
    assert_same(canonical(paths), canonical([Path(new.files[name]) for name in ("seg", "sr", "keyimage")]))


def test_sr_content_is_the_whole_tree(measured_ct):
    """`document.content` (highdicom's `_content`, which comprehensive_3d_sr sets) holds the tree written."""
    ct, seg, result = measured_ct
    sr = build_results(ct, seg, result, EncodeOptions()).sr
    assert len(sr.content) == 1
    assert sr.content[0].name == hd.sr.CodedConcept("126000", "DCM", "Imaging Measurement Report")
    assert sr.content[0].ContentSequence is sr.ContentSequence


def test_missing_evidence_is_refused_as_highdicom_refuses_it(measured_ct):
    ct, seg, result = measured_ct
    sr = build_results(ct, seg, result, EncodeOptions()).sr
    with pytest.raises(ValueError, match="evidence"):
        comprehensive_3d_sr(evidence=[sr], content=sr.content[0], series_instance_uid=hd.UID(), series_number=1,
                            sop_instance_uid=hd.UID(), instance_number=1)


def _with_ambiguous_vr_in_a_sequence() -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.7", "1.2.826.0.1.3680043.8.498.99"
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = "Müller^Jörg"
    ds.PixelRepresentation = 1
    item = Dataset()
    item.add_new(0x00280106, "US or SS", -5)  # SmallestImagePixelValue, signed by the root's PixelRepresentation
    inner = Dataset()
    inner.add_new(0x00280107, "US or SS", -1)
    item.ReferencedImageSequence = [inner]
    ds.ReferencedSeriesSequence = [item]
    return ds


def test_encode_corrects_ambiguous_vrs_at_any_depth_like_pydicom():
    assert encode(_with_ambiguous_vr_in_a_sequence()) == plain_encode(_with_ambiguous_vr_in_a_sequence())


def test_encode_of_a_read_dataset_with_a_new_character_set_equals_pydicom():
    """Items read from a file keep pydicom's own handling (raw elements re-encoded in the new set)."""
    data = plain_encode(_with_ambiguous_vr_in_a_sequence())
    old, new = pydicom.dcmread(BytesIO(data)), pydicom.dcmread(BytesIO(data))
    for ds in (old, new):
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.ReferencedSeriesSequence[0].add_new(0x00081030, "LO", "Zürich")
    assert encode(new) == plain_encode(old)


def test_encode_skips_pydicoms_repeated_corrections(monkeypatch):
    """The detail `encode` relies on: a dataset marked with its written encoding is not corrected again."""
    import pydicom.filewriter as filewriter

    calls = []
    original = filewriter.correct_ambiguous_vr
    monkeypatch.setattr(filewriter, "correct_ambiguous_vr", lambda *a, **k: calls.append(a[0]) or original(*a, **k))
    monkeypatch.setattr(encoding, "correct_ambiguous_vr", filewriter.correct_ambiguous_vr)
    encode(_with_ambiguous_vr_in_a_sequence())
    corrected = [ds for ds in calls if not isinstance(ds, FileMetaDataset)]
    assert len(corrected) == 3  # ours, at the root and (recursing) its two items; pydicom's plain path: 6


def test_encode_leaves_the_objects_as_they_were(measured_ct):
    """`encode` swaps repeated code sequences for their bytes while it writes, and back."""
    ct, seg, result = measured_ct
    objects = build_results(ct, seg, result, EncodeOptions())
    for dataset in (objects.seg, objects.sr):
        first = encode(dataset)
        pending = [dataset]
        while pending:
            item = pending.pop()
            for element in item.values():
                assert not isinstance(element, RawDataElement)
                if element.VR == "SQ":
                    pending.extend(element.value)
        assert encode(dataset) == first == plain_encode(dataset)
