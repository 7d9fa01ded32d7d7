"""The C-STORE/C-ECHO SCU against real peers: dcmtk storescp and a pynetdicom SCP answering a warning."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from dicom_peers import ct_dataset, free_port, storescp
from pydicom.dataset import Dataset
from pydicom.uid import ImplicitVRLittleEndian, RLELossless, generate_uid
from pynetdicom import AE, evt

from node.config import DestinationConfig
from node.delivery.sender import echo, send_files

SEG = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
TIMEOUT_S = 10


@pytest.fixture
def results(tmp_path: Path) -> list[Path]:
    """A SEG, an SR (implicit VR) and an RLE-compressed Secondary Capture, as the worker writes them."""
    study_uid = generate_uid()
    seg = ct_dataset(study_uid, generate_uid(), 0, sop_class=SEG)
    sr = _sr(study_uid)
    capture = ct_dataset(study_uid, generate_uid(), 0, sop_class=SECONDARY_CAPTURE)
    capture.compress(RLELossless)
    paths = []
    for name, dataset in (("seg.dcm", seg), ("sr.dcm", sr), ("key.dcm", capture)):
        dataset.save_as(tmp_path / name, enforce_file_format=True)
        paths.append(tmp_path / name)
    return paths


def _sr(study_uid: str) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = COMPREHENSIVE_3D_SR, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, generate_uid()
    ds.Modality, ds.ValueType = "SR", "CONTAINER"
    ds.ensure_file_meta()
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    return ds


def destination(port: int, ae_title: str = "STORESCP") -> DestinationConfig:
    return DestinationConfig(ae_title=ae_title, host="127.0.0.1", port=port)


def test_results_arrive_at_storescp(results: list[Path], tmp_path: Path) -> None:
    received = tmp_path / "received"
    with storescp(received) as port:
        outcomes = send_files(destination(port), results, "PARASPINAL", TIMEOUT_S)

    assert [(o.path, o.ok, o.status, o.message) for o in outcomes] == [(p, True, 0, "") for p in results]
    arrived = {str(pydicom.dcmread(p).SOPInstanceUID): pydicom.dcmread(p) for p in received.iterdir()}
    for path in results:
        sent = pydicom.dcmread(path)
        assert arrived[str(sent.SOPInstanceUID)].SOPClassUID == sent.SOPClassUID
    capture = arrived[str(pydicom.dcmread(results[2]).SOPInstanceUID)]
    assert capture.file_meta.TransferSyntaxUID == RLELossless


def test_refusing_peer_gives_a_failure_per_file(results: list[Path], tmp_path: Path) -> None:
    with storescp(tmp_path / "received", "STORESCP", "--refuse") as port:
        outcomes = send_files(destination(port), results, "PARASPINAL", TIMEOUT_S)

    assert [o.ok for o in outcomes] == [False] * 3
    # storescp closes the connection as it rejects; under load pynetdicom can see the close before
    # it parses the rejection, and then reports an abort. Either way: no status, a reason, no retry storm.
    messages = [o.message for o in outcomes]
    assert all(o.status is None and ("rejected" in o.message or "aborted" in o.message) for o in outcomes), messages


def test_absent_peer_gives_a_failure_per_file(results: list[Path]) -> None:
    outcomes = send_files(destination(free_port()), results, "PARASPINAL", TIMEOUT_S)

    assert [o.ok for o in outcomes] == [False] * 3
    assert all("no connection" in o.message for o in outcomes)


def test_unreadable_file_fails_alone(results: list[Path], tmp_path: Path) -> None:
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"not dicom")
    with storescp(tmp_path / "received") as port:
        outcomes = send_files(destination(port), [broken, *results], "PARASPINAL", TIMEOUT_S)

    assert [o.ok for o in outcomes] == [False, True, True, True]
    assert "cannot read broken.dcm" in outcomes[0].message


@pytest.fixture
def warning_peer() -> Iterator[int]:
    """A pynetdicom SCP that stores nothing and answers 0xB007 (coercion of data elements)."""
    ae = AE(ae_title="WARNSCP")
    for sop_class in (SEG, COMPREHENSIVE_3D_SR, SECONDARY_CAPTURE):
        ae.add_supported_context(sop_class, [ImplicitVRLittleEndian, "1.2.840.10008.1.2.1", RLELossless])
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, lambda event: 0xB007)])
    yield port
    server.shutdown()


def test_warning_status_is_reported_and_not_ok(results: list[Path], warning_peer: int) -> None:
    outcomes = send_files(destination(warning_peer, "WARNSCP"), results, "PARASPINAL", TIMEOUT_S)

    assert [(o.ok, o.status, o.is_warning) for o in outcomes] == [(False, 0xB007, True)] * 3
    assert "0xB007" in outcomes[0].message


def test_echo(tmp_path: Path) -> None:
    with storescp(tmp_path / "received") as port:
        assert echo(destination(port), "PARASPINAL", TIMEOUT_S).ok
    absent = echo(destination(free_port()), "PARASPINAL", TIMEOUT_S)
    assert not absent.ok
    assert "no connection" in absent.describe()
