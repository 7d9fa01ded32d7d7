"""Scale-out end to end: one serve, three worker processes and a real PostgreSQL, faults injected.

storescu sends phantom series to `serve`; workers claim jobs on PostgreSQL, fetch each CT over
DICOMweb (WADO-RS) from serve, return SEG, SR and key image by STOW-RS, and serve sends them to a
real storescp playing the PACS (with unique file names, so a second copy of a result would show).
The model is the precomputed segmenter with a simulated model time. Faults, each checked after:
kill -9 of a worker mid-job, SIGSTOP of a worker past its lease then SIGCONT, `pg_ctl restart -m
immediate` mid-run, and kill -9 of serve while a worker needs it to take its results.
"""

from __future__ import annotations

import signal
import time
from collections import Counter
from pathlib import Path

import netns
import phantom as ph
import pydicom
import pytest
from dicom_peers import storescp
from scaleout_site import Site
from support import wait_until

from node.state.store import DeliveryStatus, JobStatus, RunOutcome, State

WAIT_S = 180.0


@pytest.fixture(scope="module")
def cts(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[ph.DicomSeries], Path]:
    root = tmp_path_factory.mktemp("scaleout-data")
    body = ph.make_phantom(spacing=(5.0, 3.0, 3.0))
    written = []
    for n in range(4):
        series = ph.write_dicom_series(body, root / f"ct{n}", patient_id=f"SCALE{n}", series_description="Chest")
        ph.write_masks(body, root / "precomputed" / series.series_uid)
        written.append(series)
    return written, root / "precomputed"


def _running_pid(state: State, exclude: set[int] = frozenset()) -> tuple[int, int, int]:
    """(pid, job, token) of a worker process that holds a live lease now, waiting for one."""
    def holder():
        for owner, lease in state.leases().items():
            pid = int(owner.split(":")[1])
            if pid not in exclude:
                return pid, lease.job_id, lease.token
        return None
    return wait_until(holder, "a worker holding a lease", WAIT_S, poll_s=0.02)


def _all_delivered(state: State, series_count: int) -> bool:
    jobs = state.jobs(100)
    done = [j for j in jobs if j.status is JobStatus.DONE]
    deliveries = state.deliveries()
    return len(done) == series_count and len(deliveries) == 3 * series_count and all(
        d.status is DeliveryStatus.SENT for d in deliveries)


@pytest.fixture
def network(postgres_server):
    """Each worker on a network of its own where `ip netns` is allowed (root, as in CI); else loopback."""
    if not netns.available():
        yield None
        return
    network = netns.TestNetwork()
    network.create()
    postgres_server.listen_also(netns.BRIDGE_ADDRESS)
    try:
        yield network
    finally:
        network.remove()


def test_faults_lose_nothing_and_send_nothing_twice(tmp_path: Path, postgres_server, postgres_url: str, cts,
                                                    network) -> None:
    series, precomputed = cts
    with storescp(tmp_path / "pacs", "PACS", "-uf") as pacs_port:
        site = Site(tmp_path / "site", postgres_url, precomputed, pacs_port, model_s=2.0, lease_s=4.0, network=network)
        try:
            site.start_serve()
            workers = [site.start_worker(i) for i in range(3)]
            state = site.state()
            if network is not None:  # each worker really is on a network of its own
                spaces = {Path(f"/proc/{w.popen.pid}/ns/net").readlink() for w in workers}
                assert len(spaces) == 3 and Path("/proc/self/ns/net").readlink() not in spaces

            # 1. kill -9 of a worker mid-job: its job runs again on another worker.
            site.send(series[0].paths)
            pid, job_id, _ = _running_pid(state)
            next(w for w in workers if w.popen.pid == pid).kill()
            workers.append(site.start_worker(3))

            # 2. SIGSTOP past the lease, then SIGCONT: its late completion is refused.
            site.send(series[1].paths)
            paused_pid, paused_job, paused_token = _running_pid(state, exclude={pid})
            paused = next(w for w in workers if w.popen.pid == paused_pid)
            paused.signal(signal.SIGSTOP)
            wait_until(lambda: any(r.token == paused_token and r.outcome is RunOutcome.LEASE_EXPIRED
                                   for r in state.runs()) or state.get_job(paused_job).token != paused_token,
                       "the paused worker's lease to expire and its job to be taken again", WAIT_S)
            paused.signal(signal.SIGCONT)

            # 3. PostgreSQL restarts (immediate: every connection cut) while a job runs.
            site.send(series[2].paths)
            _running_pid(state, exclude={pid})
            postgres_server.restart_immediate()

            # 4. serve dies (kill -9) as a worker stores its results (STOW-RS), then comes back.
            stows = site.count_in_worker_logs("event=results_storing")
            site.send(series[3].paths)
            wait_until(lambda: site.count_in_worker_logs("event=results_storing") > stows, "a STOW to begin",
                       WAIT_S, poll_s=0.005)
            site.serve.kill()
            time.sleep(1.0)
            site.start_serve()

            try:
                wait_until(lambda: _all_delivered(state, 4), "every series processed and delivered", WAIT_S, poll_s=0.2)
            except TimeoutError:
                raise AssertionError(f"jobs {state.jobs(100)}\ndeliveries {state.deliveries()}\n"
                                     f"runs {state.runs()}") from None
            _check(state, series, tmp_path / "pacs", paused_token, site)
        finally:
            site.stop()


def _check(state: State, series: list[ph.DicomSeries], pacs: Path, paused_token: int, site: Site) -> None:
    jobs = state.jobs(100)
    # every acknowledged instance was processed: one done job per series, over every instance sent
    assert sorted(j.series_uid for j in jobs if j.status is JobStatus.DONE) == sorted(s.series_uid for s in series)
    assert all(state.get_series(s.series_uid).instances == len(s.paths) for s in series)
    # every result reached the PACS exactly once
    received = Counter(str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
                       for p in pacs.iterdir() if p.is_file())
    assert len(received) == 3 * len(series) and set(received.values()) == {1}
    # the numbers are exact: the same phantom gives the same measurements for every series
    results = [state.job_result(j.id) for j in jobs if j.status is JobStatus.DONE]
    assert all(r["levels"] == results[0]["levels"] and r["total"] == results[0]["total"] for r in results)
    assert [level["level"] for level in results[0]["levels"]][:10] == [f"T{n}" for n in range(1, 11)]
    # no two runs of one series overlapped, as the database records them
    for one in series:
        runs = state.runs(one.series_uid)
        for earlier, later in zip(runs, runs[1:]):
            assert earlier.ended_at is not None and earlier.ended_at <= later.started_at
    # the faults happened: a run ended by the kill, the paused worker fenced off
    outcomes = Counter(r.outcome for r in state.runs())
    assert outcomes[RunOutcome.LEASE_EXPIRED] >= 2 and outcomes[RunOutcome.DONE] == len(series)
    paused_log = "".join(p.read_text() for p in site.root.glob("worker-*.log"))
    assert "event=job_lease_lost" in paused_log
    assert "event=state_database_unreachable" in paused_log and "event=state_database_back" in paused_log
    assert not any(r.token == paused_token and r.outcome is RunOutcome.DONE for r in state.runs())
