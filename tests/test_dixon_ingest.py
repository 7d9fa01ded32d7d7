"""Receiving a Dixon acquisition: the water and fat series become one job keyed on the water series."""

from __future__ import annotations

from pathlib import Path

import mr_phantom as mp
import pydicom
from dicom_peers import RecordingListener, free_port
from pydicom.uid import EnhancedMRImageStorage, MRImageStorage, generate_uid
from pynetdicom import AE, build_context
from support import wait_until
from tracker_site import TrackerSite

from node.config import CompletionConfig, ReceiverConfig, SelectionConfig
from node.ingest.dicom import CT_IMAGE_STORAGE
from node.ingest.dixon import MR_IMAGE_STORAGE, spooled_sop_classes
from node.ingest.receiver import Receiver, presentation_contexts
from node.ingest.spool import Spool
from node.ingest.watch import Watcher
from node.state.store import JobStatus

MR_SELECTION = SelectionConfig(modalities=["CT", "MR"], image_type=["PRIMARY"], min_slices=3)


def site(tmp_path: Path, wait_s: float = 60.0) -> TrackerSite:
    return TrackerSite(tmp_path, MR_SELECTION, completion=CompletionConfig(release_quiet_s=5, idle_quiet_s=60,
                                                                           dixon_partner_wait_s=wait_s))


def send_series(node: TrackerSite, image: str, association: str, count: int = 4) -> str:
    """An MR series of the node's study, Siemens Dixon style; returns its UID."""
    node.series_uid = generate_uid()
    for _ in range(count):
        node.send(1, association, modality="MR")
    for path in node.spool.series_files(node.study_uid, node.series_uid):  # as the scanner tags them
        ds = pydicom.dcmread(path)
        ds.SOPClassUID = MRImageStorage
        ds.ImageType = ["DERIVED", "PRIMARY", "DIXON", image]
        ds.SeriesDescription = f"t1_vibe_dixon_tra_{image[0]}"
        node.store(ds, association)
    return node.series_uid


def statuses(node: TrackerSite) -> dict[str, tuple[JobStatus, str | None]]:
    return {job.series_uid: (job.status, job.last_error) for job in node.jobs()}


def test_the_water_series_waits_for_its_fat_series_and_becomes_the_one_job(tmp_path: Path) -> None:
    node = site(tmp_path)
    water = send_series(node, "WATER", "a1")
    assert node.complete_after_release("a1") == []  # held: no fat series yet
    fat = send_series(node, "FAT", "a2")
    node.clock.now += 30
    assert node.tracker.tick() == []  # the fat series is still in flight: the water series keeps waiting
    node.complete_after_release("a2")
    node.clock.now += 6
    node.tracker.tick()
    jobs = statuses(node)
    assert jobs[water] == (JobStatus.QUEUED, None)
    assert jobs[fat][0] is JobStatus.SKIPPED and "measured with the water series" in jobs[fat][1]


def test_a_water_series_without_partner_is_queued_after_the_bounded_wait(tmp_path: Path) -> None:
    node = site(tmp_path, wait_s=20)
    water = send_series(node, "WATER", "a1")
    node.complete_after_release("a1")
    node.clock.now += 10
    assert node.tracker.tick() == []
    node.clock.now += 15
    node.tracker.tick()
    assert statuses(node)[water] == (JobStatus.QUEUED, None)


def test_mr_is_spooled_only_when_selected() -> None:
    assert spooled_sop_classes(["CT"]) == (CT_IMAGE_STORAGE,)
    assert spooled_sop_classes(["CT", "mr"]) == (CT_IMAGE_STORAGE, MR_IMAGE_STORAGE)
    contexts = presentation_contexts(False, spooled_sop_classes(["CT", "MR"]))
    assert MR_IMAGE_STORAGE in {context.abstract_syntax for context in contexts}
    assert MR_IMAGE_STORAGE not in {context.abstract_syntax for context in presentation_contexts(False)}


def _mr_file(tmp_path: Path, sop_class: str = MRImageStorage) -> pydicom.Dataset:
    """One slice of the MR phantom's water series, as `sop_class` (Enhanced MR: only the class changes)."""
    study = mp.write_study(mp.make_mr_phantom(), tmp_path / "mr-study", images=("water",))
    ds = pydicom.dcmread(sorted(study.series["water"].iterdir())[0])
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
    return ds


def test_enhanced_mr_is_refused_with_a_reason_when_mr_is_selected(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    config = ReceiverConfig(ae_title="NODE", port=free_port(), bind_address="127.0.0.1", min_free_disk_mb=1)
    enhanced = _mr_file(tmp_path, EnhancedMRImageStorage)
    for modalities, status in ((["CT", "MR"], 0x0122), (["CT"], 0x0000)):  # not selected: discarded as other storage
        receiver = Receiver(config, spool, RecordingListener(), spooled=spooled_sop_classes(modalities))
        receiver.start()
        try:
            assoc = AE(ae_title="PYSCU").associate("127.0.0.1", receiver.port, [build_context(EnhancedMRImageStorage)],
                                                  ae_title="NODE")
            answer = assoc.send_c_store(enhanced)
            assoc.release()
        finally:
            receiver.stop(grace_s=2)
        assert answer.Status == status
        if status:
            assert "Enhanced MR not supported: send classic MR Image Storage" in answer.ErrorComment
    assert list(spool.root.glob("*/*/*.dcm")) == []


def test_the_watch_folder_takes_mr_when_selected_and_refuses_enhanced_mr(tmp_path: Path) -> None:
    inbox, rejected = tmp_path / "inbox", tmp_path / "rejected"
    config = ReceiverConfig(watch_dir=inbox, watch_rejected_dir=rejected, watch_stable_s=0.2, min_free_disk_mb=1)
    spool, listener = Spool(tmp_path / "spool"), RecordingListener()
    inbox.mkdir()
    _mr_file(tmp_path).save_as(inbox / "mr.dcm", enforce_file_format=True)
    _mr_file(tmp_path, EnhancedMRImageStorage).save_as(inbox / "enhanced.dcm", enforce_file_format=True)
    watcher = Watcher(config, spool, listener, spooled_sop_classes(["CT", "MR"]))
    watcher.start()
    try:
        listener.wait_released(1)
        wait_until(lambda: not any(inbox.iterdir()), "the inbox to empty", 20)
    finally:
        watcher.stop()
    (spooled,) = spool.root.glob("*/*/*.dcm")
    assert pydicom.dcmread(spooled).SOPClassUID == MRImageStorage
    reason = (rejected / "enhanced.dcm.reason.txt").read_text()
    assert "Enhanced MR not supported: send classic MR Image Storage" in reason


def test_the_watch_folder_refuses_mr_when_only_ct_is_selected(tmp_path: Path) -> None:
    inbox, rejected = tmp_path / "inbox", tmp_path / "rejected"
    config = ReceiverConfig(watch_dir=inbox, watch_rejected_dir=rejected, watch_stable_s=0.2, min_free_disk_mb=1)
    inbox.mkdir()
    _mr_file(tmp_path).save_as(inbox / "mr.dcm", enforce_file_format=True)
    watcher = Watcher(config, Spool(tmp_path / "spool"), RecordingListener())
    watcher.start()
    try:
        wait_until(lambda: (rejected / "mr.dcm.reason.txt").exists(), "the MR file to be rejected", 20)
    finally:
        watcher.stop()
    assert "is not CT Image Storage: only those series are measured" in (rejected / "mr.dcm.reason.txt").read_text()
