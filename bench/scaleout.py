"""Scale-out: studies/hour with 1, 2, 4 and 8 workers on one PostgreSQL, coordination cost per job,
and a 400 × 512² CT fetched over DICOMweb (WADO-RS) against the same series read from the local spool.

Real processes throughout (tests/scaleout_site.py): one `serve` receiving from storescu, N
`paraspinal-node worker` processes claiming on a PostgreSQL started here (initdb + pg_ctl), each
fetching its CT over WADO-RS and returning SEG, SR and key image by STOW-RS, and a storescp as the
PACS. The model is the precomputed segmenter with a fixed simulated time (`--model-s`, default 10 s),
on small phantoms, so that the two cores are not what limits N workers.

Prints, for each N: studies/hour (done jobs over the span from the first claim to the last
completion, from the database's run records) and efficiency = throughput(N) / (N × throughput(1));
then claim and complete (timed here, against the same server), fetch and STOW (the workers' stage
timings), in ms per job and as a share of a 15 s model; then the 400 × 512² fetch beside the spool read.

    .venv/bin/python bench/scaleout.py [--workers 1 2 4 8] [--jobs-per-worker 3] [--model-s 10] [--big 400]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import phantom as ph
import postgres as pg
from dicom_peers import storescp
from scaleout_site import Site
from support import wait_until

from node.config import DicomwebConfig
from node.pipeline.ct_load import load_ct
from node.service.dicomweb_client import ClientSettings, fetch_series
from node.state.store import JobStatus, NewDelivery, SeriesRecord, State, open_state


def small_series(root: Path, count: int) -> tuple[list[ph.DicomSeries], Path]:
    body = ph.make_phantom(spacing=(5.0, 3.0, 3.0))
    written = []
    for n in range(count):
        series = ph.write_dicom_series(body, root / f"ct{n}", patient_id=f"BENCH{n}")
        ph.write_masks(body, root / "precomputed" / series.series_uid)
        written.append(series)
    return written, root / "precomputed"


def studies_per_hour(state: State) -> float:
    runs = [r for r in state.runs() if r.outcome is not None and r.outcome.value == "done"]
    span = max(r.ended_at for r in runs) - min(r.started_at for r in runs)
    return len(runs) / span * 3600


def run_workers(work: Path, server: pg.Postgres, n: int, args: argparse.Namespace) -> tuple[float, State]:
    series, precomputed = small_series(work / f"data-{n}", n * args.jobs_per_worker)
    url = server.fresh_database()
    with storescp(work / f"pacs-{n}", "PACS") as pacs:
        site = Site(work / f"site-{n}", url, precomputed, pacs, model_s=args.model_s, lease_s=60.0)
        try:
            site.start_serve()
            for index in range(n):
                site.start_worker(index)
            for one in series:
                site.send(one.paths)
            state = open_state(url)
            wait_until(lambda: state.job_counts().get("done", 0) == len(series), f"{len(series)} jobs on {n} workers",
                       timeout_s=len(series) * args.model_s * 4 + 300, poll_s=0.5)
            return studies_per_hour(state), state
        finally:
            site.stop()


def stage_ms(state: State, stage: str) -> float:
    jobs = [j.id for j in state.jobs(1000) if j.status is JobStatus.DONE]
    return statistics.median(t.seconds for t in state.stage_timings(jobs) if t.stage == stage) * 1000


def claim_complete_ms(server: pg.Postgres, rounds: int = 200) -> tuple[float, float]:
    """Median claim and complete (with three deliveries) against the server, one job after another."""
    state = open_state(server.fresh_database(), serve="bench")
    for n in range(rounds):
        state.record_series(SeriesRecord(f"9.{n}", "9", "P", "A", "20240101", "CT", "", 40, "f", "/x"))
        state.add_job(f"9.{n}", "f", "/x")
    claims, completes = [], []
    for _ in range(rounds):
        started = time.perf_counter()
        job = state.claim("bench", 60, 3)
        claims.append(time.perf_counter() - started)
        started = time.perf_counter()
        state.complete(job.id, job.token, {"levels": []}, [NewDelivery("PACS@h:104", f"/o/{job.id}/{k}") for k in range(3)])
        completes.append(time.perf_counter() - started)
    return statistics.median(claims) * 1000, statistics.median(completes) * 1000


def fetch_against_spool(work: Path, server: pg.Postgres, slices: int, rounds: int) -> tuple[float, float, float]:
    """Median seconds for a `slices` × 512² CT: the WADO-RS fetch alone, fetch then load, and a load from the spool."""
    body = ph.make_phantom(shape=(slices, 512, 512))
    series = ph.write_dicom_series(body, work / "big")
    url = server.fresh_database()
    with storescp(work / "pacs-big", "PACS") as pacs:
        site = Site(work / "site-big", url, work, pacs, dicomweb=True)
        try:
            site.start_serve()
            site.send(series.paths)
            state = open_state(url)
            job = wait_until(lambda: state.claim("bench", 3600, 3), "the big series' job", 300, poll_s=0.5)
            record = state.get_series(job.series_uid)
            settings = ClientSettings.from_config(DicomwebConfig(token_file=site.root / "worker-token"))
            fetch_only, fetched, spooled = [], [], []
            for round_ in range(rounds):
                started = time.perf_counter()
                folder = work / f"fetched-{round_}"
                fetch_series(f"http://127.0.0.1:{site.dicomweb_port}", job, record, folder, settings)
                fetch_only.append(time.perf_counter() - started)
                load_ct(folder)
                fetched.append(time.perf_counter() - started)
                started = time.perf_counter()
                load_ct(Path(record.series_dir))
                spooled.append(time.perf_counter() - started)
            return statistics.median(fetch_only), statistics.median(fetched), statistics.median(spooled)
        finally:
            site.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--jobs-per-worker", type=int, default=3)
    parser.add_argument("--model-s", type=float, default=10.0)
    parser.add_argument("--big", type=int, default=400, help="slices of the 512² series fetched over WADO-RS (0: skip)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    server = pg.start_postgres()
    try:
        with tempfile.TemporaryDirectory(prefix="scaleout-bench-") as folder:
            work = Path(folder)
            throughput: dict[int, float] = {}
            last_state = None
            for n in args.workers:
                throughput[n], last_state = run_workers(work, server, n, args)
                base = throughput[args.workers[0]] / args.workers[0]
                print(f"workers {n}: {throughput[n]:.0f} studies/hour, efficiency {throughput[n] / (n * base):.2f} "
                      f"(model {args.model_s:g} s)", flush=True)
            claim_ms, complete_ms = claim_complete_ms(server)
            fetch_ms, stow_ms = stage_ms(last_state, "fetch"), stage_ms(last_state, "stow")
            total = claim_ms + complete_ms + fetch_ms + stow_ms
            print(f"coordination per job: claim {claim_ms:.1f} ms, fetch {fetch_ms:.0f} ms, STOW {stow_ms:.0f} ms, "
                  f"complete {complete_ms:.1f} ms; total {total:.0f} ms = {total / 150:.2f} % of a 15 s model")
            if args.big:
                fetch_only, fetched, spooled = fetch_against_spool(work, server, args.big, args.rounds)
                print(f"{args.big} x 512x512: WADO-RS fetch {fetch_only:.2f} s, spool read (load) {spooled:.2f} s: "
                      f"fetch/spool {fetch_only / spooled:.2f}; fetch then load {fetched:.2f} s: {fetched / spooled:.2f}")
    finally:
        pg.remove(server)
    return 0


if __name__ == "__main__":
    sys.exit(main())
