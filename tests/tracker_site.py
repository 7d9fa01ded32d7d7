"""A series tracker fed as the receiver feeds it: a spool, a state database and a settable clock.

Shared by the series-completion and retention tests.
"""

from __future__ import annotations

from pathlib import Path

import pydicom
from dicom_peers import ct_dataset
from pydicom.uid import generate_uid
from support import Clock

from node.config import CompletionConfig, SelectionConfig
from node.ingest.series import SeriesTracker
from node.ingest.spool import Receipt, Spool
from node.state.store import State


class TrackerSite:
    """A spool, a state database and a tracker on a fake clock, fed like the receiver feeds them."""

    def __init__(self, root: Path, selection: SelectionConfig | None = None, state: type[State] = State,
                 completion: CompletionConfig | None = None) -> None:
        self.clock = Clock(5000.0)
        self.completion = completion or CompletionConfig(release_quiet_s=5, idle_quiet_s=60)
        self.pending_file = root / "pending.json"
        self.spool = Spool(root / "spool")
        self.state = state(root / "state.sqlite", clock=self.clock)
        self.selection = selection or SelectionConfig(min_slices=3)
        self.tracker = self._tracker()
        self.study_uid, self.series_uid = generate_uid(), generate_uid()
        self.sent = 0

    def _tracker(self) -> SeriesTracker:
        return SeriesTracker(self.spool, self.state, self.completion, self.selection, clock=self.clock,
                             pending_file=self.pending_file)

    def restart(self) -> None:
        self.tracker = self._tracker()
        self.tracker.recover()

    def send(self, count: int, association: str, modality: str = "CT") -> None:
        for _ in range(count):
            ds = ct_dataset(self.study_uid, self.series_uid, self.sent, size=8)
            ds.Modality = modality
            self.sent += 1
            self.store(ds, association)

    def store(self, ds: pydicom.Dataset, association: str) -> None:
        path = self.spool.root.parent / "tmp.dcm"
        ds.save_as(path, enforce_file_format=True)
        instance = self.spool.store(path, Receipt(association, "SCU", self.clock.now))
        self.tracker.instance_stored(instance)

    def resend_spooled(self, association: str) -> None:
        for path in self.spool.series_files(self.study_uid, self.series_uid):
            self.tracker.instance_stored(self.spool.store(path, Receipt(association, "SCU", self.clock.now)))

    def complete_after_release(self, association: str) -> list[int]:
        self.tracker.association_released(association)
        self.clock.now += 6
        return self.tracker.tick()

    def jobs(self) -> list:
        return self.state.jobs()
