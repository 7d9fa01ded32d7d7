"""Backfill from a PACS (issue 21): the state on both backends, the throttle on an injected clock, and a real
Orthanc holding studies over several days as the PACS.

The Orthanc tests run the node's parts in this process (State, Spool, Receiver, SeriesTracker and the
BackfillRunner on a settable clock), so each step is taken when the test says: search a day, break a
retrieve, move the clock. tests/test_backfill_serve.py runs the same against `serve` with kill -9.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
from dicom_peers import ct_dataset, free_port
from orthanc import ORTHANC, Modality, Orthanc
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from support import Clock

from node.backfill.runner import BackfillRunner, next_day
from node.backfill.windows import WindowError, is_open, next_open, parse_windows
from node.config import BackfillConfig, Config, DestinationConfig, ReceiverConfig, SelectionConfig
from node.ingest.receiver import Receiver
from node.ingest.series import SeriesTracker
from node.ingest.spool import Spool
from node.query_retrieve import Answers, Retrieved
from node.state.backfill import Candidate, CandidateStatus, NewBackfill
from node.state.store import SeriesRecord, State, open_state

NODE_AE = "PARASPINAL"


# ------------------------------------------------------------------------------ windows


def test_windows_cover_nights_weekends_and_midnight() -> None:
    windows = parse_windows(["mon-fri 22:00-06:00", "sat-sun"])
    friday_night, saturday_noon = datetime(2025, 1, 3, 23, 30), datetime(2025, 1, 4, 12, 0)
    tuesday_early, monday_noon = datetime(2025, 1, 7, 5, 59), datetime(2025, 1, 6, 12, 0)
    sunday_after_midnight_window = datetime(2025, 1, 6, 3, 0)  # Monday 03:00: Sunday is whole-day only
    assert is_open(windows, friday_night) and is_open(windows, saturday_noon) and is_open(windows, tuesday_early)
    assert not is_open(windows, monday_noon)
    assert is_open(windows, sunday_after_midnight_window) is False
    assert next_open(windows, monday_noon) == datetime(2025, 1, 6, 22, 0)
    for bad in ("22-06", "mon-xyz", "25:00-06:00", "10:00-10:00"):
        with pytest.raises(WindowError):
            parse_windows([bad])


# ------------------------------------------------------------------------------ state, both backends


@pytest.fixture(params=["sqlite", "postgresql"])
def state(request, tmp_path: Path) -> Iterator[State]:
    location = request.getfixturevalue("postgres_url") if request.param == "postgresql" else tmp_path / "state.sqlite"
    opened = open_state(location, serve="recv1")
    yield opened
    opened.close()


def _series(uid: str) -> SeriesRecord:
    return SeriesRecord(series_uid=uid, study_uid="9.9", patient_id="P", accession="A", study_date="20240102",
                        modality="CT", description="chest", instances=30, fingerprint="f", series_dir="/x")


def test_backfill_state_records_days_once_skips_measured_and_counts_progress(state: State) -> None:
    state.record_series(_series("1.3"))
    done = state.add_job("1.3", "f", "/x")
    state._db.write(lambda tx: tx.execute("UPDATE jobs SET status = 'done' WHERE id = ?", (done.id,)))
    first = state.add_backfill(NewBackfill("recv1", "20240101", "20240103", {"protocols": ["chest"]}, False))
    found = [Candidate("1.1", "9.1", "20240101", 30), Candidate("1.2", "9.1", "20240101", 40),
             Candidate("1.3", "9.9", "20240101", 30)]
    assert state.record_backfill_day(first, "20240101", "20240102", found) == 3
    assert state.record_backfill_day(first, "20240101", "20240102", found) == 0  # a repeated transaction adds nothing
    assert state.backfills(running_only=True, serve="recv1")[0].next_day == "20240102"
    assert {c.candidate.series_uid: c.status for c in state.candidates(first)} == {
        "1.1": CandidateStatus.FOUND, "1.2": CandidateStatus.FOUND, "1.3": CandidateStatus.MEASURED}
    assert state.results_withheld("1.1") and state.backfill_expected("1.2") == 40

    state.start_retrieve("1.1", 100.0)
    state.start_retrieve("1.1", 100.0)  # repeated after a lost answer: one attempt
    state.retrieved("1.1", 101.0)
    state.start_retrieve("1.2", 200.0)
    state.retrieve_failed("1.2", "partial retrieve: 39 of 40", None)
    assert state.studies_retrieved_since(50.0) == {"9.1"} and state.studies_retrieved_since(150.0) == {"9.1"}
    assert [c.attempts for c in state.candidates(first)] == [1, 1, 0]
    second = state.add_backfill(NewBackfill("recv1", "20240101", "20240101", {}, True))
    assert state.record_backfill_day(second, "20240101", "20240102", found) == 1  # only the failed one is taken over
    assert not state.results_withheld("1.2")
    for day in ("20240102", "20240103"):
        state.record_backfill_day(first, day, next_day(day), [])
    assert state.finish_backfill(first) and not state.finish_backfill(first)
    progress = {p.backfill.id: p for p in state.backfill_progress(0.0)}
    assert (progress[first].found, progress[first].retrieved, progress[first].measured) == (2, 2, 1)
    assert progress[second].found == 1 and state.cancel_backfill(second)


# ------------------------------------------------------------------------------ throttle (a PACS in memory)


class MemoryPacs:
    """A PACS of `studies` one-series studies on one day; a move writes the series into the spool."""

    def __init__(self, spool: Spool, studies: int, instances: int = 3) -> None:
        self.spool, self.instances = spool, instances
        self.studies = [(f"1.2.{n}", f"1.3.{n}") for n in range(studies)]
        self.moves: list[str] = []

    def find(self, identifier: Dataset) -> Answers:
        if identifier.QueryRetrieveLevel == "STUDY":
            return Answers([_ds(StudyInstanceUID=s, StudyDate="20240102") for s, _ in self.studies], True, 0)
        study = identifier.StudyInstanceUID
        return Answers([_ds(SeriesInstanceUID=r, Modality="CT", SeriesDescription="Thorax", BodyPartExamined="CHEST",
                            NumberOfSeriesRelatedInstances=self.instances) for s, r in self.studies if s == study], True, 0)

    def move(self, identifier: Dataset, destination: str) -> Retrieved:
        self.moves.append(identifier.SeriesInstanceUID)
        folder = self.spool.series_dir(identifier.StudyInstanceUID, identifier.SeriesInstanceUID)
        folder.mkdir(parents=True, exist_ok=True)
        for n in range(self.instances):
            (folder / f"{n}.dcm").write_bytes(b"x")
        return Retrieved(0, self.instances, 0, 0)


def _ds(**values: object) -> Dataset:
    ds = Dataset()
    for key, value in values.items():
        setattr(ds, key, value)
    return ds


def backfill_config(**settings: object) -> Config:
    config = Config()
    config.selection = SelectionConfig(min_slices=1)
    config.backfill = BackfillConfig(pacs=DestinationConfig("PACS", "127.0.0.1", 104), retry_delay_s=60.0,
                                     **settings)
    return config


def test_fifty_studies_keep_to_the_hourly_limit_and_the_window(tmp_path: Path) -> None:
    start = datetime(2025, 1, 6, 12, 0).timestamp()  # Monday noon: outside the window
    clock = Clock(start)
    state = open_state(tmp_path / "state.sqlite", serve="recv1")
    spool = Spool(tmp_path / "spool")
    pacs = MemoryPacs(spool, 50)
    runner = BackfillRunner(backfill_config(studies_per_hour=10, windows=["18:00-08:00"], max_live_queue=100),
                            state, spool, clock=clock, pacs=pacs)
    state.add_backfill(NewBackfill("recv1", "20240102", "20240102", {"protocols": ["chest"],
                                                                      "modalities_in_study": ["CT"],
                                                                      "result_limit": 200}, True))
    for _ in range(3):
        assert not runner.run_once()  # closed: not even the search runs
    clock.now = datetime(2025, 1, 6, 18, 0).timestamp()
    begun: list[float] = []
    while clock.now < start + 48 * 3600 and len(pacs.moves) < 50:
        before = len(pacs.moves)
        runner.run_once()
        begun += [clock.now] * (len(pacs.moves) - before)
        clock.now += 30
    assert sorted(pacs.moves) == sorted(r for _, r in pacs.studies), "a series missed or retrieved twice"
    assert all(is_open(parse_windows(["18:00-08:00"]), datetime.fromtimestamp(t)) for t in begun)
    busiest = max(sum(1 for t in begun if s <= t < s + 3600) for s in begun)
    assert busiest <= 10, f"{busiest} studies in one hour with studies_per_hour = 10"
    assert busiest >= 9, "the limit was not used"
    assert not runner.run_once() and state.backfills()[0].status == "done"


def test_a_long_live_queue_pauses_the_backfill(tmp_path: Path) -> None:
    state = open_state(tmp_path / "state.sqlite", serve="recv1")
    spool = Spool(tmp_path / "spool")
    pacs = MemoryPacs(spool, 2)
    runner = BackfillRunner(backfill_config(max_live_queue=1), state, spool, clock=Clock(), pacs=pacs)
    state.add_backfill(NewBackfill("recv1", "20240102", "20240102", {"protocols": ["chest"],
                                                                      "modalities_in_study": ["CT"],
                                                                      "result_limit": 200}, True))
    for n in range(2):
        state.record_series(_series(f"7.{n}"))
        state.add_job(f"7.{n}", "f", "/x")
    runner.run_once()  # the search
    assert not runner.run_once() and pacs.moves == []
    state._db.write(lambda tx: tx.execute("UPDATE jobs SET status = 'done'"))
    assert runner.run_once() and len(pacs.moves) == 1


# ------------------------------------------------------------------------------ a real Orthanc


DAYS = ("20240102", "20240103", "20240104", "20240105")


@dataclasses.dataclass(frozen=True)
class Study:
    study_uid: str
    series: dict[str, str]  # series UID -> kind
    day: str


def write_study(folder: Path, day: str, time: str, kinds: dict[str, tuple[str, str, str, int]]) -> tuple[Study, list[Path]]:
    """kinds: name -> (modality, body part, description, instances); small 16x16 slices."""
    study_uid = generate_uid()
    files, series = [], {}
    for name, (modality, body_part, description, count) in kinds.items():
        series_uid = generate_uid()
        series[series_uid] = name
        for index in range(count):
            ds = ct_dataset(study_uid, series_uid, index, size=16)
            ds.StudyDate, ds.StudyTime, ds.Modality = day, time, modality
            ds.BodyPartExamined, ds.SeriesDescription = body_part, description
            path = folder / f"{series_uid}-{index}.dcm"
            ds.save_as(path, enforce_file_format=True)
            files.append(path)
    return Study(study_uid, series, day), files


@pytest.fixture(scope="module")
def pacs_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Orthanc, list[Study], int]]:
    """Orthanc holding four days of studies, at most two answers per C-FIND (LimitFindResults)."""
    if not ORTHANC.exists():
        pytest.skip(f"{ORTHANC} missing: apt-get install orthanc")
    root = tmp_path_factory.mktemp("pacs")
    node_port = free_port()
    orthanc = Orthanc(root / "orthanc", {"node": Modality(NODE_AE, node_port)}, "ORTHANC", {"LimitFindResults": 2})
    orthanc.start()
    chest = ("CT", "CHEST", "Thorax 1.0 B30f", 12)
    plan = [
        (DAYS[0], "081500", {"chest": chest, "scout": ("CT", "CHEST", "Topogram 0.6", 12)}),
        (DAYS[0], "101500", {"chest": chest}),
        (DAYS[0], "161500", {"head": ("CT", "HEAD", "Head 5.0", 12)}),  # three studies in a day: split by time
        (DAYS[1], "093000", {"chest": chest, "abdomen": ("CT", "ABDOMEN", "Abdomen 1.0", 12)}),
        (DAYS[2], "120000", {"mr": ("MR", "CHEST", "Thorax T1", 12)}),
        (DAYS[3], "140000", {"chest": chest}),
    ]
    studies = []
    folder = root / "files"
    folder.mkdir()
    for day, time, kinds in plan:
        study, files = write_study(folder, day, time, kinds)
        orthanc.upload(files)
        studies.append(study)
    yield orthanc, studies, node_port
    orthanc.stop()


@dataclasses.dataclass
class Site:
    state: State
    spool: Spool
    tracker: SeriesTracker
    receiver: Receiver
    clock: Clock
    config: Config

    def runner(self) -> BackfillRunner:
        """A new runner, as a restarted serve makes one."""
        return BackfillRunner(self.config, self.state, self.spool, self.receiver.store_handlers(),
                              list(self.receiver.spooled), clock=self.clock)

    def settle(self) -> None:
        """Let the tracker see every released association (release_quiet_s is tiny)."""
        import time

        time.sleep(0.3)
        self.tracker.tick()


@pytest.fixture
def site(pacs_site, tmp_path: Path) -> Iterator[Site]:
    orthanc, _, node_port = pacs_site
    config = Config()
    config.receiver = ReceiverConfig(ae_title=NODE_AE, port=node_port, bind_address="127.0.0.1", min_free_disk_mb=1)
    config.completion.release_quiet_s = 0.1
    config.selection.min_slices = 10
    config.backfill = BackfillConfig(pacs=DestinationConfig("ORTHANC", "127.0.0.1", orthanc.dicom_port),
                                     retry_delay_s=60.0, timeout_s=30.0)
    config.backfill.query.result_limit = 2
    state = open_state(tmp_path / "state.sqlite", serve="recv1")
    spool = Spool(tmp_path / "spool")
    tracker = SeriesTracker(spool, state, config.completion, config.selection)
    receiver = Receiver(config.receiver, spool, tracker)
    receiver.start()
    yield Site(state, spool, tracker, receiver, Clock(datetime(2025, 1, 6, 12).timestamp()), config)
    receiver.stop(grace_s=2)
    state.close()


def chest_series(studies: list[Study]) -> set[str]:
    return {uid for s in studies for uid, kind in s.series.items() if kind == "chest"}


def start(site: Site, send_results: bool = True) -> int:
    query = dataclasses.asdict(site.config.backfill.query)
    return site.state.add_backfill(NewBackfill("recv1", DAYS[0], DAYS[-1], query, send_results))


def test_backfill_finds_exactly_the_chest_cts_and_retrieves_each_once(site: Site, pacs_site) -> None:
    orthanc, studies, _ = pacs_site
    backfill = start(site)
    runner = site.runner()
    for _ in DAYS:
        assert runner.run_once()
    found = {c.candidate.series_uid for c in site.state.candidates(backfill)}
    assert found == chest_series(studies), "not exactly the chest CT series"
    for _ in range(10):
        if not runner.run_once():
            break
    site.settle()
    jobs = site.state.job_counts()
    assert jobs == {"queued": len(found)}, jobs
    assert {c.status for c in site.state.candidates(backfill)} == {CandidateStatus.RETRIEVED}
    assert runner.run_once() is False and site.state.backfills()[0].status == "done"


def test_a_partial_retrieve_is_retried_and_never_measured_partial(site: Site, pacs_site, tmp_path: Path) -> None:
    orthanc, studies, _ = pacs_site
    target = next(s for s in studies if s.day == DAYS[3])
    series_uid = next(iter(target.series))
    backfill = site.state.add_backfill(NewBackfill("recv1", DAYS[3], DAYS[3],
                                                   dataclasses.asdict(site.config.backfill.query), True))
    runner = site.runner()
    assert runner.run_once()  # the search: 12 instances listed
    instance = orthanc.instances_of(orthanc.get(f"/studies/{orthanc.study_id(target.study_uid)}")["Series"][0])[0]
    saved = orthanc.download(instance["ID"], tmp_path / "saved.dcm")
    orthanc.request("DELETE", f"/instances/{instance['ID']}")  # the PACS now sends 11 and says success
    try:
        assert runner.run_once()
        site.settle()
        row = site.state.candidates(backfill)[0]
        assert row.status is CandidateStatus.FOUND and row.attempts == 1 and "11 of 12" in row.last_error
        assert site.state.job_counts() == {}, "a partial series was queued for measurement"
        assert not runner.run_once()  # the retry waits for retry_delay_s
    finally:
        orthanc.upload([saved])
    site.clock.now += 61
    assert runner.run_once()
    site.settle()
    assert site.state.candidates(backfill)[0].status is CandidateStatus.RETRIEVED
    assert site.state.job_counts() == {"queued": 1}
    assert len(site.spool.series_files(target.study_uid, series_uid)) == 12


def test_a_restart_resumes_and_nothing_measured_is_retrieved_again(site: Site, pacs_site) -> None:
    orthanc, studies, _ = pacs_site
    measured = next(uid for s in studies if s.day == DAYS[1] for uid, kind in s.series.items() if kind == "chest")
    site.state.record_series(_series(measured))
    job = site.state.add_job(measured, "f", "/x")
    site.state._db.write(lambda tx: tx.execute("UPDATE jobs SET status = 'done' WHERE id = ?", (job.id,)))
    backfill = start(site, send_results=False)
    first = site.runner()
    first.run_once()
    first.run_once()  # two days searched, then "killed"
    assert site.state.backfills()[0].next_day == DAYS[2]
    second = site.runner()
    while second.run_once():
        pass
    site.settle()
    rows = {c.candidate.series_uid: c.status for c in site.state.candidates(backfill)}
    assert set(rows) == chest_series(studies)
    assert rows[measured] is CandidateStatus.MEASURED
    assert site.state.job_counts() == {"done": 1, "queued": len(rows) - 1}
    assert all(site.state.results_withheld(uid) for uid in rows)  # started with send_results off


def test_c_get_stores_through_the_receivers_path(site: Site, pacs_site) -> None:
    orthanc, studies, _ = pacs_site
    site.config.backfill.retrieve = "get"
    target = next(s for s in studies if s.day == DAYS[3])
    backfill = site.state.add_backfill(NewBackfill("recv1", DAYS[3], DAYS[3],
                                                   dataclasses.asdict(site.config.backfill.query), True))
    runner = site.runner()
    while runner.run_once():
        pass
    site.settle()
    assert site.state.candidates(backfill)[0].status is CandidateStatus.RETRIEVED
    assert len(site.spool.series_files(target.study_uid, next(iter(target.series)))) == 12
    assert site.state.job_counts() == {"queued": 1}
