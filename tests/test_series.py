"""Series completion (quiet periods), selection rules, content fingerprints and restart recovery."""

from __future__ import annotations

import logging
import sqlite3
import time
from dataclasses import replace
from pathlib import Path

import pydicom
import pytest
from dicom_peers import ct_dataset
from pydicom.uid import generate_uid
from tracker_site import TrackerSite

from node.cli.main import main
from node.config import CompletionConfig, SelectionConfig
from node.ingest.series import SeriesSummary, selection_refusal
from node.ingest.spool import Receipt
from node.state.pending import WaitReason, read_pending
from node.state.store import JobStatus, State

CHEST = SeriesSummary(modalities=frozenset({"CT"}), image_types=(("ORIGINAL", "PRIMARY", "AXIAL"),),
                      slice_thicknesses=frozenset({1.0}), description="Thorax 1.0 B30f", body_part="CHEST",
                      kernel="B30f", instances=200)


@pytest.mark.parametrize(("change", "rules", "expected"), [
    ({"modalities": frozenset({"MR"})}, {}, "modality MR is not in selection.modalities"),
    ({"image_types": (("DERIVED", "SECONDARY", "AXIAL"),)}, {}, "lacks ORIGINAL, PRIMARY (selection.image_type)"),
    ({"image_types": (("ORIGINAL", "PRIMARY", "LOCALIZER"),)}, {}, "lacks AXIAL"),
    ({"slice_thicknesses": frozenset({1.0, 8.0})}, {}, "slice thickness 8 mm is outside"),
    ({"instances": 12}, {}, "12 slices, fewer than selection.min_slices (20)"),
    ({"description": "Topogram 0.6 T20f"}, {}, "matches selection.series_description_exclude"),
    ({}, {"series_description_include": "(?i)lung"}, "does not match selection.series_description_include"),
    ({"body_part": "HEAD"}, {"body_part_exclude": "HEAD|BRAIN"}, "body part 'HEAD' matches selection.body_part_exclude"),
    ({"kernel": "B70f"}, {"kernel_include": "B[1-4]"}, "kernel 'B70f' does not match selection.kernel_include"),
])
def test_each_rule_refuses_and_names_its_key(change: dict, rules: dict, expected: str) -> None:
    assert selection_refusal(CHEST, SelectionConfig()) is None
    reason = selection_refusal(replace(CHEST, **change), replace(SelectionConfig(), **rules))
    assert reason is not None and expected in reason


def test_defaults_select_low_dose_chest_and_missing_thickness() -> None:
    assert selection_refusal(replace(CHEST, description="LDCT low dose chest"), SelectionConfig()) is None
    assert selection_refusal(replace(CHEST, slice_thicknesses=frozenset()), SelectionConfig()) is None


@pytest.fixture
def node(tmp_path: Path) -> TrackerSite:
    return TrackerSite(tmp_path)


def test_series_completes_quiet_period_after_release(node: TrackerSite) -> None:
    node.send(4, "a1")
    node.clock.now += 30
    assert node.tracker.tick() == []  # association still open, idle period not over
    node.tracker.association_released("a1")
    node.clock.now += 4.9
    assert node.tracker.tick() == []
    node.clock.now += 0.2
    assert len(node.tracker.tick()) == 1
    (job,) = node.jobs()
    assert job.status is JobStatus.QUEUED and Path(job.series_dir) == node.spool.series_dir(node.study_uid,
                                                                                           node.series_uid)
    series = node.state.get_series(node.series_uid)
    assert (series.patient_id, series.accession, series.instances) == ("PID0001", "ACC1", 4)


def test_pause_longer_than_the_idle_period_inside_an_open_association_does_not_complete(node: TrackerSite) -> None:
    node.send(60, "a1")
    node.clock.now += 600  # ten idle periods, association still open
    assert node.tracker.tick() == []
    assert [(w.reason, w.instances) for w in node.tracker.waiting()] == [(WaitReason.OPEN_ASSOCIATION, 60)]
    node.send(76, "a1")
    assert len(node.complete_after_release("a1")) == 1
    assert node.state.get_series(node.series_uid).instances == 136 and len(node.jobs()) == 1


def test_series_spread_over_two_associations_waits_for_both(node: TrackerSite) -> None:
    node.send(2, "a1")
    node.send(2, "a2")
    node.tracker.association_released("a1")
    node.clock.now += 10
    assert node.tracker.tick() == []
    node.tracker.association_released("a2")
    node.clock.now += 5
    assert len(node.tracker.tick()) == 1


def test_same_content_again_is_not_queued_but_grown_series_is(node: TrackerSite) -> None:
    node.send(4, "a1")
    node.tracker.association_released("a1")
    node.clock.now += 6
    node.tracker.tick()
    first_instances = sorted(node.spool.series_files(node.study_uid, node.series_uid))
    for path in first_instances:  # the same instances resent: duplicates
        instance = node.spool.store(path, Receipt("a2", "SCU", node.clock.now))
        node.tracker.instance_stored(instance)
    node.tracker.association_released("a2")
    node.clock.now += 6
    assert node.tracker.tick() == []
    node.send(2, "a3")
    node.tracker.association_released("a3")
    node.clock.now += 6
    assert len(node.tracker.tick()) == 1
    assert [j.status for j in node.jobs()] == [JobStatus.QUEUED, JobStatus.QUEUED]
    assert node.state.get_series(node.series_uid).instances == 6


def test_unselected_series_is_recorded_as_skipped_with_the_rule(node: TrackerSite) -> None:
    node.send(4, "a1", modality="MR")
    node.tracker.association_released("a1")
    node.clock.now += 6
    node.tracker.tick()
    (job,) = node.jobs()
    assert job.status is JobStatus.SKIPPED and job.last_error == "modality MR is not in selection.modalities"


def test_restart_recovers_spooled_series_without_a_job(node: TrackerSite) -> None:
    node.send(4, "a1")  # the node dies before the series completes
    node.restart()
    node.clock.now += 5
    assert node.tracker.tick() == []  # the sender may still be resending: the idle period applies
    node.clock.now += 55
    assert len(node.tracker.tick()) == 1
    node.restart()  # a second restart finds the content already queued
    node.clock.now += 60
    assert node.tracker.tick() == []
    assert len(node.jobs()) == 1


def test_series_finished_after_a_restart_reads_headers_from_the_spool(node: TrackerSite) -> None:
    node.send(3, "a1")
    node.restart()
    node.send(2, "a2")
    node.tracker.association_released("a2")
    node.clock.now += 5
    node.tracker.tick()
    assert node.state.get_series(node.series_uid).instances == 5
    assert node.jobs()[0].status is JobStatus.QUEUED


def test_instance_replaced_with_same_size_content_is_queued_again(node: TrackerSite) -> None:
    node.send(3, "a1")
    assert len(node.complete_after_release("a1")) == 1
    corrected = pydicom.dcmread(node.spool.series_files(node.study_uid, node.series_uid)[0])
    corrected.PixelData = bytes(len(corrected.PixelData))  # corrected pixels, same size
    time.sleep(0.05)  # a real correction comes after the quiet period, never within one file-time tick
    node.store(corrected, "a2")
    assert len(node.complete_after_release("a2")) == 1
    assert len(node.jobs()) == 2


class LockedOnce(State):
    """The state database answering 'database is locked' to the first series record."""

    locked = True

    def record_series(self, record) -> None:
        if self.locked:
            self.locked = False
            raise sqlite3.OperationalError("database is locked")
        super().record_series(record)


def test_series_whose_job_could_not_be_recorded_stays_pending(tmp_path: Path, caplog) -> None:
    node = TrackerSite(tmp_path, state=LockedOnce)
    node.send(4, "a1")
    with caplog.at_level(logging.ERROR, logger="node.ingest.series"):
        assert node.complete_after_release("a1") == []
    assert any("event=series_finish_failed" in m for m in caplog.messages)
    assert node.tracker.pending_series() == 1
    node.clock.now += 10
    assert len(node.tracker.tick()) == 1
    assert node.jobs()[0].status is JobStatus.QUEUED


def test_next_completion_is_the_earliest_due_series(node: TrackerSite) -> None:
    assert node.tracker.next_completion_at() is None
    node.send(4, "a1")
    assert node.tracker.next_completion_at() is None  # association open: nothing is due
    node.tracker.association_released("a1")
    released = node.clock.now
    assert node.tracker.next_completion_at() == released + 5
    node.clock.now += 5
    assert len(node.tracker.tick()) == 1
    assert node.tracker.next_completion_at() is None


def test_abort_then_late_resend_processes_the_whole_series_once(node: TrackerSite) -> None:
    node.send(60, "a1")
    node.tracker.association_aborted("a1")
    node.clock.now += 3600
    assert node.tracker.tick() == [] and node.tracker.next_completion_at() is None
    assert [w.reason for w in node.tracker.waiting()] == [WaitReason.ABORTED]
    node.resend_spooled("a2")  # the sender starts again from the first instance
    node.send(76, "a2")
    assert len(node.complete_after_release("a2")) == 1
    assert node.state.get_series(node.series_uid).instances == 136 and len(node.jobs()) == 1


def test_release_after_refusals_waits_for_the_refused_instances(node: TrackerSite) -> None:
    node.send(60, "a1")
    node.tracker.instance_refused("a1", None, generate_uid())  # 0xA700: disk below the watermark
    node.tracker.instance_refused("a1", None, generate_uid())
    assert node.complete_after_release("a1") == []
    node.clock.now += 3600
    assert node.tracker.tick() == []
    assert [w.reason for w in node.tracker.waiting()] == [WaitReason.REFUSED]
    node.send(76, "a2")  # the sender sends what was refused and the rest
    assert len(node.complete_after_release("a2")) == 1
    assert node.state.get_series(node.series_uid).instances == 136


def test_an_instance_refused_and_sent_again_in_the_same_association_leaves_the_series_whole(node: TrackerSite) -> None:
    node.send(30, "a1")
    retried = ct_dataset(node.study_uid, node.series_uid, 30, size=8)
    node.tracker.instance_refused("a1", None, str(retried.SOPInstanceUID))
    node.store(retried, "a1")  # the sender retries it at once and it is stored
    assert len(node.complete_after_release("a1")) == 1
    assert node.state.get_series(node.series_uid).instances == 31


def test_an_association_open_when_the_series_was_cut_off_is_no_resend(node: TrackerSite) -> None:
    node.send(30, "a1")
    node.send(30, "a2")
    node.tracker.association_aborted("a1")
    node.send(10, "a2")
    assert node.complete_after_release("a2") == []
    assert [w.reason for w in node.tracker.waiting()] == [WaitReason.ABORTED]


def test_idle_completes_partial_processes_a_cut_off_series_when_configured(tmp_path: Path) -> None:
    node = TrackerSite(tmp_path, completion=CompletionConfig(release_quiet_s=5, idle_quiet_s=60, idle_completes_partial=True))
    node.send(60, "a1")
    node.tracker.association_aborted("a1")
    node.clock.now += 59
    assert node.tracker.tick() == []
    node.clock.now += 2
    assert len(node.tracker.tick()) == 1


def test_a_series_cut_off_by_a_restart_waits_for_the_resend_and_status_says_why(tmp_path: Path) -> None:
    node = TrackerSite(tmp_path)
    node.send(4, "a1")  # serve stops with the association open
    node.tracker.record_pending(force=True)
    node.restart()
    node.clock.now += 3600
    assert node.tracker.tick() == []
    (recorded,) = read_pending(node.pending_file)
    assert (recorded.series_uid, recorded.reason, recorded.instances) == (node.series_uid, WaitReason.ABORTED, 4)
    node.resend_spooled("a2")
    assert len(node.complete_after_release("a2")) == 1
    assert read_pending(node.pending_file) == []


def test_an_operator_can_complete_a_cut_off_series_as_it_is(tmp_path: Path, capsys) -> None:
    node = TrackerSite(tmp_path)
    node.send(60, "a1")
    node.tracker.association_aborted("a1")
    node.tracker.record_pending(force=True)
    config = tmp_path / "node.toml"
    config.write_text(f'[storage]\nstate_dir = "{tmp_path}"\n')
    assert main(["complete", "9.9.9", "--config", str(config)]) == 1
    assert "is not waiting for a resend" in capsys.readouterr().err
    assert main(["complete", node.series_uid, "--config", str(config)]) == 0
    assert "60 instances" in capsys.readouterr().out
    node.clock.now += 1
    assert node.tracker.tick() == []  # the request is taken; the release period starts now
    node.clock.now += 5
    assert len(node.tracker.tick()) == 1
    assert node.state.get_series(node.series_uid).instances == 60
