"""Receive throughput: one association carries an N-slice 512×512 CT series to each receiver in turn.

Receivers, alternated round by round so that disk and CPU noise hit them alike:
- node: this project's Receiver and series tracker, wired as `serve` wires them (in this process,
  spooling with fsync before each acknowledgement; series are not completed during the send), with
  every network bound of the pynetdicom adapter in force, writing with O_DIRECT (the default);
- node-cache: the same with `storage.spool_direct_io = false` (writes through the page cache);
- naive: a plain pynetdicom SCP (default settings, no bounds) writing each data set's raw bytes with
  fsync, as pynetdicom's documentation shows: the floor the node's own work is measured against;
- storescp: dcmtk writing each file to disk;
- orthanc: Orthanc with its default storage settings (skipped if Orthanc is not installed);
- node-tls (`--tls`): the node's Receiver on a DICOM TLS port (mutual TLS, certificates from a test
  CA made with openssl), sent to with storescu +tls; also the handshake cost: the median time of a
  one-image association over TLS less the same over plain DICOM.
The sender is dcmtk storescu with TCP_NODELAY=1 (without it loopback runs at ~20 images/s).
Every send uses a fresh series, so no receiver can short-cut a duplicate; each receiver gets a short
unmeasured send first (`--warmup`), so that round 1 does not time one-off start-up work.
Prints images/s per receiver (median of the rounds), the node's ratios to the others (node/orthanc
is the figure the README quotes), and the node's CPU time per image (all threads of this process).

    .venv/bin/python bench/receive.py [--count 400] [--rounds 3] [--warmup 20] [--tls]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, StoragePresentationContexts, evt

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import dicom_peers  # noqa: E402
from dicom_peers import dcmtk_env, free_port, wait_for_port  # noqa: E402

from node.config import CompletionConfig, ReceiverConfig, ReceiverTlsConfig, SelectionConfig  # noqa: E402
from node.ingest.receiver import Receiver  # noqa: E402
from node.ingest.series import SeriesTracker  # noqa: E402
from node.ingest.spool import Spool  # noqa: E402
from node.state.store import State  # noqa: E402

ENV = dcmtk_env()


def write_series(folder: Path, count: int, size: int = 512) -> list[Path]:
    """A fresh CT series (new UIDs), uncompressed, as a modality would send it."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    pixels = np.random.default_rng(0).integers(0, 2000, (size, size), dtype=np.int16).tobytes()
    paths = []
    for index in range(count):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, ds.file_meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.PatientID, ds.Modality, ds.InstanceNumber = "BENCH", "CT", index + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SliceThickness, ds.PixelSpacing = 1.0, [0.7, 0.7]
        ds.ImagePositionPatient, ds.ImageOrientationPatient = [0.0, 0.0, -float(index)], [1, 0, 0, 0, 1, 0]
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = -1024.0, 1.0
        ds.PixelData = pixels
        path = folder / f"{index:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def send(port: int, called_ae: str, files: list[Path], options: tuple[str, ...] = ()) -> float:
    """Seconds storescu takes to send `files` over one association (`options`: +tls ...)."""
    start = time.perf_counter()
    result = subprocess.run(
        ["storescu", *options, "-aec", called_ae, "127.0.0.1", str(port), *map(str, files)],
        env=ENV, capture_output=True, text=True,
    )
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"storescu to {called_ae} failed: {result.stderr.strip()[-500:]}")
    return elapsed


@contextlib.contextmanager
def node(work: Path, direct_io: bool = True, tls: object | None = None) -> Iterator[int]:
    """The node's receiver; with `tls` (a tls_certs.Pki) listening for DICOM TLS only."""
    port = free_port()
    config = ReceiverConfig(ae_title="NODE", port=port, bind_address="127.0.0.1", min_free_disk_mb=100)
    if tls is not None:
        config.tls = ReceiverTlsConfig(port=free_port(), certificate=tls.server.certificate,
                                       private_key=tls.server.key, ca_certificates=tls.ca, plain_listener=False)
    name = ("node" if direct_io else "node-cache") + ("-tls" if tls is not None else "")
    spool, state = Spool(work / f"{name}-spool", direct_io), State(work / f"{name}-state.sqlite")
    tracker = SeriesTracker(spool, state, CompletionConfig(), SelectionConfig())  # as serve wires it
    receiver = Receiver(config, spool, tracker)
    receiver.start()
    try:
        yield receiver.tls_port if tls is not None else port
    finally:
        receiver.stop(grace_s=5)
        state.close()


@contextlib.contextmanager
def naive(work: Path) -> Iterator[int]:
    """pynetdicom's documented raw-storage SCP, plus fsync: what any pynetdicom receiver costs."""
    folder = work / "naive"
    folder.mkdir()

    def on_store(event: evt.Event) -> int:
        path = folder / f"{event.request.AffectedSOPInstanceUID}.dcm"
        with path.open("wb") as out:
            out.write(b"\x00" * 128 + b"DICM")
            write_file_meta_info(out, event.file_meta)
            out.write(event.request.DataSet.getbuffer())
            out.flush()
            os.fsync(out.fileno())
        return 0x0000

    ae = AE(ae_title="NAIVE")
    ae.supported_contexts = StoragePresentationContexts
    server = ae.start_server(("127.0.0.1", free_port()), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()


def storescp(work: Path) -> contextlib.AbstractContextManager[int]:
    """dcmtk storescp writing every file to disk (the test peers' helper)."""
    return dicom_peers.storescp(work / "storescp")


@contextlib.contextmanager
def orthanc(work: Path) -> Iterator[int]:
    port, http_port = free_port(), free_port()
    root = work / "orthanc"
    root.mkdir(exist_ok=True)
    config = {
        "Name": "bench", "DicomAet": "ORTHANC", "DicomPort": port, "HttpPort": http_port,
        "StorageDirectory": str(root / "storage"), "IndexDirectory": str(root / "index"),
        "RemoteAccessAllowed": False, "DicomCheckCalledAet": False, "Plugins": [],
    }
    (root / "orthanc.json").write_text(json.dumps(config))
    process = subprocess.Popen(["Orthanc", str(root / "orthanc.json")], env=ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port)
        yield port
    finally:
        process.terminate()
        process.wait(timeout=30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=400, help="slices per series (default 400)")
    parser.add_argument("--rounds", type=int, default=3, help="sends per receiver (default 3)")
    parser.add_argument("--warmup", type=int, default=20, help="slices sent to each receiver before the rounds (default 20)")
    parser.add_argument("--work-dir", type=Path, default=None, help="scratch folder (default: a temp folder)")
    parser.add_argument("--tls", action="store_true", help="also the node over DICOM TLS, and the handshake cost")
    parser.add_argument("--only", nargs="*", default=None, help="receivers to run (default: all), e.g. node node-tls")
    args = parser.parse_args()
    if shutil.which("storescu") is None:
        print("dcmtk is not installed: apt-get install dcmtk", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(dir=args.work_dir) as scratch:
        work = Path(scratch)
        if not Spool(work / "probe").direct_io:
            print("this filesystem refuses O_DIRECT: node and node-cache both write through the page cache")
        peers = {"node": (node, "NODE"), "node-cache": (functools.partial(node, direct_io=False), "NODE"),
                 "naive": (naive, "NAIVE"), "storescp": (storescp, "STORESCP")}
        if shutil.which("Orthanc"):
            peers["orthanc"] = (orthanc, "ORTHANC")
        else:
            print("Orthanc is not installed: its column is skipped (apt-get install orthanc)")
        options: dict[str, tuple[str, ...]] = {}
        if args.tls:
            from tls_certs import make_pki

            pki = make_pki(work / "pki")
            peers["node-tls"] = (functools.partial(node, tls=pki), "NODE")
            options["node-tls"] = tuple(pki.client.dcmtk(pki.ca))
        if args.only:
            peers = {name: peer for name, peer in peers.items() if name in args.only}
        rates: dict[str, list[float]] = {name: [] for name in peers}
        node_cpu: list[float] = []
        with contextlib.ExitStack() as stack:
            ports = {name: stack.enter_context(start(work)) for name, (start, _) in peers.items()}
            for name, (_, ae_title) in peers.items() if args.warmup > 0 else ():  # one-off start-up work: not measured
                send(ports[name], ae_title, write_series(work / "series", args.warmup), options.get(name, ()))
            for round_ in range(args.rounds):
                for name, (_, ae_title) in peers.items():
                    files = write_series(work / "series", args.count)
                    os.sync()  # else the node's first fsyncs also flush the others' (and these) dirty pages
                    cpu = time.process_time()
                    elapsed = send(ports[name], ae_title, files, options.get(name, ()))
                    if name == "node":
                        node_cpu.append((time.process_time() - cpu) / args.count)
                    rates[name].append(args.count / elapsed)
                    print(f"round {round_ + 1} {name:9s} {args.count / elapsed:7.1f} images/s")
            handshake = handshake_ms(work, ports, options) if "node-tls" in ports and "node" in ports else None
    median = {name: statistics.median(values) for name, values in rates.items()}
    print(f"\n{args.count} x 512x512 CT, one association, median of {args.rounds} rounds:")
    for name, value in median.items():
        print(f"  {name:9s} {value:7.1f} images/s")
    for name in median:
        if name != "node":
            print(f"  node / {name}: {median['node'] / median[name]:.2f}")
    if "orthanc" in median:
        print(f"  naive / orthanc: {median['naive'] / median['orthanc']:.2f}")
    if node_cpu:
        print(f"  node CPU per image: {statistics.median(node_cpu) * 1000:.2f} ms")
    if handshake is not None:
        print(f"  node-tls / node: {median['node-tls'] / median['node']:.2f} (target at least 0.8)")
        print(f"  TLS handshake cost: {handshake:.1f} ms per association (one-image association, TLS less plain, "
              f"median of {HANDSHAKE_SAMPLES})")
    return 0


HANDSHAKE_SAMPLES = 15


def handshake_ms(work: Path, ports: dict[str, int], options: dict[str, tuple[str, ...]]) -> float:
    """What TLS adds to an association: a one-image storescu send, TLS less plain, medians."""
    one = write_series(work / "one", 1)
    times = {name: statistics.median(send(ports[name], "NODE", one, options.get(name, ()))
                                     for _ in range(HANDSHAKE_SAMPLES)) for name in ("node", "node-tls")}
    return (times["node-tls"] - times["node"]) * 1000


if __name__ == "__main__":
    sys.exit(main())
