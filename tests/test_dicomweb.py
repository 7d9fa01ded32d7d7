"""DICOMweb between serve and remote workers: the real routes on a real uvicorn socket, a real SQLite state
with a claimed job, phantom CT files in the spool, and the real dicomweb-client on the worker's side."""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import phantom as ph
import pydicom
import pytest
import requests
from dicom_peers import free_port
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from node.config import Config, ConfigError, DestinationConfig, DicomwebConfig, StorageConfig, load_config
from node.service.dicomweb_client import ClientSettings, LeaseLost, TokenError, TransferError, fetch_series, job_url, read_token, store_results
from node.service.serve import Service, StartError
from node.state.store import Job, SeriesRecord, State
from node.web.dicomweb import attempt_outbox
from node.web.dicomweb_server import DicomwebServer

WORKER_TOKEN = "a1b2c3d4e5f60718293a4b5c6d7e8f90"
PACS = [DestinationConfig("PACS", "127.0.0.1", 11112), DestinationConfig("ARCHIVE", "127.0.0.1", 11113)]
QUICK = {"attempts": 2, "backoff_s": 0.05, "timeout_s": 10.0}


@dataclass
class Node:
    config: Config
    state: State
    server: DicomwebServer
    series: SeriesRecord
    job: Job
    url: str
    settings: ClientSettings
    spool: list[Path]


def _token_file(folder: Path, text: str = WORKER_TOKEN, mode: int = 0o600) -> Path:
    path = folder / "worker-token"
    path.write_text(text + "\n")
    path.chmod(mode)
    return path


def _spool_series(state_dir: Path, series: ph.DicomSeries) -> list[Path]:
    folder = state_dir / "spool" / series.study_uid / series.series_uid
    folder.mkdir(parents=True)
    for path, uid in zip(series.paths, series.sop_instance_uids):
        shutil.copyfile(path, folder / f"{uid}.dcm")
    return sorted(folder.glob("*.dcm"))


def _start(tmp_path: Path, series: ph.DicomSeries, dicomweb: DicomwebConfig | None = None,
           settings: ClientSettings | None = None) -> Node:
    state_dir = tmp_path / "state"
    spool = _spool_series(state_dir, series)
    dicomweb = dicomweb or DicomwebConfig(enabled=True, bind="127.0.0.1", port=0, url="http://127.0.0.1:0",
                                          token_file=_token_file(tmp_path))
    config = Config(storage=StorageConfig(state_dir=state_dir), destinations=PACS, dicomweb=dicomweb)
    state = State(state_dir / "state.sqlite")
    record = SeriesRecord(series.series_uid, series.study_uid, "PHANTOM-0", "ACC", "20240102", "CT", "thorax",
                          len(spool), "fingerprint", str(spool[0].parent))
    state.record_series(record)
    state.add_job(record.series_uid, record.fingerprint, record.series_dir)
    job = state.claim("remote-worker", 60.0, 3)
    server = DicomwebServer(config, state)
    server.start()
    scheme = "https" if dicomweb.tls_certificate else "http"
    return Node(config, state, server, record, job, f"{scheme}://127.0.0.1:{server.port}",
                settings or ClientSettings(WORKER_TOKEN, **QUICK), spool)


@pytest.fixture
def node(tmp_path: Path, phantom_dicom) -> Iterator[Node]:
    started = _start(tmp_path, phantom_dicom())
    yield started
    started.server.stop()
    started.state.close()


def _results(study_uid: str, count: int = 3) -> list[Dataset]:
    """Small Part 10 stand-ins for the SEG, SR and key image of the job's study."""
    out = []
    for i in range(count):
        ds = Dataset()
        ds.SOPClassUID = SecondaryCaptureImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = generate_uid()
        ds.Modality = "OT"
        ds.InstanceNumber = i + 1
        ds.Rows = ds.Columns = 8
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.PixelData = bytes(range(i, i + 64))
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        out.append(ds)
    return out


def _write(datasets: list[Dataset], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in datasets:
        paths.append(folder / f"{ds.SOPInstanceUID}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    return paths


def _attempt_files(node: Node, token: int | None = None) -> list[Path]:
    folder = attempt_outbox(node.config, node.job.id, node.job.token if token is None else token)
    return sorted(folder.glob("*.dcm")) if folder.is_dir() else []


# WADO-RS ------------------------------------------------------------------------------------------


def test_fetch_writes_every_instance_byte_identical(node: Node, tmp_path: Path) -> None:
    into = tmp_path / "fetched"
    assert fetch_series(node.url, node.job, node.series, into, node.settings) == len(node.spool)
    fetched = sorted(into.glob("*.dcm"))
    assert [p.name for p in fetched] == [p.name for p in node.spool]
    for mine, theirs in zip(fetched, node.spool):
        assert mine.read_bytes() == theirs.read_bytes()
        assert pydicom.dcmread(mine).PixelData == pydicom.dcmread(theirs).PixelData


def test_each_part_names_its_transfer_syntax_and_other_series_are_not_served(node: Node) -> None:
    base = job_url(node.url, node.job.id, node.job.token)
    auth = {"Authorization": f"Bearer {WORKER_TOKEN}"}
    response = requests.get(f"{base}/studies/{node.series.study_uid}/series/{node.series.series_uid}",
                            headers={**auth, "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'},
                            timeout=30)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith('multipart/related; type="application/dicom"')
    assert response.content.count(b"Content-Type: application/dicom; transfer-syntax=1.2.840.10008.1.2.1\r\n") \
        == len(node.spool)
    other = requests.get(f"{base}/studies/{node.series.study_uid}/series/1.2.3.4", headers=auth, timeout=30)
    assert other.status_code == 404 and "not of job" in other.text
    json_only = requests.get(f"{base}/studies/{node.series.study_uid}/series/{node.series.series_uid}",
                             headers={**auth, "Accept": "application/dicom+json"}, timeout=30)
    assert json_only.status_code == 406


def test_a_partner_series_of_the_same_study_is_served_and_other_studies_are_not(node: Node, tmp_path: Path,
                                                                                phantom_dicom) -> None:
    """A Dixon water series' job may fetch the fat series beside it in the spool; nothing of another study."""
    partner_files = _spool_series(node.config.storage.state_dir, phantom_dicom("flipped"))
    partner = replace(node.series, series_uid=partner_files[0].parent.name, series_dir=str(partner_files[0].parent),
                      instances=len(partner_files))
    node.state.record_series(partner)
    fetched = fetch_series(node.url, node.job, partner, tmp_path / "partner", node.settings)
    assert fetched == len(partner_files)
    stranger = replace(partner, series_uid="1.2.999.7", study_uid="1.2.999")
    node.state.record_series(stranger)
    with pytest.raises(TransferError, match="404"):
        fetch_series(node.url, node.job, stranger, tmp_path / "stranger", node.settings)


def test_wrong_or_missing_worker_token_is_refused_with_401(node: Node, tmp_path: Path) -> None:
    base = job_url(node.url, node.job.id, node.job.token)
    series_url = f"{base}/studies/{node.series.study_uid}/series/{node.series.series_uid}"
    assert requests.get(series_url, timeout=30).status_code == 401
    assert requests.get(series_url, headers={"Authorization": "Bearer nope"}, timeout=30).status_code == 401
    assert requests.post(f"{base}/studies", headers={"Authorization": "Bearer nope"}, data=b"x",
                         timeout=30).status_code == 401
    with pytest.raises(TransferError, match="401") as caught:
        fetch_series(node.url, node.job, node.series, tmp_path / "fetched", replace(node.settings, token="nope"))
    assert not isinstance(caught.value, LeaseLost)
    assert not list((tmp_path / "fetched").glob("*"))
    with pytest.raises(TransferError, match="401"):
        store_results(node.url, node.job, _write(_results(node.series.study_uid), tmp_path / "out"),
                      replace(node.settings, token="nope"))
    assert _attempt_files(node) == []


def test_a_stale_attempt_gets_409_and_nothing_is_stored_or_staged(node: Node, tmp_path: Path) -> None:
    stale = node.job
    assert node.state.release(stale.id, stale.token)
    fresh = node.state.claim("another-worker", 60.0, 3)
    assert fresh.id == stale.id and fresh.token != stale.token
    with pytest.raises(LeaseLost, match="lease"):
        fetch_series(node.url, stale, node.series, tmp_path / "fetched", node.settings)
    files = _write(_results(node.series.study_uid), tmp_path / "out")
    with pytest.raises(LeaseLost):
        store_results(node.url, stale, files, node.settings)
    assert _attempt_files(node, stale.token) == []
    assert node.state.complete(fresh.id, fresh.token, {}, [])
    assert node.state.deliveries(fresh.id) == []  # nothing the stale attempt sent was staged


def test_an_expired_lease_is_refused(tmp_path: Path, phantom_dicom) -> None:
    node = _start(tmp_path, phantom_dicom())
    try:
        assert node.state.release(node.job.id, node.job.token)
        short = node.state.claim("slow-worker", 0.2, 3)
        time.sleep(0.5)
        with pytest.raises(LeaseLost):
            fetch_series(node.url, short, node.series, tmp_path / "fetched", node.settings)
    finally:
        node.server.stop()
        node.state.close()


def test_a_series_short_in_the_spool_is_a_transfer_error(node: Node, tmp_path: Path) -> None:
    node.spool[7].unlink()
    into = tmp_path / "fetched"
    with pytest.raises(TransferError, match=f"{len(node.spool) - 1} of {len(node.spool)} instances"):
        fetch_series(node.url, node.job, node.series, into, node.settings)
    assert not list(into.glob("*.dcm"))  # a short series never looks whole


class CuttingProxy:
    """A TCP proxy to the server that closes both sides after `limit` bytes of answer."""

    def __init__(self, target_port: int, limit: int) -> None:
        self.limit = limit
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.cuts = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target_port))
            threading.Thread(target=self._pipe, args=(client, server, None), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, self.limit), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, limit: int | None) -> None:
        sent = 0
        try:
            while data := source.recv(65536):
                if limit is not None and sent + len(data) >= limit:
                    sink.sendall(data[:limit - sent])
                    self.cuts += 1
                    break
                sink.sendall(data)
                sent += len(data)
        except OSError:
            pass
        for sock in (source, sink):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def close(self) -> None:
        self.listener.close()


def test_a_fetch_cut_mid_transfer_raises_transfer_error_and_leaves_no_files(node: Node, tmp_path: Path) -> None:
    total = sum(p.stat().st_size for p in node.spool)
    proxy = CuttingProxy(node.server.port, total // 2)
    into = tmp_path / "fetched"
    try:
        with pytest.raises(TransferError, match="cut|connection|unreadable") as caught:
            fetch_series(f"http://127.0.0.1:{proxy.port}", node.job, node.series, into, node.settings)
    finally:
        proxy.close()
    assert not isinstance(caught.value, LeaseLost)
    assert proxy.cuts == node.settings.attempts  # retried, then gave up
    assert not list(into.glob("*.dcm"))
    assert "after 2 tries" in str(caught.value)


def test_fetch_retries_while_serve_restarts(node: Node, tmp_path: Path) -> None:
    port = node.server.port
    node.server.stop()
    restarted = DicomwebServer(replace(node.config, dicomweb=replace(node.config.dicomweb, port=port)), node.state)
    timer = threading.Timer(0.3, restarted.start)
    timer.start()
    try:
        settings = replace(node.settings, attempts=5, backoff_s=0.2)
        assert fetch_series(node.url, node.job, node.series, tmp_path / "fetched", settings) == len(node.spool)
    finally:
        timer.join()
        restarted.stop()


# STOW-RS ------------------------------------------------------------------------------------------


def test_stow_stores_durably_and_stages_until_completion(node: Node, tmp_path: Path) -> None:
    datasets = _results(node.series.study_uid)
    files = _write(datasets, tmp_path / "out")
    stored = store_results(node.url, node.job, files, node.settings)
    assert stored == [str(ds.SOPInstanceUID) for ds in datasets]
    kept = _attempt_files(node)
    assert [p.name for p in kept] == sorted(p.name for p in files)
    by_uid = {f"{ds.SOPInstanceUID}.dcm": ds for ds in datasets}
    for path in kept:
        assert pydicom.dcmread(path).PixelData == by_uid[path.name].PixelData
    assert node.state.deliveries(node.job.id) == []  # staged, not pending, until the job completes
    assert node.state.complete(node.job.id, node.job.token, {}, [])
    rows = node.state.deliveries(node.job.id)
    assert sorted((d.destination, Path(d.file).name) for d in rows) == sorted(
        (f"{p.ae_title}@{p.host}:{p.port}", path.name) for p in PACS for path in kept)
    assert {Path(d.file).parent for d in rows} == {attempt_outbox(node.config, node.job.id, node.job.token)}


def test_a_repeated_stow_is_idempotent(node: Node, tmp_path: Path) -> None:
    files = _write(_results(node.series.study_uid), tmp_path / "out")
    first = store_results(node.url, node.job, files, node.settings)
    contents = {p.name: p.read_bytes() for p in _attempt_files(node)}
    assert store_results(node.url, node.job, files, node.settings) == first
    assert {p.name: p.read_bytes() for p in _attempt_files(node)} == contents
    assert node.state.complete(node.job.id, node.job.token, {}, [])
    assert len(node.state.deliveries(node.job.id)) == len(files) * len(PACS)


def test_stow_refuses_other_studies_changed_content_and_non_dicom(node: Node, tmp_path: Path) -> None:
    foreign = _write(_results("1.2.999.1", 1), tmp_path / "foreign")
    with pytest.raises(TransferError, match="404: study 1.2.999.1 is not job"):
        store_results(node.url, node.job, foreign, node.settings)
    assert _attempt_files(node) == []
    base = job_url(node.url, node.job.id, node.job.token)
    auth = {"Authorization": f"Bearer {WORKER_TOKEN}"}
    ours = _results(node.series.study_uid, 1)
    mixed = b"".join(b"--XX\r\nContent-Type: application/dicom\r\n\r\n" + path.read_bytes() + b"\r\n"
                     for path in (*foreign, *_write(ours, tmp_path / "a"))) + b"--XX--\r\n"
    answer = requests.post(f"{base}/studies", data=mixed, timeout=30, headers={
        **auth, "Content-Type": 'multipart/related; type="application/dicom"; boundary=XX'})
    assert answer.status_code == 202  # some stored, some not
    assert answer.json()["00081199"]["Value"][0]["00081155"]["Value"] == [ours[0].SOPInstanceUID]
    assert answer.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0xA900]
    assert "not the job's study" in answer.headers["Warning"]
    ours[0].PixelData = bytes(64)  # same SOP Instance UID, other content: what was acknowledged never changes
    with pytest.raises(TransferError, match="0x0111"):
        store_results(node.url, node.job, _write(ours, tmp_path / "b"), node.settings)
    not_multipart = requests.post(f"{base}/studies", headers={**auth, "Content-Type": "application/dicom"},
                                  data=b"x", timeout=30)
    assert not_multipart.status_code == 415
    junk = requests.post(f"{base}/studies", headers={**auth, "Content-Type": 'multipart/related; '
                                                     'type="application/dicom"; boundary=XX'},
                         data=b"--XX\r\nContent-Type: application/dicom\r\n\r\nnot dicom\r\n--XX--\r\n", timeout=30)
    assert junk.status_code == 409
    assert junk.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0xC000]
    cut = requests.post(f"{base}/studies", headers={**auth, "Content-Type": 'multipart/related; '
                                                    'type="application/dicom"; boundary=XX'},
                        data=b"--XX\r\nContent-Type: application/dicom\r\n\r\nnot dicom", timeout=30)
    assert cut.status_code == 400 and "cut off" in cut.text
    assert len(_attempt_files(node)) == 1


def test_a_stow_body_over_the_limit_is_refused_before_it_is_read(tmp_path: Path, phantom_dicom) -> None:
    dicomweb = DicomwebConfig(enabled=True, bind="127.0.0.1", port=0, url="http://127.0.0.1:0",
                              token_file=_token_file(tmp_path), max_stow_mb=1)
    node = _start(tmp_path, phantom_dicom(), dicomweb)
    try:
        big = _results(node.series.study_uid, 1)
        big[0].Rows = big[0].Columns = 1100
        big[0].PixelData = bytes(1100 * 1100)
        with pytest.raises(TransferError, match="413"):
            store_results(node.url, node.job, _write(big, tmp_path / "out"), node.settings)
        assert _attempt_files(node) == []
    finally:
        node.server.stop()
        node.state.close()


# TLS ----------------------------------------------------------------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A test CA, serve's certificate for 127.0.0.1 and a worker's client certificate, signed by it."""
    folder = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
             "-subj", "/CN=paraspinal test CA", cwd=folder)
    for name, extension in (("serve", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth"),
                            ("worker", "extendedKeyUsage=clientAuth")):
        (folder / f"{name}.ext").write_text(extension + "\n")
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={name}", cwd=folder)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=folder)
    (folder / "other.ext").write_text("extendedKeyUsage=clientAuth\n")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "other.key", "-out", "other.pem", "-days",
             "2", "-subj", "/CN=not signed by the CA", cwd=folder)
    return folder


def test_tls_with_client_certificates(tmp_path: Path, phantom_dicom, pki: Path) -> None:
    dicomweb = DicomwebConfig(enabled=True, bind="127.0.0.1", port=0, url="https://127.0.0.1:0",
                              token_file=_token_file(tmp_path), tls_certificate=pki / "serve.pem",
                              tls_private_key=pki / "serve.key", ca_certificates=pki / "ca.pem")
    worker = ClientSettings(WORKER_TOKEN, ca_certificates=pki / "ca.pem", client_certificate=pki / "worker.pem",
                            client_private_key=pki / "worker.key", **QUICK)
    node = _start(tmp_path, phantom_dicom(), dicomweb, worker)
    try:
        assert fetch_series(node.url, node.job, node.series, tmp_path / "fetched", worker) == len(node.spool)
        files = _write(_results(node.series.study_uid), tmp_path / "out")
        assert len(store_results(node.url, node.job, files, worker)) == len(files)
        without = replace(worker, client_certificate=None, client_private_key=None)
        with pytest.raises(TransferError):
            fetch_series(node.url, node.job, node.series, tmp_path / "no-cert", without)
        stranger = replace(worker, client_certificate=pki / "other.pem", client_private_key=pki / "other.key")
        with pytest.raises(TransferError):
            fetch_series(node.url, node.job, node.series, tmp_path / "stranger", stranger)
        unverified = replace(worker, ca_certificates=None)  # the system's CAs do not know the test CA
        with pytest.raises(TransferError, match="TLS"):
            fetch_series(node.url, node.job, node.series, tmp_path / "unverified", unverified)
        with pytest.raises(requests.ConnectionError):  # plain HTTP to the TLS port
            requests.get(node.url.replace("https", "http") + "/dicomweb/jobs/1/1/studies", timeout=10)
    finally:
        node.server.stop()
        node.state.close()


# configuration ------------------------------------------------------------------------------------


def test_the_token_file_must_exist_hold_one_line_and_not_be_world_readable(tmp_path: Path) -> None:
    assert read_token(_token_file(tmp_path), "dicomweb.token_file") == WORKER_TOKEN.encode()
    with pytest.raises(TokenError, match="chmod 600"):
        read_token(_token_file(tmp_path, mode=0o644), "dicomweb.token_file")
    with pytest.raises(TokenError, match="one line"):
        read_token(_token_file(tmp_path, text=""), "dicomweb.token_file")
    with pytest.raises(TokenError, match="cannot be read"):
        read_token(tmp_path / "absent", "dicomweb.token_file")
    with pytest.raises(TokenError, match="not set"):
        ClientSettings.from_config(DicomwebConfig())


def _config(tmp_path: Path, body: str) -> Config:
    path = tmp_path / "node.toml"
    path.write_text(body)
    return load_config(path, environ={})


def test_dicomweb_config_is_checked(tmp_path: Path) -> None:
    assert not _config(tmp_path, "").dicomweb.enabled
    token = _token_file(tmp_path)
    enabled = _config(tmp_path, f'[dicomweb]\nenabled = true\nurl = "http://recv1:8781"\ntoken_file = "{token}"\n')
    assert enabled.dicomweb.bind == "0.0.0.0" and enabled.dicomweb.port == 8781
    for body, message in (
        ("enabled = true\nurl = \"http://recv1:8781\"", "token_file"),
        (f'enabled = true\ntoken_file = "{token}"', "dicomweb.url"),
        (f'enabled = true\nurl = "https://recv1:8781"\ntoken_file = "{token}"', "https"),
        (f'enabled = true\nurl = "http://recv1:8781"\ntoken_file = "{token}"\nca_certificates = "/ca.pem"', "needs TLS"),
        ('tls_certificate = "/c.pem"', "go together"),
        ('url = "recv1:8781"', "http"),
        ("port = 0", "1..65535"),
    ):
        with pytest.raises(ConfigError, match=message):
            _config(tmp_path, f"[dicomweb]\n{body}\n")


def test_serve_refuses_to_start_the_listener_with_a_readable_token_file(tmp_path: Path) -> None:
    dicomweb = DicomwebConfig(enabled=True, bind="127.0.0.1", port=0, url="http://127.0.0.1:0",
                              token_file=_token_file(tmp_path, mode=0o644))
    state = State(tmp_path / "state.sqlite")
    try:
        with pytest.raises(TokenError, match="chmod 600"):
            DicomwebServer(Config(storage=StorageConfig(state_dir=tmp_path), dicomweb=dicomweb), state)
    finally:
        state.close()


# inside serve ---------------------------------------------------------------------------------------


def _service_config(tmp_path: Path, dicomweb_port: int) -> Config:
    config = Config()
    config.receiver.port, config.receiver.bind_address, config.receiver.min_free_disk_mb = free_port(), "127.0.0.1", 1
    config.storage.state_dir = tmp_path / "state"
    config.worker.count = 0
    config.web.enabled = False
    tmp_path.mkdir(exist_ok=True)
    config.dicomweb = DicomwebConfig(enabled=True, bind="127.0.0.1", port=dicomweb_port,
                                     url=f"http://127.0.0.1:{dicomweb_port}", token_file=_token_file(tmp_path))
    return config


def test_serve_runs_the_listener_from_start_to_shutdown_and_a_taken_port_refuses_the_start(tmp_path: Path) -> None:
    port = free_port()
    service = Service(_service_config(tmp_path, port), None)
    service.start()
    url = f"http://127.0.0.1:{port}/dicomweb/jobs/1/1/studies"
    try:
        assert requests.post(url, timeout=10).status_code == 401
        service._heartbeat()  # what the scheduler does every SERVE_HEARTBEAT_S: workers find the URL there
        assert [s.dicomweb_url for s in service.state.serves()] == [f"http://127.0.0.1:{port}"]
        taken = Service(_service_config(tmp_path / "second", port), None)
        with pytest.raises(StartError, match="dicomweb.port"):
            taken.start()  # before anything else listens
        taken.state.close()
        taken.owner.release()
    finally:
        service.shutdown()
    with pytest.raises(requests.ConnectionError):
        requests.post(url, timeout=10)
