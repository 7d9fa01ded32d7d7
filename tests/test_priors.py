"""Change over time: a later phantom compared with the same patient's earlier result, from the state and a real Orthanc.

The later phantom is the default phantom with every muscle voxel 6 HU lower and every trabecular
voxel between 100 and 600 HU 12 HU lower: the slabs, and so the volumes, stay; the medians move
by exactly -6 and -12 (checked against the phantom's own truth). The earlier study is two years
(731 days) before. Priors come from a real SQLite state, and from a real Orthanc holding the
earlier SR: by C-GET, and by C-MOVE into a real receiver when Orthanc refuses C-GET; by C-GET
over mutual DICOM TLS too (certificates from tests/tls_certs.py).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import phantom as ph
import pydicom
import pytest
from dicom_peers import free_port
from orthanc import ORTHANC, Modality, Orthanc
from pydicom.uid import generate_uid
from test_readers import DCIODVFY, TID1500READER, complaints

from dicom_sr import codes
from dicom_sr.timepoint import tracking_uid
from node.config import Config, PriorsConfig, ReceiverConfig, TlsClientConfig
from node.ingest.receiver import Receiver
from node.ingest.spool import Spool
from node.pipeline.acquisition import Subject
from node.pipeline.ct_load import load_ct
from node.pipeline.seg_load import load_segmentation
from node.priors.change import Quantity, QuantityKey
from node.priors.inbox import PriorsInbox
from node.priors.lookup import PriorSources
from node.run import PipelineResult, Segmented, finish
from node.state.store import NewDelivery, SeriesRecord, State

MUSCLE_SHIFT_HU, BONE_SHIFT_HU = -6, -12
PRIOR_DATE, LATER_DATE, INTERVAL_DAYS = "20220101", "20240102", 731
NODE_AE = "PARASPINAL"
T1_T10_HU = QuantityKey("T1-T10", "combined", Quantity.MUSCLE_MEDIAN_HU)
T1_T10_VOLUME = QuantityKey("T1-T10", "combined", Quantity.MUSCLE_VOLUME_CM3)
T5_BONE = QuantityKey("T5", "", Quantity.BONE_MEDIAN_HU)
T3_LEFT_HU = QuantityKey("T3", "left", Quantity.MUSCLE_MEDIAN_HU)


def shifted(phantom: ph.Phantom) -> ph.Phantom:
    hu = phantom.hu.copy()
    hu[np.isin(phantom.labels, (86, 87))] += MUSCLE_SHIFT_HU
    hu[(phantom.body == 1) & (phantom.hu >= 100) & (phantom.hu <= 600)] += BONE_SHIFT_HU
    return dataclasses.replace(phantom, hu=hu)


@dataclass(frozen=True)
class Study:
    folder: Path
    series: ph.DicomSeries
    segmented: Segmented


def write_study(phantom: ph.Phantom, masks: Path, folder: Path, date: str, **header: object) -> Study:
    series = ph.write_dicom_series(phantom, folder / "ct", study_uid=str(generate_uid()),
                                   header={"StudyDate": date, "SeriesDate": date, "ContentDate": date,
                                           "ContrastBolusAgent": "none", **header})
    ct = load_ct(folder / "ct")
    return Study(folder, series, Segmented(ct, load_segmentation(masks, ct)))


def record_done(state: State, study: Study, result: dict) -> None:
    """What a worker leaves in the state when a job is done."""
    ct = study.segmented.ct
    header = ct.datasets[0]
    state.record_series(SeriesRecord(study.series.series_uid, study.series.study_uid, str(header.PatientID), "A1",
                                     str(header.StudyDate), "CT", "phantom", ct.shape[0], "f", str(study.folder)))
    job = state.add_job(study.series.series_uid, "f", str(study.folder))
    claimed = state.claim("test", 60, 3)
    assert claimed is not None and claimed.id == job.id
    assert state.complete(job.id, claimed.token, result, list[NewDelivery]())


@dataclass(frozen=True)
class World:
    root: Path
    phantom_masks: Path
    prior: Study
    prior_result: PipelineResult
    later: Study


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, phantom: ph.Phantom, phantom_masks) -> World:
    root = tmp_path_factory.mktemp("priors")
    masks = phantom_masks("folder")
    prior = write_study(phantom, masks, root / "prior", PRIOR_DATE)
    prior_result = finish(prior.segmented, root / "prior" / "out", Config())
    later = write_study(shifted(phantom), masks, root / "later", LATER_DATE)
    return World(root, masks, prior, prior_result, later)


@pytest.fixture
def state(tmp_path: Path) -> Iterator[State]:
    opened = State(tmp_path / "state.sqlite")
    yield opened
    opened.close()


def later_json(world: World, sources: PriorSources, out: Path, dicom: bool = False) -> tuple[dict, PipelineResult]:
    result = finish(world.later.segmented, out, Config(), dicom=dicom, priors=sources)
    return json.loads((out / "measurements.json").read_text()), result


def change_of(measurements: dict, key: QuantityKey) -> dict:
    (found,) = [c for c in measurements["change"] if (c["structure"], c["side"], c["quantity"]) ==
                (key.structure, key.side, str(key.quantity))]
    return found


def state_only(state: State | None) -> PriorSources:
    return PriorSources(state, PriorsConfig(), NODE_AE, Config().results.sr_series_description, None)


def assert_exact_change(measurements: dict, world: World, phantom: ph.Phantom) -> None:
    """Δ = truth(later) − truth(prior), per year over 731 days, significant above the default LSC."""
    truth_then, truth_now = ph.truth(phantom)["total"]["combined"], ph.truth(shifted(phantom))["total"]["combined"]
    muscle = change_of(measurements, T1_T10_HU)
    assert (muscle["prior"], muscle["current"]) == (truth_then["median_hu"], truth_now["median_hu"])
    assert muscle["delta"] == MUSCLE_SHIFT_HU == truth_now["median_hu"] - truth_then["median_hu"]
    assert muscle["per_year"] == MUSCLE_SHIFT_HU * 365.25 / INTERVAL_DAYS
    assert (muscle["interval_days"], muscle["comparable"], muscle["significant"]) == (INTERVAL_DAYS, True, True)
    volume = change_of(measurements, T1_T10_VOLUME)
    assert (volume["delta"], volume["significant"]) == (0.0, False)
    bone_then = {v["level"]: v for v in ph.bone_truth(phantom)}["T5"]["trabecular"]["median_hu"]
    bone = change_of(measurements, T5_BONE)
    assert (bone["prior"], bone["delta"], bone["significant"]) == (bone_then, BONE_SHIFT_HU, True)
    assert not any(c["structure"] == "L1" for c in measurements["change"]), "L1 is partial: never compared"


# ------------------------------------------------------------------ the node's own state


def test_prior_from_the_state_gives_the_exact_change_in_json_and_sr(world: World, phantom: ph.Phantom,
                                                                    state: State, tmp_path: Path) -> None:
    record_done(state, world.prior, world.prior_result.measurement.to_dict())
    measurements, result = later_json(world, state_only(state), tmp_path / "out", dicom=True)
    assert_exact_change(measurements, world, phantom)
    priors = measurements["priors"]
    assert priors["checked"] and priors["used"] == world.prior.series.series_uid
    assert [p["from"] for p in priors["found"]] == ["state"] and priors["found"][0]["comparable"]
    assert measurements["outputs"]["sr"]["sop_instance_uid"] == str(pydicom.dcmread(result.files["sr"]).SOPInstanceUID)
    assert_sr_change_by_code(result.files["sr"], world)


def assert_sr_change_by_code(sr_path: Path, world: World) -> None:
    """highdicom finds the group by the tracking UID the earlier report used, and its change by code."""
    prior_sr = hd.sr.srread(world.prior_result.files["sr"]).content
    report = hd.sr.srread(sr_path).content
    subject = Subject("PHANTOM-0", "", "19600101", "O")
    label = "T1-T10 paraspinal muscle combined"
    uid = tracking_uid(subject, label)
    (then,) = prior_sr.get_image_measurement_groups(tracking_uid=uid)
    (now,) = report.get_image_measurement_groups(tracking_uid=uid)
    assert then.tracking_identifier == now.tracking_identifier == label
    values = {m.name.value: m.value for m in now.get_measurements()}
    assert values[codes.CHANGE_MEDIAN_HU.value] == MUSCLE_SHIFT_HU
    assert values[codes.RATE_MEDIAN_HU.value] == MUSCLE_SHIFT_HU * 365.25 / INTERVAL_DAYS
    assert values[codes.PRIOR_INTERVAL.value] == INTERVAL_DAYS
    evaluations = {e.name.value: e.value.value for e in now.get_qualitative_evaluations()}
    assert evaluations[codes.CHANGE_COMPARABLE.value] == codes.YES.value
    assert evaluations[codes.SIGNIFICANT_MEDIAN_HU.value] == codes.YES.value
    sr = pydicom.dcmread(sr_path)
    evidence = {item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
                for study in sr.PertinentOtherEvidenceSequence for item in study.ReferencedSeriesSequence}
    assert evidence == {str(pydicom.dcmread(world.prior_result.files["sr"]).SOPInstanceUID)}


@pytest.mark.skipif(not TID1500READER.exists(), reason="dcmqi missing: scripts/setup installs the test extras")
def test_dcmqi_reads_the_change_by_code(world: World, state: State, tmp_path: Path) -> None:
    record_done(state, world.prior, world.prior_result.measurement.to_dict())
    _, result = later_json(world, state_only(state), tmp_path / "out", dicom=True)
    out = tmp_path / "sr.json"
    run = subprocess.run([str(TID1500READER), "--inputDICOM", str(result.files["sr"]), "--outputMetadata", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "Warning" not in run.stdout + run.stderr, run.stdout + run.stderr
    spine = {group["Laterality"]["CodeValue"]: group for group in json.loads(out.read_text())["Measurements"]
             if group["FindingSite"]["CodeValue"] == codes.THORACIC_SPINE.value
             and group["measurementMethod"]["CodeValue"] == codes.ALL_VOXELS.value}
    items = {m["quantity"]["CodeValue"]: float(m["value"]) for m in spine[codes.LATERALITY["combined"].value]
             ["measurementItems"]}
    assert items[codes.CHANGE_MEDIAN_HU.value] == MUSCLE_SHIFT_HU
    assert items[codes.PRIOR_INTERVAL.value] == INTERVAL_DAYS
    if DCIODVFY["debian"].exists():  # time points, change items and the image library keep the SR valid
        assert complaints(DCIODVFY["debian"], result.files["sr"]) == set()


def prior_variant(world: World, **changes) -> dict:
    """The earlier result as the state would hold it for another series, with `changes` applied by path."""
    result = copy.deepcopy(world.prior_result.measurement.to_dict())
    result["source"]["series_instance_uid"] = str(generate_uid())
    for path, value in changes.items():
        target = result
        *parents, leaf = path.split("__")
        for name in parents:
            target = target[name]
        target[leaf] = value
    return result


def look_up(world: World, *priors: dict) -> dict:
    """The later result compared with these earlier ones (as state results), as measurements.json says it."""

    class Held:
        def patient_results(self, patient_id: str, limit: int = 100):
            return [(None, 0, prior) for prior in priors]

    current = finish(world.later.segmented, world.root / "scratch", Config(), dicom=False).measurement
    return state_only(Held()).look_up(current.to_dict()).to_dict()


def test_identity_mismatch_is_listed_and_never_compared(world: World) -> None:
    found = look_up(world, prior_variant(world, subject__birth_date="19610101"))
    assert found["change"] == [] and found["priors"]["used"] is None
    (prior,) = found["priors"]["found"]
    assert prior["identity"] == "mismatch: birth date" and not prior["used"]


def test_enhanced_prior_is_shown_with_its_reason_and_no_significance(world: World) -> None:
    enhanced = prior_variant(world, contrast={"enhanced": True, "source": "ContrastBolusAgent", "detail": "Iomeprol"})
    found = look_up(world, enhanced)
    (prior,) = found["priors"]["found"]
    assert prior["used"] and not prior["comparable"]
    assert prior["reasons"] == ["contrast: enhanced then, unenhanced now"]
    muscle = change_of(found, T1_T10_HU)
    assert (muscle["delta"], muscle["comparable"], muscle["significant"]) == (MUSCLE_SHIFT_HU, False, None)


def test_older_method_version_is_not_comparable(world: World) -> None:
    (prior,) = look_up(world, prior_variant(world, method__version="0"))["priors"]["found"]
    assert prior["reasons"] == ["method version: 0 then, 1 now"] and not prior["comparable"]


def test_two_priors_the_most_recent_comparable_is_used_and_both_listed(world: World) -> None:
    older = prior_variant(world, acquisition__study_date="20200101")
    other_kvp = prior_variant(world, acquisition__study_date="20230101", acquisition__kvp=100.0)
    found = look_up(world, older, other_kvp, prior_variant(world))
    dates = [(p["study_date"], p["used"], p["comparable"]) for p in found["priors"]["found"]]
    assert dates == [("2023-01-01", False, False), ("2022-01-01", True, True), ("2020-01-01", False, True)]
    assert change_of(found, T3_LEFT_HU)["interval_days"] == INTERVAL_DAYS


def test_without_patient_id_priors_are_not_checked_and_the_job_goes_on(world: World) -> None:
    current = finish(world.later.segmented, world.root / "scratch", Config(), dicom=False).measurement.to_dict()
    current["subject"]["patient_id"] = ""
    found = state_only(None).look_up(current).to_dict()
    assert found["priors"]["checked"] is False and found["change"] == []
    assert found["priors"]["searched"][0]["reason"] == "the series has no Patient ID"


# ------------------------------------------------------------------ a real Orthanc


needs_orthanc = pytest.mark.skipif(not ORTHANC.exists(), reason=f"{ORTHANC} missing: apt-get install orthanc")


class Listener:
    """A receiver's listener that records whether anything would have started a series."""

    def __init__(self) -> None:
        self.stored: list = []

    def instance_stored(self, instance) -> None:
        self.stored.append(instance)

    def association_released(self, association_id: str) -> None: ...

    def association_aborted(self, association_id: str) -> None: ...

    def instance_refused(self, association_id: str, series_uid, sop_instance_uid) -> None: ...


@dataclass
class Pacs:
    orthanc: Orthanc
    receiver: Receiver
    listener: Listener
    config: Config


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory, world: World) -> Iterator[Pacs]:
    """Orthanc holding the earlier SR and knowing the node (C-GET allowed); the node's receiver for C-MOVE."""
    root = tmp_path_factory.mktemp("pacs")
    port = free_port()
    orthanc = Orthanc(root / "orthanc", {"node": Modality(NODE_AE, port)})
    orthanc.start()
    orthanc.upload([world.prior_result.files["sr"]])
    config = Config()
    config.storage.state_dir = root / "node"
    config.receiver = ReceiverConfig(ae_title=NODE_AE, port=port, bind_address="127.0.0.1", min_free_disk_mb=1,
                                     accept_other_storage=False)
    config.priors = PriorsConfig(ae_title=orthanc.ae_title, host="127.0.0.1", port=orthanc.dicom_port)
    listener = Listener()
    receiver = Receiver(config.receiver, Spool(root / "spool"), listener, priors_inbox=PriorsInbox.from_config(config))
    receiver.start()
    yield Pacs(orthanc, receiver, listener, config)
    receiver.stop(grace_s=2)
    orthanc.stop()


def pacs_sources(config: Config, state: State, **settings) -> PriorSources:
    config = copy.deepcopy(config)
    config.priors = dataclasses.replace(config.priors, **settings)
    return PriorSources.from_config(config, state)


@needs_orthanc
def test_prior_found_at_the_pacs_by_c_find_and_c_get(world: World, phantom: ph.Phantom, pacs: Pacs, state: State,
                                                      tmp_path: Path) -> None:
    measurements, _ = later_json(world, pacs_sources(pacs.config, state), tmp_path / "out")
    searched = measurements["priors"]["searched"]
    assert [(s["source"].split()[0], s["status"], s["found"]) for s in searched] == [
        ("state", "checked", 0), ("pacs", "checked", 1)]
    assert searched[1]["retrieve"] == "get"
    (prior,) = measurements["priors"]["found"]
    assert (prior["from"], prior["series_instance_uid"]) == ("pacs", world.prior.series.series_uid)
    assert_exact_change(measurements, world, phantom)


@needs_orthanc
def test_prior_already_in_the_state_is_not_retrieved_again(world: World, pacs: Pacs, state: State,
                                                           tmp_path: Path) -> None:
    record_done(state, world.prior, world.prior_result.measurement.to_dict())
    measurements, _ = later_json(world, pacs_sources(pacs.config, state), tmp_path / "out")
    assert [s["found"] for s in measurements["priors"]["searched"]] == [1, 0]
    assert [p["from"] for p in measurements["priors"]["found"]] == ["state"]


@needs_orthanc
def test_c_move_into_the_receiver_brings_the_prior_and_starts_no_job(world: World, phantom: ph.Phantom, pacs: Pacs,
                                                                     state: State, tmp_path: Path) -> None:
    measurements, _ = later_json(world, pacs_sources(pacs.config, state, retrieve="move"), tmp_path / "out")
    assert measurements["priors"]["searched"][1]["retrieve"] == "move"
    assert_exact_change(measurements, world, phantom)
    assert pacs.listener.stored == [] and not list(pacs.receiver.spool.root.glob("*/*/*.dcm"))
    assert not list((pacs.config.storage.state_dir / "priors-inbox").glob("*/*.dcm")), "taken from the inbox"


@needs_orthanc
def test_pacs_that_refuses_c_get_is_asked_for_a_c_move(tmp_path: Path, world: World, phantom: ph.Phantom, pacs: Pacs,
                                                       state: State) -> None:
    move_only = Orthanc(tmp_path / "orthanc", {"node": Modality(NODE_AE, pacs.receiver.port, allow_get=False)},
                        ae_title="MOVEONLY")
    move_only.start()
    try:
        move_only.upload([world.prior_result.files["sr"]])
        sources = pacs_sources(pacs.config, state, ae_title="MOVEONLY", port=move_only.dicom_port)
        receiver_inbox = pacs.receiver.priors_inbox
        pacs.receiver.priors_inbox = sources.inbox  # the receiver now trusts this PACS, as serve would
        measurements, _ = later_json(world, sources, tmp_path / "out")
        pacs.receiver.priors_inbox = receiver_inbox
    finally:
        move_only.stop()
    assert measurements["priors"]["searched"][1]["retrieve"] == "move"
    assert_exact_change(measurements, world, phantom)


@needs_orthanc
def test_prior_found_at_a_tls_pacs_and_refused_without_the_right_ca_or_tls(
        world: World, phantom: ph.Phantom, pki, state: State, tmp_path: Path) -> None:
    """[priors] tls: C-FIND and C-GET over mutual TLS with an Orthanc that speaks only TLS on its DICOM port."""
    tls = {"DicomTlsEnabled": True, "DicomTlsCertificate": str(pki.server.certificate),
           "DicomTlsPrivateKey": str(pki.server.key), "DicomTlsTrustedCertificates": str(pki.ca),
           "DicomTlsRemoteCertificateRequired": True}
    orthanc = Orthanc(tmp_path / "orthanc", {"node": Modality(NODE_AE, free_port(), tls=True)}, "TLSPACS", tls)
    orthanc.start()
    try:
        orthanc.upload([world.prior_result.files["sr"]])
        config = Config()
        config.storage.state_dir = tmp_path / "node"
        client = TlsClientConfig(ca_certificates=pki.ca, certificate=pki.client.certificate, private_key=pki.client.key)
        config.priors = PriorsConfig(ae_title="TLSPACS", host="127.0.0.1", port=orthanc.dicom_port, tls=client)
        measurements, result = later_json(world, PriorSources.from_config(config, state), tmp_path / "out")
        current = result.measurement.to_dict()
        other_ca = dataclasses.replace(client, ca_certificates=pki.other_ca)
        refused = {name: pacs_sources(config, state, tls=tls).look_up(current).to_dict()["priors"]["searched"][1]
                   for name, tls in (("another CA", other_ca), ("plain DICOM", None))}
    finally:
        orthanc.stop()
    searched = measurements["priors"]["searched"][1]
    assert (searched["status"], searched["found"], searched["retrieve"]) == ("checked", 1, "get")
    assert_exact_change(measurements, world, phantom)
    assert refused["another CA"]["status"] == "not checked" and "TLS" in refused["another CA"]["reason"]
    assert refused["plain DICOM"]["status"] == "not checked", "Orthanc's DICOM port speaks TLS only"


@needs_orthanc
def test_receiver_keeps_no_sr_from_another_pacs(world: World, pacs: Pacs) -> None:
    inbox = pacs.receiver.priors_inbox
    assert inbox is not None
    sop_class = str(pydicom.dcmread(world.prior_result.files["sr"], stop_before_pixels=True).SOPClassUID)
    assert inbox.accepts(pacs.orthanc.ae_title, "127.0.0.1", sop_class)
    assert not inbox.accepts("OTHERPACS", "127.0.0.1", sop_class)
    assert not inbox.accepts(pacs.orthanc.ae_title, "10.9.9.9", sop_class)
    assert not inbox.accepts(pacs.orthanc.ae_title, "127.0.0.1", "1.2.840.10008.5.1.4.1.1.2")


def test_pacs_down_says_not_checked_within_its_timeout(world: World, state: State, tmp_path: Path) -> None:
    config = Config()
    config.storage.state_dir = tmp_path
    config.priors = PriorsConfig(ae_title="DOWN", host="127.0.0.1", port=free_port(), timeout_s=2.0)
    started = time.monotonic()
    measurements, _ = later_json(world, PriorSources.from_config(config, state), tmp_path / "out")
    assert time.monotonic() - started < 2.0 + 15.0  # the measurement itself included
    pacs = measurements["priors"]["searched"][1]
    assert (pacs["status"], pacs["found"]) == ("not checked", 0) and "did not answer" in pacs["reason"]
    assert measurements["priors"]["checked"] is False and measurements["change"] == []
    assert pacs["seconds"] <= 2.5


def test_silent_pacs_is_given_up_at_its_timeout(world: World, state: State, tmp_path: Path) -> None:
    """A PACS that accepts the connection and never answers costs the job priors.timeout_s, no more."""
    import socket

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)
    try:
        config = Config()
        config.storage.state_dir = tmp_path
        config.priors = PriorsConfig(ae_title="SILENT", host="127.0.0.1", port=silent.getsockname()[1], timeout_s=1.0)
        current = finish(world.later.segmented, tmp_path / "out", Config(), dicom=False).measurement.to_dict()
        started = time.monotonic()
        found = PriorSources.from_config(config, state).look_up(current).to_dict()
        elapsed = time.monotonic() - started
    finally:
        silent.close()
    assert found["priors"]["searched"][1]["status"] == "not checked"
    assert 0.9 <= elapsed < 2.0


# ------------------------------------------------------------------ worklist and trend


def test_worklist_filters_on_the_change_per_year_and_trend_prints_the_series(world: World, tmp_path: Path,
                                                                             capsys: pytest.CaptureFixture) -> None:
    config = tmp_path / "node.toml"
    config.write_text(f'[storage]\nstate_dir = "{tmp_path / "state"}"\n')
    (tmp_path / "state").mkdir()
    state = State(tmp_path / "state" / "state.sqlite")
    record_done(state, world.prior, world.prior_result.measurement.to_dict())
    later, _ = later_json(world, state_only(state), tmp_path / "out")
    record_done(state, world.later, later)
    state.close()
    from node.cli.main import main

    assert main(["worklist", "--config", str(config), "--format", "json", "--where", "t1_t10_median_hu_per_year<-2"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert (row["series_instance_uid"], row["prior_study_date"], row["prior_comparable"]) == (
        world.later.series.series_uid, "2022-01-01", True)
    assert (row["t1_t10_median_hu_change"], row["t1_t10_median_hu_significant"]) == (MUSCLE_SHIFT_HU, True)
    assert row["bone_hu_change"] is None, "the bone-flag vertebra L1 is partial in the phantom: not compared"
    assert main(["worklist", "--config", str(config), "--format", "json", "--where", "t1_t10_median_hu_per_year<-4"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert main(["worklist", "--config", str(config), "--where", "nonsense<1"]) == 2
    capsys.readouterr()
    assert main(["trend", "PHANTOM-0", "--config", str(config), "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["study_date"], r["prior"]) for r in rows] == [("2022-01-01", None), ("2024-01-02", "2022-01-01")]
    assert rows[1]["t1_t10_hu_per_year"] == MUSCLE_SHIFT_HU * 365.25 / INTERVAL_DAYS
    assert main(["trend", "PHANTOM-0", "--config", str(config)]) == 0
    text = capsys.readouterr().out
    assert "Phantom" not in text and "2024-01-02" in text
    assert main(["trend", "NOBODY", "--config", str(config)]) == 1
