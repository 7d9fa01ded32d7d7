"""The storage SCP against real peers on loopback: dcmtk storescu/echoscu and pynetdicom SCUs."""

from __future__ import annotations

import logging
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from dicom_peers import (
    RecordingListener,
    ct_dataset,
    dataset_bytes,
    dcmtk_env,
    echoscu,
    free_port,
    storescu,
    write_ct_series,
)
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from pynetdicom import AE, build_context
from pynetdicom.sop_class import Verification
from pynetdicom.status import STATUS_FAILURE, STORAGE_SERVICE_CLASS_STATUS

from node.config import CompletionConfig, ReceiverConfig, SelectionConfig
from node.ingest.dicom import ENHANCED_CT_IMAGE_STORAGE
from node.ingest.receiver import Receiver, StoreStatus
from node.ingest.series import SeriesTracker
from node.ingest.spool import Spool, StoreOutcome
from node.state.pending import WaitReason
from node.state.store import State

AE_TITLE = "NODE"


class Node:
    """A started Receiver with its spool and listener, for one test."""

    def __init__(self, tmp_path: Path, **overrides: object) -> None:
        config = ReceiverConfig(ae_title=AE_TITLE, port=free_port(), bind_address="127.0.0.1", min_free_disk_mb=1)
        for key, value in overrides.items():
            setattr(config, key, value)
        self.spool = Spool(tmp_path / "spool")
        self.listener = RecordingListener()
        self.receiver = Receiver(config, self.spool, self.listener)
        self.receiver.start()
        self.port = self.receiver.port

    def spooled(self) -> list[Path]:
        return sorted(self.spool.root.glob("*/*/*.dcm"))


@pytest.fixture
def make_node(tmp_path: Path) -> Iterator:
    nodes: list[Node] = []

    def make(**overrides: object) -> Node:
        nodes.append(Node(tmp_path, **overrides))
        return nodes[-1]

    yield make
    for node in nodes:
        node.receiver.stop(grace_s=2)


def scu(port: int, contexts: list, calling_ae: str = "PYSCU"):
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    return ae.associate("127.0.0.1", port, contexts, ae_title=AE_TITLE)


def store_one(port: int, dataset: pydicom.Dataset) -> int:
    assoc = scu(port, [build_context(dataset.SOPClassUID)])
    assert assoc.is_established
    try:
        return int(assoc.send_c_store(dataset).Status)
    finally:
        assoc.release()


def test_storescu_series_is_spooled_byte_for_byte_and_reported(make_node, tmp_path: Path) -> None:
    node = make_node()
    sent = write_ct_series(tmp_path / "in", 5)

    result = storescu(node.port, sent, AE_TITLE, "MODALITY")

    assert result.returncode == 0, result.stderr
    (association_id,) = node.listener.wait_released(1)
    spooled = {p.name: p for p in node.spooled()}
    for path in sent:
        sop = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        assert dataset_bytes(spooled[f"{sop}.dcm"]) == dataset_bytes(path)
    instances = node.listener.instances
    assert len(instances) == 5
    assert {i.association_id for i in instances} == {association_id}
    first = instances[0]
    assert (first.calling_ae, first.modality, first.image_type) == ("MODALITY", "CT", ("ORIGINAL", "PRIMARY", "AXIAL"))
    assert (first.slice_thickness, first.convolution_kernel, first.patient_id) == (1.0, "B30f", "PID0001")


def _compress(tool: list[str], source: Path, target: Path) -> Path:
    subprocess.run([*tool, str(source), str(target)], check=True, env=dcmtk_env(), capture_output=True)
    return target


@pytest.mark.parametrize(
    ("tool", "propose", "transfer_syntax"),
    [
        (["dcmcjpls"], "-xt", "1.2.840.10008.1.2.4.80"),
        (["dcmcjpeg"], "-xs", "1.2.840.10008.1.2.4.70"),
        (["dcmcrle"], "-xr", "1.2.840.10008.1.2.5"),
    ],
)
def test_compressed_transfer_syntaxes_are_kept_as_sent(make_node, tmp_path: Path, tool, propose, transfer_syntax) -> None:
    node = make_node()
    (source,) = write_ct_series(tmp_path / "in", 1)
    compressed = _compress(tool, source, tmp_path / "compressed.dcm")

    result = storescu(node.port, [compressed], AE_TITLE, "MODALITY", "-R", propose)  # the syntax and uncompressed

    assert result.returncode == 0, result.stderr
    node.listener.wait_released(1)
    (instance,) = node.listener.instances
    assert instance.transfer_syntax_uid == transfer_syntax
    assert dataset_bytes(instance.path) == dataset_bytes(compressed)


def test_deflate_is_accepted_and_kept(make_node) -> None:
    node = make_node()
    dataset = ct_dataset(generate_uid(), generate_uid(), 0)
    assoc = scu(node.port, [build_context(CTImageStorage, DeflatedExplicitVRLittleEndian)])
    status = assoc.send_c_store(dataset)
    assoc.release()

    assert status.Status == 0x0000
    (path,) = node.spooled()
    stored = pydicom.dcmread(path)
    assert stored.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
    assert stored.PixelData == dataset.PixelData


def _with_uids(source: Path, target: Path, study_uid: str, series_uid: str) -> Path:
    """A copy of an example file (anonymised to blank UIDs, which storescu refuses) with UIDs put back."""
    dataset = pydicom.dcmread(source)
    dataset.SOPClassUID = dataset.file_meta.MediaStorageSOPClassUID
    dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID
    dataset.StudyInstanceUID, dataset.SeriesInstanceUID = study_uid, series_uid
    dataset.save_as(target, enforce_file_format=True)
    return target


@pytest.mark.parametrize("transfer_syntax", [ImplicitVRLittleEndian, ExplicitVRBigEndian])
def test_header_is_read_in_the_negotiated_transfer_syntax(make_node, transfer_syntax: str) -> None:
    node = make_node()
    dataset = ct_dataset(generate_uid(), generate_uid(), 3)
    dataset.file_meta.TransferSyntaxUID = transfer_syntax
    assoc = scu(node.port, [build_context(CTImageStorage, transfer_syntax)])
    status = assoc.send_c_store(dataset)
    assoc.release()

    assert status.Status == 0x0000
    node.listener.wait_released(1)
    (instance,) = node.listener.instances
    assert (instance.transfer_syntax_uid, instance.sop_instance_uid) == (transfer_syntax, dataset.SOPInstanceUID)
    assert (instance.series_uid, instance.instance_number, instance.slice_thickness) == (
        dataset.SeriesInstanceUID, dataset.InstanceNumber, float(dataset.SliceThickness))
    stored = pydicom.dcmread(instance.path)
    assert stored.file_meta.MediaStorageSOPInstanceUID == dataset.SOPInstanceUID
    assert stored.file_meta.MediaStorageSOPClassUID == CTImageStorage
    assert stored.pixel_array.tolist() == dataset.pixel_array.tolist()


def test_jpeg2000_series_from_a_scanner(make_node, tmp_path: Path, real_ct: Path) -> None:
    node = make_node()
    study_uid, series_uid = generate_uid(), generate_uid()
    files = [_with_uids(p, tmp_path / f"{i}.dcm", study_uid, series_uid) for i, p in enumerate(sorted(real_ct.iterdir()))]

    result = storescu(node.port, files, AE_TITLE, "MODALITY", "-R", "-xv")

    assert result.returncode == 0, result.stderr
    node.listener.wait_released(1)
    assert len(node.spooled()) == len(files)
    assert {i.transfer_syntax_uid for i in node.listener.instances} == {"1.2.840.10008.1.2.4.90"}
    for path in files:
        sop = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
        (spooled,) = [i.path for i in node.listener.instances if i.sop_instance_uid == sop]
        assert dataset_bytes(spooled) == dataset_bytes(path)


def test_echo_from_dcmtk_and_pynetdicom(make_node) -> None:
    node = make_node()

    assert echoscu(node.port, AE_TITLE).returncode == 0
    assoc = scu(node.port, [build_context(Verification)])
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()


def test_calling_ae_outside_allowlist_is_rejected_and_logged(make_node, tmp_path: Path, caplog) -> None:
    node = make_node(allowed_calling_aes=["MODALITY"])
    sent = write_ct_series(tmp_path / "in", 1)

    with caplog.at_level(logging.WARNING, logger="node.ingest.receiver"):
        refused = storescu(node.port, sent, AE_TITLE, "INTRUDER")
        accepted = storescu(node.port, sent, AE_TITLE, "MODALITY")

    assert refused.returncode != 0
    assert accepted.returncode == 0, accepted.stderr
    assert any("association_rejected" in m and "calling_ae=INTRUDER" in m for m in caplog.messages)
    node.listener.wait_released(1)
    assert [i.calling_ae for i in node.listener.instances] == ["MODALITY"]


def test_associations_beyond_the_maximum_are_rejected(make_node) -> None:
    node = make_node(max_associations=1)
    first = scu(node.port, [build_context(Verification)])
    assert first.is_established
    try:
        second = scu(node.port, [build_context(Verification)])
        assert second.is_rejected
    finally:
        first.release()
    node.listener.wait_released(1)
    third = scu(node.port, [build_context(Verification)])
    assert third.is_established
    third.release()


def test_low_disk_answers_out_of_resources_and_spools_nothing(make_node) -> None:
    node = make_node(min_free_disk_mb=10**12)
    dataset = ct_dataset(generate_uid(), generate_uid(), 0)

    assert store_one(node.port, dataset) == 0xA700
    assert node.spooled() == []
    assert node.listener.instances == []


def test_duplicate_is_idempotent_and_changed_content_replaces(make_node) -> None:
    node = make_node()
    dataset = ct_dataset(generate_uid(), generate_uid(), 0)

    assert store_one(node.port, dataset) == 0x0000
    assert store_one(node.port, dataset) == 0x0000
    dataset.SeriesDescription = "corrected"
    assert store_one(node.port, dataset) == 0x0000

    node.listener.wait_released(3)
    assert [i.outcome for i in node.listener.instances] == [StoreOutcome.NEW, StoreOutcome.DUPLICATE, StoreOutcome.REPLACED]
    (path,) = node.spooled()
    assert pydicom.dcmread(path).SeriesDescription == "corrected"


def test_enhanced_ct_is_refused_with_a_reason(make_node) -> None:
    node = make_node()
    dataset = ct_dataset(generate_uid(), generate_uid(), 0, sop_class=ENHANCED_CT_IMAGE_STORAGE)
    assoc = scu(node.port, [build_context(ENHANCED_CT_IMAGE_STORAGE)])
    status = assoc.send_c_store(dataset)
    assoc.release()

    assert status.Status == 0x0122
    assert "Enhanced CT" in status.ErrorComment
    assert node.spooled() == []


def test_other_storage_is_accepted_and_discarded_by_default(make_node) -> None:
    node = make_node()
    scout = ct_dataset(generate_uid(), generate_uid(), 0, sop_class=SecondaryCaptureImageStorage)

    assert store_one(node.port, scout) == 0x0000
    assert node.spooled() == []
    assert node.listener.instances == []


def test_other_storage_is_not_offered_when_switched_off(make_node) -> None:
    node = make_node(accept_other_storage=False)
    assoc = scu(node.port, [build_context(SecondaryCaptureImageStorage), build_context(CTImageStorage)])
    assert assoc.is_established
    accepted = {cx.abstract_syntax for cx in assoc.accepted_contexts}
    assoc.release()

    assert accepted == {CTImageStorage}


def test_stop_lets_the_open_association_finish_then_refuses_new_ones(make_node) -> None:
    node = make_node()
    dataset = ct_dataset(generate_uid(), generate_uid(), 0)
    assoc = scu(node.port, [build_context(CTImageStorage)])
    assert assoc.is_established
    stopper = threading.Thread(target=node.receiver.stop, kwargs={"grace_s": 10})
    stopper.start()

    status = assoc.send_c_store(dataset)
    assoc.release()
    stopper.join(timeout=20)

    assert status.Status == 0x0000
    assert len(node.spooled()) == 1
    assert not stopper.is_alive()
    assert not scu(node.port, [build_context(Verification)]).is_established


def test_aborted_send_waits_for_the_senders_resend(tmp_path: Path, caplog) -> None:
    now = [1000.0]
    state = State(tmp_path / "state.sqlite")
    spool = Spool(tmp_path / "spool")
    tracker = SeriesTracker(spool, state, CompletionConfig(release_quiet_s=5, idle_quiet_s=60),
                            SelectionConfig(min_slices=1), clock=lambda: now[0])
    config = ReceiverConfig(ae_title=AE_TITLE, port=free_port(), bind_address="127.0.0.1", min_free_disk_mb=1)
    receiver = Receiver(config, spool, tracker)
    receiver.start()
    study_uid, series_uid = generate_uid(), generate_uid()
    try:
        with caplog.at_level(logging.INFO, logger="node.ingest.receiver"):
            assoc = scu(receiver.port, [build_context(CTImageStorage)])
            for index in range(3):  # then the network drops, halfway through the series
                assert assoc.send_c_store(ct_dataset(study_uid, series_uid, index, size=8)).Status == 0x0000
            assoc.abort()
            deadline = time.monotonic() + 20
            while not any("event=association_aborted " in m for m in caplog.messages):
                assert time.monotonic() < deadline, "the receiver did not notice the abort"
                time.sleep(0.05)
        now[0] += 3600  # neither the release period nor the idle period completes a cut-off series
        assert tracker.tick() == []
        assert [w.reason for w in tracker.waiting()] == [WaitReason.ABORTED]
    finally:
        receiver.stop(grace_s=2)
        state.close()


def test_every_refusal_status_is_a_storage_failure_in_pynetdicoms_table() -> None:
    refusals = [status for status in StoreStatus if status is not StoreStatus.SUCCESS]
    assert {STORAGE_SERVICE_CLASS_STATUS[status][0] for status in refusals} == {STATUS_FAILURE}
