"""The node as a modality of a real Orthanc: Orthanc sends studies, the node sends results back.

One Orthanc (tests/orthanc.py) and one `paraspinal-node serve` run for the whole module, both on
loopback free ports. Orthanc lists the node in DicomModalities and is the node's only
destination; the node accepts associations only from Orthanc's AE title. The segmenter is the
"precomputed" backend: the phantom's masks are linked into precomputed_dir/<SeriesInstanceUID>,
so the numbers that come back can be compared with the phantom's truth. Every wait is bounded.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import phantom as ph
import pydicom
import pytest
import SimpleITK as sitk
from dicom_peers import free_port, wait_for_port
from orthanc import ORTHANC, Modality, Orthanc, OrthancError
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from support import wait_until

from dicom_sr.sr import MEASUREMENTS, Window, tracking_label
from node.labels import CLASS_LABEL, MEASURED_LEVELS
from node.pipeline.ct_load import load_ct

pytestmark = pytest.mark.skipif(not ORTHANC.exists(), reason=f"{ORTHANC} missing: apt-get install orthanc")

ROOT = Path(__file__).resolve().parents[1]
WAIT_S = 120.0

NODE_AE, ORTHANC_AE, STRANGER_AE = "PARASPINAL", "ORTHANC", "STRANGER"
NODE, STRANGER = "paraspinal", "stranger"  # Orthanc's names for the node: as itself, and under a foreign AE

SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
DOSE_SR = "1.2.840.10008.5.1.4.1.1.88.67"  # X-Ray Radiation Dose SR
RESULT_KINDS = {SEG_STORAGE: "seg", COMPREHENSIVE_3D_SR: "sr", SECONDARY_CAPTURE: "key_image"}
ONCE_EACH = {"seg": [1], "sr": [1], "key_image": [1]}  # one series of one instance per kind
JPEG_LS_LOSSLESS = "1.2.840.10008.1.2.4.80"
JPEG_2000_LOSSLESS = "1.2.840.10008.1.2.4.90"
ABSENT = "121054"  # SR qualitative evaluation code of an absent level
DEEP_MUSCLE_OF_BACK = "244849004"  # the Finding of every muscle group


def node_config(state_dir: Path, port: int, orthanc: Orthanc, precomputed: Path) -> str:
    """The node's TOML: the README's Orthanc setup plus short quiet periods and retries for tests."""
    return f"""
[receiver]
ae_title = "{NODE_AE}"
port = {port}
bind_address = "127.0.0.1"
allowed_calling_aes = ["{orthanc.ae_title}"]
min_free_disk_mb = 1

[[destinations]]
ae_title = "{orthanc.ae_title}"
host = "127.0.0.1"
port = {orthanc.dicom_port}

[storage]
state_dir = "{state_dir}"

[segmenter]
backend = "precomputed"
precomputed_dir = "{precomputed}"

[completion]
release_quiet_s = 0.5
idle_quiet_s = 10.0

[worker]
lease_s = 30.0
poll_s = 0.2
retry_delay_s = 0.5

[delivery]
retry_base_s = 0.5
retry_max_interval_s = 1.0
timeout_s = 10.0
results_dir = "{state_dir / 'results'}"
"""


class Node:
    """`paraspinal-node serve` in a subprocess; its log is its stderr."""

    def __init__(self, root: Path, port: int, orthanc: Orthanc, precomputed: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.port = port
        self.precomputed = precomputed
        self.results = root / "state" / "results"
        self.spool = root / "state" / "spool"
        self.log = root / "node.log"
        self.config = root / "node.toml"
        self.config.write_text(node_config(root / "state", port, orthanc, precomputed))
        self._process: subprocess.Popen | None = None

    def start(self) -> None:
        with self.log.open("a") as log:
            self._process = subprocess.Popen([sys.executable, "-m", "node.cli.main", "serve", "--config", str(self.config)],
                                             cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                                             stdout=log, stderr=subprocess.STDOUT)
        wait_for_port(self.port, timeout_s=30)

    def stop(self) -> None:
        self._process.send_signal(signal.SIGTERM)
        try:
            self._process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(timeout=10)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def status(self) -> dict:
        """`paraspinal-node status --format json`: job and delivery counts, recent jobs and errors."""
        run = subprocess.run([sys.executable, "-m", "node.cli.main", "status", "--format", "json", "--jobs", "100",
                              "--config", str(self.config)], cwd=ROOT, capture_output=True, text=True, timeout=60,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert run.returncode == 0, run.stderr
        return json.loads(run.stdout)

    def measurements(self, series_uid: str) -> dict:
        """The series' measurements.json from the results folder, once the node has written it."""
        path = self.results / f"{series_uid}.json"
        wait_until(path.is_file, f"{path.name} in the results folder")
        return json.loads(path.read_text())

    def jobs_of(self, series_uid: str) -> list[dict]:
        return [job for job in self.status()["recent_jobs"] if job["series"] == series_uid]

    def provide_masks(self, series_uid: str, masks: Path) -> None:
        """What a site segmenting elsewhere does: put the masks where the precomputed backend looks."""
        self.precomputed.mkdir(parents=True, exist_ok=True)
        (self.precomputed / series_uid).symlink_to(masks, target_is_directory=True)


@pytest.fixture(scope="module")
def node_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory, node_port: int) -> Iterator[Orthanc]:
    modalities = {NODE: Modality(NODE_AE, node_port), STRANGER: Modality(NODE_AE, node_port, local_ae=STRANGER_AE)}
    pacs = Orthanc(tmp_path_factory.mktemp("orthanc"), modalities, ORTHANC_AE)
    pacs.start()
    yield pacs
    pacs.stop()


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, node_port: int, orthanc: Orthanc) -> Iterator[Node]:
    root = tmp_path_factory.mktemp("node")
    started = Node(root, node_port, orthanc, root / "precomputed")
    started.start()
    yield started
    started.stop()


# ------------------------------------------------------------------ reading results back from Orthanc


@dataclass(frozen=True)
class Results:
    """The node's results for one study as Orthanc holds them, downloaded."""

    instances_per_series: dict[str, list[int]]  # kind -> instance count of each result series
    files: dict[str, Path]  # kind -> the downloaded instance (of the first series)


def result_series(orthanc: Orthanc, study_uid: str) -> dict[str, list[dict]]:
    """kind (seg/sr/key_image) -> the study's series holding that SOP class."""
    study = orthanc.study_id(study_uid)
    found: dict[str, list[dict]] = {}
    for series in orthanc.series_of(study) if study else []:
        kind = RESULT_KINDS.get(orthanc.metadata(series["Instances"][0], "SopClassUid"))
        if kind:
            found.setdefault(kind, []).append(series)
    return found


def every_result(orthanc: Orthanc, study_uid: str) -> dict[str, list[dict]] | None:
    found = result_series(orthanc, study_uid)
    return found if len(found) == len(RESULT_KINDS) else None


def wait_for_results(orthanc: Orthanc, study_uid: str, folder: Path) -> Results:
    """Wait until the study holds SEG, SR and key image; count them and download one of each."""
    found = wait_until(lambda: every_result(orthanc, study_uid), f"SEG, SR and key image in study {study_uid}")
    folder.mkdir(parents=True, exist_ok=True)
    files = {kind: orthanc.download(series[0]["Instances"][0], folder / f"{kind}.dcm")
             for kind, series in found.items()}
    return Results({kind: [len(s["Instances"]) for s in series] for kind, series in found.items()}, files)


def read_sr(path: Path) -> dict[str, dict]:
    """Tracking label -> {"values": {statistic: value}, "codes": {concept: code}} of each muscle group.

    A measured group holds every statistic of its Measurement Method (all voxels or the lean window)
    in order; an absent level's groups hold none.
    """
    sr = pydicom.dcmread(path)
    (imaging,) = [item for item in sr.ContentSequence if item.ConceptNameCodeSequence[0].CodeValue == "126010"]
    groups = {}
    for group in imaging.ContentSequence:
        label = next(i.TextValue for i in group.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "112039")
        codes = {i.ConceptNameCodeSequence[0].CodeValue: i.ConceptCodeSequence[0].CodeValue
                 for i in group.ContentSequence if i.ValueType == "CODE"}
        if codes["121071"] != DEEP_MUSCLE_OF_BACK:
            continue  # bone and organ groups
        window = next(w for w in Window if w.method.value == codes["370129005"])
        numbers = [item for item in group.ContentSequence if item.ValueType == "NUM"]
        assert len(numbers) == (0 if codes["111693"] == ABSENT else len(MEASUREMENTS[window])), label
        assert [item.ConceptNameCodeSequence[0].CodeValue for item in numbers] == [
            spec.name.value for spec in MEASUREMENTS[window]][: len(numbers)], label
        values = {spec.key: float(item.MeasuredValueSequence[0].FloatingPointValue)
                  for spec, item in zip(MEASUREMENTS[window], numbers)}
        groups[label] = {"values": values, "codes": codes}
    return groups


def dciodvfy_errors(path: Path) -> list[str]:
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


def spooled_syntaxes(node: Node, study_uid: str, series_uid: str) -> set[str]:
    """Transfer syntaxes of what the node stored: it keeps received bytes as they came."""
    folder = node.spool / study_uid / series_uid
    return {str(pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID) for p in folder.iterdir()}


# ------------------------------------------------------------------ test data


def scout_of(ct_file: Path, target: Path) -> Path:
    """A localizer of the same study: CT Image Storage, ImageType ...LOCALIZER, its own series."""
    ds = pydicom.dcmread(ct_file)
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.SeriesDescription = "Topogram 0.6 T20s"
    ds.SeriesNumber = 100
    ds.save_as(target, enforce_file_format=True)
    return target


def dose_report_of(ct_file: Path, target: Path) -> Path:
    """An X-Ray Radiation Dose SR of the same study, as scanners send with every CT."""
    source = pydicom.dcmread(ct_file, stop_before_pixels=True)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = DOSE_SR
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
                    "StudyTime", "AccessionNumber", "StudyID", "ReferringPhysicianName"):
        setattr(ds, keyword, getattr(source, keyword))
    ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber, ds.InstanceNumber = "SR", generate_uid(), 999, 1
    ds.ValueType, ds.ContinuityOfContent = "CONTAINER", "SEPARATE"
    ds.CompletionFlag, ds.VerificationFlag = "COMPLETE", "UNVERIFIED"
    title = Dataset()
    title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning = "113701", "DCM", "X-Ray Radiation Dose Report"
    ds.ConceptNameCodeSequence = [title]
    ds.save_as(target, enforce_file_format=True)
    return target


def example_with_fresh_uids(source_dir: Path, target: Path) -> tuple[list[Path], str, str]:
    """The example series with new Study/Series/SOP Instance UIDs; files, study and series UID.

    Its own UIDs (and SOP Class UID) are blank, which Orthanc and the node's spool both refuse.
    Only those elements change: pixel data and transfer syntax (JPEG 2000) stay as they are.
    """
    target.mkdir(parents=True)
    study_uid, series_uid = str(generate_uid()), str(generate_uid())
    files = []
    for source in sorted(source_dir.iterdir()):
        ds = pydicom.dcmread(source)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
        files.append(target / f"{ds.SOPInstanceUID}.dcm")
        ds.save_as(files[-1], enforce_file_format=True)
    return files, study_uid, series_uid


def empty_masks(ct_folder: Path, target: Path) -> Path:
    """TotalSegmentator's masks for a CT with none of the classes: every file present, all zero."""
    reference = load_ct(ct_folder).reference_image()
    empty = sitk.Image(reference.GetSize(), sitk.sitkUInt8)
    empty.CopyInformation(reference)
    target.mkdir(parents=True)
    for name in CLASS_LABEL:
        sitk.WriteImage(empty, str(target / f"{name}.nii.gz"))
    return target


# ------------------------------------------------------------------ the main flow


@dataclass(frozen=True)
class MainFlow:
    study_uid: str
    series_uid: str
    scout_uid: str
    dose_uid: str
    results: Results


@pytest.fixture(scope="module")
def main_flow(tmp_path_factory: pytest.TempPathFactory, orthanc: Orthanc, node: Node, phantom_dicom,
              phantom_masks) -> MainFlow:
    """Phantom CT + scout + dose SR uploaded to Orthanc, the study sent to the node, results back."""
    series = phantom_dicom()
    folder = tmp_path_factory.mktemp("main-extra")
    scout = scout_of(series.paths[0], folder / "scout.dcm")
    dose = dose_report_of(series.paths[0], folder / "dose.dcm")
    node.provide_masks(series.series_uid, phantom_masks("folder"))
    ids = orthanc.upload([*series.paths, scout, dose])
    orthanc.store(NODE, [orthanc.get(f"/instances/{ids[0]}/study")["ID"]])
    results = wait_for_results(orthanc, series.study_uid, tmp_path_factory.mktemp("main-results"))
    return MainFlow(series.study_uid, series.series_uid, str(pydicom.dcmread(scout).SeriesInstanceUID),
                    str(pydicom.dcmread(dose).SeriesInstanceUID), results)


def test_results_join_the_study_in_orthanc_once_each(main_flow: MainFlow, phantom: ph.Phantom) -> None:
    assert main_flow.results.instances_per_series == ONCE_EACH
    for path in main_flow.results.files.values():
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert (str(ds.PatientID), str(ds.StudyInstanceUID)) == (phantom.patient_id, main_flow.study_uid)


def test_sr_in_orthanc_carries_the_phantom_truth(main_flow: MainFlow, phantom_truth: dict) -> None:
    groups = read_sr(main_flow.results.files["sr"])
    rows = [(row["level"], row) for row in phantom_truth["levels"]] + [(None, phantom_truth["total"])]
    for level, expected in rows:
        for side in ("left", "right", "combined"):
            got = groups[tracking_label(level, side)]["values"]
            for key in ("volume_cm3", "median_hu"):
                assert math.isclose(got[key], expected[side][key], rel_tol=1e-9), (level, side, key)


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy missing: apt-get install dicom3tools")
def test_results_from_orthanc_pass_dciodvfy(main_flow: MainFlow) -> None:
    for kind, path in main_flow.results.files.items():
        assert dciodvfy_errors(path) == [], kind


def test_scout_is_skipped_and_dose_report_discarded_without_error(main_flow: MainFlow, node: Node) -> None:
    (ct_job,) = node.jobs_of(main_flow.series_uid)
    (scout_job,) = node.jobs_of(main_flow.scout_uid)
    assert ct_job["status"] == "done" and ct_job["attempts"] == 1
    assert scout_job["status"] == "skipped" and "LOCALIZER lacks AXIAL" in scout_job["last_error"]
    assert node.jobs_of(main_flow.dose_uid) == []
    assert not (node.spool / main_flow.study_uid / main_flow.dose_uid).exists()
    assert "discarded=1" in node.log_text()


@dataclass(frozen=True)
class Uploaded:
    """A study held by Orthanc: its Orthanc id and UIDs, and the Orthanc id of its one series."""

    orthanc_study: str
    orthanc_series: str
    study_uid: str
    series_uid: str


def uploaded(orthanc: Orthanc, study_id: str) -> Uploaded:
    study = orthanc.get(f"/studies/{study_id}")
    (series,) = orthanc.series_of(study_id)
    return Uploaded(study_id, series["ID"], study["MainDicomTags"]["StudyInstanceUID"],
                    series["MainDicomTags"]["SeriesInstanceUID"])


@pytest.fixture(scope="module")
def ct_only_study(tmp_path_factory: pytest.TempPathFactory, orthanc: Orthanc, phantom: ph.Phantom) -> Uploaded:
    """The phantom CT alone in a study of its own, never sent itself: tests send copies of it."""
    series = ph.write_dicom_series(phantom, tmp_path_factory.mktemp("ct-only"), study_uid=str(generate_uid()))
    ids = orthanc.upload(series.paths)
    return uploaded(orthanc, orthanc.get(f"/instances/{ids[0]}/study")["ID"])


# ------------------------------------------------------------------ compressed input


def test_orthanc_transcodes_to_jpeg_ls_and_the_numbers_do_not_change(orthanc: Orthanc, node: Node,
                                                                    main_flow: MainFlow, ct_only_study: Uploaded,
                                                                    phantom_masks, tmp_path: Path) -> None:
    """Orthanc re-encodes a copy of the CT as JPEG-LS lossless (its built-in DCMTK codec) and sends that."""
    copy = uploaded(orthanc, orthanc.copy_study(ct_only_study.orthanc_study, JPEG_LS_LOSSLESS))
    assert orthanc.metadata(orthanc.instances_of(copy.orthanc_series)[0]["ID"], "TransferSyntax") == JPEG_LS_LOSSLESS
    node.provide_masks(copy.series_uid, phantom_masks("folder"))
    orthanc.store(NODE, [copy.orthanc_series])
    results = wait_for_results(orthanc, copy.study_uid, tmp_path)
    assert results.instances_per_series == ONCE_EACH
    assert spooled_syntaxes(node, copy.study_uid, copy.series_uid) == {JPEG_LS_LOSSLESS}
    assert read_sr(results.files["sr"]) == read_sr(main_flow.results.files["sr"])
    measured = [node.measurements(uid) for uid in (main_flow.series_uid, copy.series_uid)]
    assert measured[0]["levels"] == measured[1]["levels"] and measured[0]["total"] == measured[1]["total"]


def test_real_jpeg2000_abdomen_is_decoded_and_reported_with_every_level_absent(orthanc: Orthanc, node: Node,
                                                                               tmp_path: Path, real_ct: Path) -> None:
    """The real JPEG 2000 abdominal CT (20 slices of 3 mm) passes the selection rules, so it is
    processed, not skipped: it decodes, and with no thoracic vertebra in the field of view (the
    precomputed segmentation is empty, as TotalSegmentator's would be for T1-T10) every level is
    reported absent, in an SR that reaches Orthanc like any other result."""
    files, study_uid, series_uid = example_with_fresh_uids(real_ct, tmp_path / "ct")
    node.provide_masks(series_uid, empty_masks(tmp_path / "ct", tmp_path / "masks"))
    ids = orthanc.upload(files)
    orthanc.store(NODE, [orthanc.get(f"/instances/{ids[0]}/series")["ID"]])
    results = wait_for_results(orthanc, study_uid, tmp_path / "results")
    assert spooled_syntaxes(node, study_uid, series_uid) == {JPEG_2000_LOSSLESS}
    (job,) = node.jobs_of(series_uid)
    assert job["status"] == "done" and job["last_error"] is None
    groups = read_sr(results.files["sr"])
    assert all(groups[tracking_label(level, "left")]["codes"].get("111693") == ABSENT for level in MEASURED_LEVELS)
    measured = node.measurements(series_uid)
    assert {level["status"] for level in measured["levels"]} == {"absent"}
    assert "no_levels" in {item["code"] for item in measured["qc"]}


# ------------------------------------------------------------------ association control


def test_orthanc_echoes_the_node(orthanc: Orthanc, node: Node) -> None:
    orthanc.echo(NODE)


def test_foreign_calling_ae_is_refused_and_logged(orthanc: Orthanc, node: Node) -> None:
    with pytest.raises(OrthancError):
        orthanc.echo(STRANGER)
    wait_until(lambda: f"event=association_rejected calling_ae={STRANGER_AE}" in node.log_text(), "rejection logged")
    assert 'reason="calling AE not in receiver.allowed_calling_aes"' in node.log_text()


def test_orthanc_rest_api_needs_the_credentials(orthanc: Orthanc) -> None:
    with pytest.raises(OrthancError) as refused:
        orthanc.request("GET", "/system", authenticated=False)
    assert refused.value.status == 401


# ------------------------------------------------------------------ destination down


def test_results_pending_while_orthanc_is_down_arrive_once_after_restart(orthanc: Orthanc, node: Node,
                                                                          ct_only_study: Uploaded, phantom_masks,
                                                                          tmp_path: Path) -> None:
    """Orthanc stops right after sending, so every result of the job meets a closed port first."""
    node.provide_masks(ct_only_study.series_uid, phantom_masks("folder"))
    orthanc.store(NODE, [ct_only_study.orthanc_series])
    orthanc.stop()

    def delivery_failed() -> bool:
        status = node.status()
        return status["deliveries"].get("pending", 0) > 0 and any(e["kind"] == "delivery"
                                                                  for e in status["recent_errors"])

    wait_until(delivery_failed, "a failed delivery to the stopped Orthanc")
    orthanc.start()
    wait_for_results(orthanc, ct_only_study.study_uid, tmp_path)
    wait_until(lambda: "pending" not in node.status()["deliveries"], "every delivery settled")
    assert node.status()["deliveries"].get("failed", 0) == 0
    assert {kind: [len(s["Instances"]) for s in series]
            for kind, series in result_series(orthanc, ct_only_study.study_uid).items()} == ONCE_EACH
    (job,) = node.jobs_of(ct_only_study.series_uid)
    assert job["status"] == "done" and job["attempts"] == 1
    assert node.log_text().count(f"event=delivered job={job['id']} ") == len(RESULT_KINDS)
