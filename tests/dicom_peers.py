"""Real DICOM peers for tests: dcmtk storescp/storescu/echoscu on loopback free ports, synthetic CT files.

dcmtk tools get TCP_NODELAY=1 in their environment (without it loopback transfers crawl).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from node.ingest.spool import SpooledInstance

STARTUP_TIMEOUT_S = 10.0


def free_port() -> int:
    """A loopback port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
    """Block until a socket listens on `port`, or fail the test.

    Reads the kernel's socket table instead of connecting: single-threaded peers such as
    storescp would otherwise serve the probe connection first and mishandle the real one.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _listening(port):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout_s} s")


def _listening(port: int) -> bool:
    wanted = f":{port:04X}"
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table, encoding="ascii") as rows:
            next(rows)
            for row in rows:
                local, state = row.split()[1], row.split()[3]
                if local.endswith(wanted) and state == "0A":  # 0A = LISTEN
                    return True
    return False


def dcmtk_env() -> dict[str, str]:
    return {**os.environ, "TCP_NODELAY": "1"}


def storescu(
    port: int, files: list[Path], called_ae: str, calling_ae: str = "STORESCU", *extra: str, timeout_s: float = 120
) -> subprocess.CompletedProcess[str]:
    """Send files with dcmtk storescu, proposing each file's own transfer syntax (-xs: as stored)."""
    command = ["storescu", "-aet", calling_ae, "-aec", called_ae, *extra, "127.0.0.1", str(port), *map(str, files)]
    return subprocess.run(command, env=dcmtk_env(), capture_output=True, text=True, timeout=timeout_s)


def echoscu(port: int, called_ae: str, calling_ae: str = "ECHOSCU") -> subprocess.CompletedProcess[str]:
    command = ["echoscu", "-aet", calling_ae, "-aec", called_ae, "127.0.0.1", str(port)]
    return subprocess.run(command, env=dcmtk_env(), capture_output=True, text=True, timeout=30)


@contextlib.contextmanager
def storescp(folder: Path, ae_title: str = "STORESCP", *extra: str) -> Iterator[int]:
    """Run dcmtk storescp (all transfer syntaxes, promiscuous) writing into `folder`; yields its port."""
    port = free_port()
    folder.mkdir(parents=True, exist_ok=True)
    command = ["storescp", "-aet", ae_title, "+xa", "-pm", "-od", str(folder), *extra, str(port)]
    process = subprocess.Popen(command, env=dcmtk_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_port(port)
        yield port
    finally:
        process.terminate()
        process.wait(timeout=10)


class RecordingListener:
    """A SpoolListener that remembers what it was told (thread-safe, like the real one must be)."""

    def __init__(self) -> None:
        self.instances: list[SpooledInstance] = []
        self.released: list[str] = []
        self.aborted: list[str] = []
        self.refused: list[str] = []
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)

    def instance_stored(self, instance: SpooledInstance) -> None:
        with self._changed:
            self.instances.append(instance)
            self._changed.notify_all()

    def association_released(self, association_id: str) -> None:
        with self._changed:
            self.released.append(association_id)
            self._changed.notify_all()

    def association_aborted(self, association_id: str) -> None:
        with self._changed:
            self.aborted.append(association_id)

    def instance_refused(self, association_id: str, series_uid: str | None, sop_instance_uid: str | None) -> None:
        with self._changed:
            self.refused.append(association_id)

    def wait_released(self, count: int, timeout_s: float = 20.0) -> list[str]:
        """Wait (bounded) until `count` associations have been reported released."""
        with self._changed:
            if not self._changed.wait_for(lambda: len(self.released) >= count, timeout=timeout_s):
                raise TimeoutError(f"{len(self.released)} of {count} associations released after {timeout_s} s")
            return list(self.released)


def ct_dataset(
    study_uid: str, series_uid: str, index: int, size: int = 64, seed: int = 0, sop_class: str = CTImageStorage
) -> Dataset:
    """A small but complete single-frame CT image (one axial slice of a series)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.PatientName, ds.PatientID = "Test^Patient", "PID0001"
    ds.AccessionNumber, ds.StudyDate, ds.StudyTime = "ACC1", "20240102", "120000"
    ds.Modality, ds.SeriesDescription, ds.BodyPartExamined = "CT", "Thorax 1.0 B30f", "CHEST"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ConvolutionKernel = "B30f"
    ds.SeriesNumber, ds.InstanceNumber = 2, index + 1
    ds.FrameOfReferenceUID = generate_uid()
    ds.SliceThickness, ds.PixelSpacing = 1.0, [0.7, 0.7]
    ds.ImagePositionPatient = [-180.0, -180.0, -float(index)]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope = -1024.0, 1.0
    pixels = np.random.default_rng(seed + index).integers(0, 2000, (size, size), dtype=np.int16)
    ds.PixelData = pixels.tobytes()
    return ds


def write_ct_series(folder: Path, count: int, size: int = 64, seed: int = 0) -> list[Path]:
    """Write one CT series of `count` slices as Part 10 files; returns the paths in slice order."""
    folder.mkdir(parents=True, exist_ok=True)
    study_uid, series_uid = generate_uid(), generate_uid()
    paths = []
    for index in range(count):
        path = folder / f"ct{index:04d}.dcm"
        ct_dataset(study_uid, series_uid, index, size, seed).save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def dataset_bytes(path: Path) -> bytes:
    """The encoded dataset of a Part 10 file without preamble and file meta (what C-STORE carries)."""
    raw = path.read_bytes()
    group_length = int.from_bytes(raw[140:144], "little")  # (0002,0000) UL value, explicit VR LE
    return raw[144 + group_length:]
