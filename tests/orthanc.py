"""A real Orthanc PACS (Debian package `orthanc`) for integration tests, driven over its REST API.

The config is generated (`orthanc_config`): DICOM and HTTP ports on 127.0.0.1 picked free,
storage in a given folder, REST authentication on with test credentials, no plugins, no
remote access, and C-STORE/C-ECHO accepted only from the modalities it lists. Folder and
ports survive stop()/start(), so a test can take the PACS down and bring it back with its
content. Orthanc gets TCP_NODELAY=1 in its environment (its DCMTK network layer reads it;
without it loopback associations crawl).
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from dicom_peers import free_port, wait_for_port

ORTHANC = Path("/usr/sbin/Orthanc")
USERNAME = "paraspinal-test"
PASSWORD = "orthanc-test-password"
STARTUP_TIMEOUT_S = 30.0
SHUTDOWN_TIMEOUT_S = 30.0
REQUEST_TIMEOUT_S = 120.0


class OrthancError(Exception):
    """A REST call Orthanc answered with an HTTP error (or did not answer)."""

    def __init__(self, method: str, path: str, status: int, message: str) -> None:
        super().__init__(f"{method} {path}: HTTP {status}: {message}")
        self.status = status


@dataclass(frozen=True)
class Modality:
    """A DICOM peer in Orthanc's DicomModalities: where Orthanc sends, and whom it accepts."""

    ae_title: str
    port: int
    host: str = "127.0.0.1"
    local_ae: str | None = None  # the calling AE Orthanc presents to this peer instead of its own
    tls: bool = False  # Orthanc talks DICOM TLS to it (UseDicomTls; needs DicomTls* in the config)
    allow_get: bool = True  # False: Orthanc refuses this peer's C-GET (a PACS that only allows C-MOVE)

    def entry(self) -> dict:
        entry = {"AET": self.ae_title, "Host": self.host, "Port": self.port}
        return (entry | ({"LocalAet": self.local_ae} if self.local_ae else {}) | ({"UseDicomTls": True} if self.tls else {})
                | ({} if self.allow_get else {"AllowGet": False}))


def orthanc_config(storage: Path, http_port: int, dicom_port: int, ae_title: str,
                   modalities: dict[str, Modality]) -> dict:
    """Orthanc's JSON config: loopback only, authenticated REST, listed modalities only."""
    return {
        "Name": "paraspinal-test-pacs",
        "StorageDirectory": str(storage),
        "IndexDirectory": str(storage),
        "Plugins": [],
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True,
        "RegisteredUsers": {USERNAME: PASSWORD},
        "DicomAet": ae_title,
        "DicomPort": dicom_port,
        "DicomCheckCalledAet": True,
        "DicomAlwaysAllowEcho": False,
        "DicomAlwaysAllowStore": False,
        "DicomModalities": {name: modality.entry() for name, modality in modalities.items()},
        "DicomScuTimeout": 30,
        "SaveJobs": False,
    }


class Orthanc:
    """One Orthanc process with its own config, storage and log under `root`."""

    def __init__(self, root: Path, modalities: dict[str, Modality], ae_title: str = "ORTHANC",
                 extra: dict | None = None) -> None:
        """`extra`: more Orthanc settings (DicomTlsEnabled and its files, LimitFindResults, ...)."""
        root.mkdir(parents=True, exist_ok=True)
        self.ae_title = ae_title
        self.http_port = free_port()
        self.dicom_port = free_port()
        self.log = root / "orthanc.log"
        self.config_path = root / "orthanc.json"
        config = orthanc_config(root / "storage", self.http_port, self.dicom_port, ae_title, modalities) | (extra or {})
        self.config_path.write_text(json.dumps(config, indent=2))
        self._authorization = "Basic " + base64.b64encode(f"{USERNAME}:{PASSWORD}".encode()).decode()
        self._process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self) -> None:
        """Start and wait (bounded) until both REST and DICOM ports answer."""
        with self.log.open("a") as log:
            self._process = subprocess.Popen([str(ORTHANC), str(self.config_path)], stdout=log,
                                             stderr=subprocess.STDOUT, env={**os.environ, "TCP_NODELAY": "1"})
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not self._rest_answers():
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"Orthanc did not start; last lines of {self.log}:\n{self._log_tail()}")
            time.sleep(0.1)
        wait_for_port(self.dicom_port, timeout_s=max(1.0, deadline - time.monotonic()))

    def stop(self) -> None:
        """SIGTERM (Orthanc finishes its writes and closes the index), then SIGKILL if it hangs."""
        if self._process is None:
            return
        self._process.terminate()
        try:
            self._process.wait(timeout=SHUTDOWN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(timeout=10)
        self._process = None

    def _rest_answers(self) -> bool:
        try:
            self.get("/system")
        except (OrthancError, OSError):
            return False
        return True

    def _log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def request(self, method: str, path: str, body: bytes | None = None,
                content_type: str = "application/json", authenticated: bool = True) -> bytes:
        headers = {"Content-Type": content_type} | ({"Authorization": self._authorization} if authenticated else {})
        call = urllib.request.Request(self.url + path, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(call, timeout=REQUEST_TIMEOUT_S) as answer:
                return answer.read()
        except urllib.error.HTTPError as exc:
            raise OrthancError(method, path, exc.code, exc.read().decode(errors="replace")) from None

    def get(self, path: str) -> object:
        return json.loads(self.request("GET", path))

    def post(self, path: str, body: object) -> object:
        answer = self.request("POST", path, json.dumps(body).encode())
        return json.loads(answer) if answer.strip() else None

    def upload(self, files: Iterable[Path]) -> list[str]:
        """POST each DICOM file to /instances; Orthanc's instance ids."""
        return [json.loads(self.request("POST", "/instances", Path(f).read_bytes(), "application/dicom"))["ID"]
                for f in files]

    def store(self, modality: str, resources: list[str]) -> dict:
        """C-STORE the resources (Orthanc ids of any level) to a modality; returns when the job ended."""
        return self.post(f"/modalities/{modality}/store", {"Resources": resources, "Synchronous": True})

    def echo(self, modality: str) -> None:
        """C-ECHO a modality; raises OrthancError when the peer refuses or does not answer."""
        self.post(f"/modalities/{modality}/echo", {})

    def study_id(self, study_uid: str) -> str | None:
        found = json.loads(self.request("POST", "/tools/lookup", study_uid.encode(), "text/plain"))
        return next((hit["ID"] for hit in found if hit["Type"] == "Study"), None)

    def series_of(self, study_id: str) -> list[dict]:
        return self.get(f"/studies/{study_id}/series")

    def instances_of(self, series_id: str) -> list[dict]:
        return self.get(f"/series/{series_id}/instances")

    def metadata(self, instance_id: str, name: str) -> str:
        """Orthanc's per-instance metadata, e.g. SopClassUid, TransferSyntax, RemoteAET."""
        return self.request("GET", f"/instances/{instance_id}/metadata/{name}").decode()

    def download(self, instance_id: str, path: Path) -> Path:
        path.write_bytes(self.request("GET", f"/instances/{instance_id}/file"))
        return path

    def copy_study(self, study_id: str, transcode: str | None = None) -> str:
        """A copy of the study with new Study/Series/SOP UIDs, optionally transcoded by Orthanc; its id."""
        body = {"Transcode": transcode} if transcode else {}
        return self.post(f"/studies/{study_id}/modify", body)["ID"]
