"""DICOM TLS both ways (issue 21) against real peers: dcmtk storescu/storescp with +tls, and Orthanc with DicomTls*.

The certificates come from tests/tls_certs.py (a site CA, as README "DICOM TLS" makes one). The receiver
listens for TLS only, requiring client certificates; refusals are checked by what the sender sees and by
nothing reaching the spool. The hostile-peer tests run on a TLS port too (tests/test_hostile_network.py).
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from dicom_peers import RecordingListener, free_port, storescp, storescu, write_ct_series
from orthanc import ORTHANC, Modality, Orthanc
from pynetdicom import AE, build_context
from pynetdicom.sop_class import CTImageStorage
from support import wait_until
from tls_certs import Pki, renewed_server

from node.config import DestinationConfig, ReceiverConfig, ReceiverTlsConfig, TlsClientConfig
from node.delivery.sender import echo, send_files
from node.ingest.receiver import Receiver
from node.ingest.spool import Spool
from node.tls import TlsError

AE_TITLE = "NODE"
TIMEOUT = ("-to", "10", "-ta", "10", "-td", "10")


@pytest.fixture
def make_receiver(tmp_path: Path) -> Iterator:
    made: list[Receiver] = []

    def make(pki: Pki, **tls: object) -> Receiver:
        config = ReceiverConfig(ae_title=AE_TITLE, port=free_port(), bind_address="127.0.0.1", min_free_disk_mb=1,
                                association_request_timeout_s=2.0)
        config.tls = ReceiverTlsConfig(port=free_port(), certificate=pki.server.certificate, private_key=pki.server.key,
                                       ca_certificates=pki.ca, plain_listener=False)
        for key, value in tls.items():
            setattr(config.tls, key, value)
        receiver = Receiver(config, Spool(tmp_path / f"spool{len(made)}"), RecordingListener())
        receiver.start()
        made.append(receiver)
        return receiver

    yield make
    for receiver in made:
        receiver.stop(grace_s=2)


def send(receiver: Receiver, folder: Path, *tls: str, calling: str = "MODALITY", count: int = 2):
    files = write_ct_series(folder, count, size=16)
    return storescu(receiver.tls_port, files, AE_TITLE, calling, *TIMEOUT, *tls, timeout_s=60)


def stored(receiver: Receiver) -> int:
    return len(receiver.listener.instances)


def test_storescu_with_a_client_certificate_stores_over_tls(make_receiver, pki: Pki, tmp_path: Path) -> None:
    receiver = make_receiver(pki)
    result = send(receiver, tmp_path / "a", *pki.client.dcmtk(pki.ca))
    assert result.returncode == 0, result.stderr
    assert stored(receiver) == 2
    with pytest.raises(RuntimeError):  # plain_listener = false: no plain port
        _ = receiver.port


def test_no_certificate_expired_wrong_ca_and_plain_dicom_are_refused(make_receiver, pki: Pki, tmp_path: Path,
                                                                     caplog) -> None:
    receiver = make_receiver(pki)
    caplog.set_level(logging.WARNING, logger="node.ingest.receiver")
    time.sleep(1.1)  # pki.expired expired a second after it was made
    attempts = {
        "no client certificate": ["+tla", "+cf", str(pki.ca)],
        "expired": pki.expired.dcmtk(pki.ca),
        "another CA": pki.stranger.dcmtk(pki.ca),
        "plain DICOM": [],
    }
    for name, options in attempts.items():
        result = send(receiver, tmp_path / name.replace(" ", "-"), *options)
        assert result.returncode != 0, f"{name}: storescu succeeded"
    assert stored(receiver) == 0
    refusals = [r.getMessage() for r in caplog.records if "event=tls_refused" in r.getMessage()]
    assert len(refusals) == 4, refusals
    assert any("EXPIRED" in line.upper() for line in refusals), refusals


def test_a_stalled_handshake_is_timed_out_while_storescu_succeeds(make_receiver, pki: Pki, tmp_path: Path) -> None:
    receiver = make_receiver(pki)
    stalled = [socket.create_connection(("127.0.0.1", receiver.tls_port), timeout=10) for _ in range(3)]
    stalled[0].sendall(b"\x16\x03\x01\x02\x00\x01")  # the start of a ClientHello, never finished
    try:
        started = time.monotonic()
        result = send(receiver, tmp_path / "a", *pki.client.dcmtk(pki.ca))
        assert result.returncode == 0, result.stderr
        assert time.monotonic() - started < 2.0, "storescu waited for the stalled handshakes"
        for sock in stalled:  # closed by the node after association_request_timeout_s (2 s)
            assert sock.recv(100) == b""
    finally:
        for sock in stalled:
            sock.close()


def test_a_calling_ae_tied_to_a_certificate_needs_that_certificate(make_receiver, pki: Pki, tmp_path: Path) -> None:
    receiver = make_receiver(pki, calling_ae_certificates=["MODALITY=modality", "CT9=ct9.hospital.example"])
    assert send(receiver, tmp_path / "a", *pki.client.dcmtk(pki.ca), calling="MODALITY").returncode == 0
    refused = send(receiver, tmp_path / "b", *pki.client.dcmtk(pki.ca), calling="CT9")
    assert refused.returncode != 0 and "Rejected" in refused.stderr + refused.stdout
    assert stored(receiver) == 2


def test_a_private_key_others_can_read_refuses_the_start(pki: Pki, tmp_path: Path) -> None:
    key = tmp_path / "key.pem"
    shutil.copy(pki.server.key, key)
    os.chmod(key, 0o644)
    config = ReceiverConfig(ae_title=AE_TITLE, port=free_port(), bind_address="127.0.0.1")
    config.tls = ReceiverTlsConfig(port=free_port(), certificate=pki.server.certificate, private_key=key,
                                   ca_certificates=pki.ca)
    with pytest.raises(TlsError, match="chmod 600"):
        Receiver(config, Spool(tmp_path / "spool"), RecordingListener()).start()


def test_changed_certificate_files_are_used_without_dropping_an_open_association(make_receiver, pki: Pki,
                                                                                  tmp_path: Path) -> None:
    folder = tmp_path / "served"
    folder.mkdir()
    certificate, key = folder / "node.pem", folder / "node.key"
    shutil.copy(pki.server.certificate, certificate)
    shutil.copy(pki.server.key, key)
    os.chmod(key, 0o600)
    receiver = make_receiver(pki, certificate=certificate, private_key=key)
    ae = AE(ae_title="MODALITY")
    context = pki.client.client_context(pki.ca)
    open_assoc = ae.associate("127.0.0.1", receiver.tls_port, [build_context(CTImageStorage)], ae_title=AE_TITLE,
                              tls_args=(context, "localhost"))
    assert open_assoc.is_established
    renewed = renewed_server(pki, tmp_path / "renewed", "node-renewed")
    shutil.copy(renewed.certificate, certificate)
    shutil.copy(renewed.key, key)

    def served_name() -> str:
        with socket.create_connection(("127.0.0.1", receiver.tls_port), timeout=10) as raw, \
                context.wrap_socket(raw, server_hostname="localhost") as tls:
            return dict(rdn[0] for rdn in tls.getpeercert()["subject"])["commonName"]

    wait_until(lambda: served_name() == "node-renewed", "the renewed certificate served", timeout_s=10)
    assert open_assoc.is_established, "the open association was dropped by the reload"
    open_assoc.release()
    assert open_assoc.is_released


def test_results_go_to_storescp_over_mutual_tls_and_a_wrong_ca_or_name_fails(pki: Pki, tmp_path: Path) -> None:
    files = write_ct_series(tmp_path / "out", 2, size=16)
    with storescp(tmp_path / "pacs", "PACS", *pki.server.dcmtk(pki.ca), "-rc") as port:
        good = DestinationConfig("PACS", "127.0.0.1", port, TlsClientConfig(
            ca_certificates=pki.ca, certificate=pki.client.certificate, private_key=pki.client.key))
        assert all(o.ok for o in send_files(good, files, "NODE", 10)), "mutual TLS send failed"
        wrong_ca = DestinationConfig("PACS", "127.0.0.1", port, TlsClientConfig(
            ca_certificates=pki.other_ca, certificate=pki.client.certificate, private_key=pki.client.key))
        outcome = send_files(wrong_ca, files, "NODE", 10)[0]
        assert not outcome.ok and "TLS" in outcome.message
        wrong_name = DestinationConfig("PACS", "127.0.0.1", port, TlsClientConfig(
            ca_certificates=pki.ca, certificate=pki.client.certificate, private_key=pki.client.key,
            server_name="pacs.elsewhere.example"))
        assert not echo(wrong_name, "NODE", 10).ok
        no_client_certificate = DestinationConfig("PACS", "127.0.0.1", port, TlsClientConfig(ca_certificates=pki.ca))
        assert not echo(no_client_certificate, "NODE", 10).ok  # storescp -rc requires one
    assert len(list((tmp_path / "pacs").iterdir())) == 2


@pytest.mark.skipif(not ORTHANC.exists(), reason=f"{ORTHANC} missing: apt-get install orthanc")
def test_orthanc_sends_to_the_node_and_receives_from_it_over_tls(make_receiver, pki: Pki, tmp_path: Path) -> None:
    receiver = make_receiver(pki)
    tls = {"DicomTlsEnabled": True, "DicomTlsCertificate": str(pki.server.certificate),
           "DicomTlsPrivateKey": str(pki.server.key), "DicomTlsTrustedCertificates": str(pki.ca),
           "DicomTlsRemoteCertificateRequired": True, "DicomAlwaysAllowStore": True}
    pacs = Orthanc(tmp_path / "orthanc", {"node": Modality(AE_TITLE, receiver.tls_port, tls=True),
                                          "nodescu": Modality("NODESCU", 1, tls=True)}, "ORTHANC", tls)
    pacs.start()
    try:
        study = write_ct_series(tmp_path / "study", 3, size=16)
        ids = pacs.upload(study)
        pacs.store("node", ids)
        assert stored(receiver) == 3
        files = write_ct_series(tmp_path / "results", 1, size=16)
        destination = DestinationConfig("ORTHANC", "127.0.0.1", pacs.dicom_port, TlsClientConfig(
            ca_certificates=pki.ca, certificate=pki.client.certificate, private_key=pki.client.key))
        assert send_files(destination, files, "NODESCU", 10)[0].ok
        plain = DestinationConfig("ORTHANC", "127.0.0.1", pacs.dicom_port)
        assert not send_files(plain, files, "NODESCU", 10)[0].ok  # Orthanc's DICOM port speaks TLS only
        assert len(pacs.get("/instances")) == 4
    finally:
        pacs.stop()
