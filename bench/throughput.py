"""Studies per hour through the node's worker (issues 6 and 14): without and with overlap, in the same run.

N phantom CT series (same pixels, their own UIDs) are spooled as the receiver spools them
(Spool.store, then SeriesTracker turns each complete series into a job in a fresh SQLite state),
then worker processes run node.worker.run_worker, what `paraspinal-node worker --index I` runs,
until every job has ended. Each mode is a (workers, `worker.cpu_threads_per_engine`) pair: with 1
CPU thread a worker runs one job at a time; with 2 it loads the next CT and measures and encodes
the previous job while its engine segments the current one (issue 14). With several workers each
has its own engine, and one worker's CPU work overlaps another's GPU inference. With
`--engine resident` (the default) each worker starts its own resident model process, once, as
`paraspinal-node worker` does; `--engine totalsegmentator` measures the reference path.

Stand-in networks of the real architecture run on the machine (bench/e2e.py writes them), and the
model process hands back the phantom's true labels so that measure and encode cost what they cost
on a real segmentation. GPU utilisation is sampled with nvidia-smi every 0.5 s.

    .venv/bin/python bench/throughput.py                    # 10 CTs, 1 worker, 1 then 2 CPU threads, GPU
    .venv/bin/python bench/throughput.py --workers 1 2 --cpu-threads 1 2          # all four modes
    .venv/bin/python bench/throughput.py --device cpu --size 64 --slices 64 --tiny --no-body --count 3
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Self

sys.path.insert(0, str(Path(__file__).resolve().parent))

from e2e import (
    add_ct_arguments,
    describe_machine,
    hook_model_process,
    phantom_series,
    segmenter_settings,
    standin_weights,
    work_folder,
)

if __name__ == "__mp_main__":
    hook_model_process()


class GpuSampler:
    """utilization.gpu of one GPU every 0.5 s, from a side thread, while the workers run."""

    def __init__(self, device: str) -> None:
        self.index = None
        if device.startswith("gpu") and shutil.which("nvidia-smi"):
            self.index = device[4:] if device.startswith("gpu:") else "0"
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="gpu-sampler", daemon=True)

    def __enter__(self) -> Self:
        if self.index is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _sample(self) -> None:
        command = ["nvidia-smi", "-i", self.index, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"]
        while not self._stop.wait(0.5):
            answer = subprocess.run(command, check=False, capture_output=True, text=True, timeout=10)
            if answer.returncode == 0 and answer.stdout.strip().isdigit():
                self.samples.append(int(answer.stdout.strip()))

    def summary(self) -> str:
        if self.index is None:
            return "n/a (not on a GPU, or no nvidia-smi)"
        if not self.samples:
            return "n/a (nvidia-smi gave no samples)"
        busy = sum(s > 0 for s in self.samples) / len(self.samples)
        return (f"mean {statistics.mean(self.samples):.0f} %, median {statistics.median(self.samples):.0f} %, "
                f"max {max(self.samples)} %, busy (>0 %) {100 * busy:.0f} % of {len(self.samples)} samples")


def write_config(folder: Path, args: argparse.Namespace, weights: Path, cpu_threads: int) -> Path:
    """The node's TOML config for this run: its own state folder, no retries so failures show at once."""
    settings = segmenter_settings(args, weights)
    segmenter = "\n".join(f"{key} = {_toml(value)}" for key, value in settings.items())
    text = (f"[storage]\nstate_dir = {_toml(folder / 'state')}\n\n[segmenter]\n{segmenter}\n\n"
            f"[worker]\nmax_attempts = 1\npoll_s = 0.2\ncpu_threads_per_engine = {cpu_threads}\n\n"
            "[logging]\nlevel = \"WARNING\"\n")
    path = folder / "node.toml"
    path.write_text(text, encoding="utf-8")
    return path


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def queue_series(config, series: list[Path]) -> None:
    """Spool every file and let SeriesTracker make the jobs, as the receiver and scheduler do."""
    from node.config import CompletionConfig
    from node.ingest.series import SeriesTracker
    from node.ingest.spool import Receipt, Spool
    from node.state.store import open_state

    state = open_state(config.storage.database)
    spool = Spool(config.storage.spool_dir)
    tracker = SeriesTracker(spool, state, CompletionConfig(release_quiet_s=0.01), config.selection)
    for number, folder in enumerate(series):
        receipt = Receipt(f"bench-{number}", "BENCH", time.time())
        for path in sorted(folder.glob("*")):
            if path.name != "complete":
                tracker.instance_stored(spool.store(path, receipt))
        tracker.association_released(receipt.association_id)
    time.sleep(0.05)
    tracker.tick()
    counts = state.job_counts()
    state.close()
    if counts.get("queued", 0) != len(series):
        raise SystemExit(f"expected {len(series)} queued jobs, the node made {counts}: check the selection rules")


def run_workers(config_path: Path, config, workers: int, timeout_s: float, device: str) -> tuple[float, str]:
    """Start the workers, wait until no job is queued or running, stop them; (seconds, GPU utilisation).

    The bench owns the state dir while they run, as serve would: workers take jobs only under an owner.
    """
    from node.service.owner import StateDirOwner
    from node.state.store import open_state

    owner = StateDirOwner(config.storage.state_dir)
    owner.acquire()
    state = open_state(config.storage.database)
    command = [sys.executable, str(Path(__file__).resolve()), "--config", str(config_path), "--worker-index"]
    with GpuSampler(device) as sampler:
        started = time.perf_counter()
        processes = [subprocess.Popen(command + [str(index)]) for index in range(workers)]
        try:
            while _unfinished(state) and time.perf_counter() - started < timeout_s:
                if any(p.poll() is not None for p in processes):
                    raise SystemExit("a worker process exited during the run: see its output above")
                time.sleep(0.2)
            seconds = time.perf_counter() - started
        finally:
            for process in processes:
                process.terminate()
            for process in processes:
                process.wait()
    _print_outcome(state, seconds, timeout_s, workers)
    state.close()
    owner.release()
    return seconds, sampler.summary()


def _unfinished(state) -> bool:
    counts = state.job_counts()
    return counts.get("queued", 0) + counts.get("running", 0) > 0


def _print_outcome(state, seconds: float, timeout_s: float, workers: int) -> None:
    counts = state.job_counts()
    print(f"    jobs: {dict(sorted(counts.items()))}" + (f" (stopped at --timeout {timeout_s:g} s)"
                                                         if seconds >= timeout_s else ""))
    present = []
    for job in state.jobs():
        if job.status != "done":
            print(f"    job {job.id} {job.status}: {job.last_error}")
            continue
        present.append(sum(level["status"] != "absent" for level in state.job_result(job.id)["levels"]))
    print(f"    levels present per done job: {present}")
    jobs = [job.id for job in state.jobs(limit=100000)]
    stages: dict[str, list[float]] = {}
    for timing in state.stage_timings(jobs):
        stages.setdefault(timing.stage, []).append(timing.seconds)
    print("    mean per job: " + ", ".join(f"{stage} {statistics.mean(s):.2f} s" for stage, s in stages.items()))
    if "segment" in stages:  # how busy the engines were: what overlap is meant to raise
        print(f"    engines busy (segment time / wall time / workers): {sum(stages['segment']) / seconds / workers:.0%}")


def measure_mode(work: Path, args: argparse.Namespace, weights: Path, series: list[Path], mode: tuple[int, int]) -> float:
    """One (workers, CPU threads per engine) mode in a fresh state folder; returns studies per hour."""
    from node.config import load_config

    workers, cpu_threads = mode
    folder = work / f"node-{workers}-workers-{cpu_threads}-threads"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    config_path = write_config(folder, args, weights, cpu_threads)
    config = load_config(config_path, environ={})
    queue_series(config, series)
    print(f"{_name(mode)}, {len(series)} CTs:")
    seconds, utilisation = run_workers(config_path, config, workers, args.timeout, args.device)
    rate = len(series) / seconds * 3600
    print(f"    {seconds:.1f} s, {seconds / len(series):.1f} s per study, {rate:.1f} studies/hour")
    print(f"    GPU utilisation: {utilisation}")
    shutil.rmtree(folder, ignore_errors=True)
    return rate


def _name(mode: tuple[int, int]) -> str:
    workers, cpu_threads = mode
    return f"{workers} worker(s) x {cpu_threads} CPU thread(s) per engine ({'overlap' if cpu_threads > 1 else 'one job at a time'})"


def worker_main(config_path: Path, index: int) -> int:
    """A worker process, as `paraspinal-node worker --index I` starts one (bench/e2e.py's hook included)."""
    from node.config import load_config
    from node.logs import configure
    from node.service.worker import run_worker
    from node.state.store import open_state

    config = load_config(config_path)
    configure(config.logging)
    return run_worker(config, open_state(config.storage.database), index)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_ct_arguments(parser)
    parser.add_argument("--count", type=int, default=10, help="CTs in a row")
    parser.add_argument("--workers", type=int, nargs="+", default=[1],
                        help="worker counts to measure, one after the other; the gain is against the first mode")
    parser.add_argument("--cpu-threads", type=int, nargs="+", default=[1, 2],
                        help="worker.cpu_threads_per_engine values to measure for each worker count (1: no overlap)")
    parser.add_argument("--timeout", type=float, default=3000.0, help="seconds per mode before giving up")
    parser.add_argument("--config", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker_index is not None:
        return worker_main(args.config, args.worker_index)

    print(f"machine: {describe_machine(args.device)}")
    print(f"settings: {args.count} CTs {args.slices}x{args.size}x{args.size}, spacing {args.spacing or 'fitted'}, "
          f"{'tiny networks' if args.tiny else f'real architecture, patch {args.patch}'}, "
          f"crop ROI HU >= {args.crop_threshold_hu:g}, fast {args.fast}, vertebrae_body {not args.no_body}, "
          f"workers {args.workers}, CPU threads per engine {args.cpu_threads}")
    with work_folder(args, "bench-throughput-") as work:
        weights = standin_weights(work, args)
        series = phantom_series(work, args, args.count)
        modes = [(workers, threads) for workers in args.workers for threads in args.cpu_threads]
        rates = [measure_mode(work, args, weights, series, mode) for mode in modes]
    for mode, rate in zip(modes[1:], rates[1:]):
        print(f"{_name(mode)} / {_name(modes[0])}: {rate / rates[0]:.2f}x "
              f"({rates[0]:.1f} -> {rate:.1f} studies/hour)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
