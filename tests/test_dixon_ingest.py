"""Receiving a Dixon acquisition: the water and fat series become one job keyed on the water series."""

from __future__ import annotations

from pathlib import Path

import pydicom
from pydicom.uid import MRImageStorage, generate_uid
from tracker_site import TrackerSite

from node.config import CompletionConfig, SelectionConfig
from node.ingest.dicom import CT_IMAGE_STORAGE
from node.ingest.dixon import MR_IMAGE_STORAGE, spooled_sop_classes
from node.ingest.receiver import presentation_contexts
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
