"""Node service subcommands: serve, worker, status, retry, echo, config check, worklist.

Every command takes --config FILE (environment variables PARASPINAL_<SECTION>_<KEY> override it)
and returns 0 on success, 1 when the operation failed, 2 for a usage or configuration problem.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

from node.cli.exit_codes import ExitCode
from node.config import Config, ConfigError, load_config
from node.logs import configure
from node.service.owner import PRIVATE_UMASK
from node.state.pending import pending_path, read_pending, request_completion
from node.state.store import StateError, open_configured
from node.web.status import THROUGHPUT_WINDOW_S, WorkerView, worker_views


def add_subcommand(subparsers: argparse._SubParsersAction) -> None:
    serve = _add(subparsers, "serve", "run the node: receiver, watch folder, scheduler, sender, workers", _serve)
    serve.add_argument("--init", action="store_true",
                       help="start with a new state.sqlite although the spool or outbox holds files "
                            "(everything spooled is processed and sent again)")
    worker = _add(subparsers, "worker", "run job workers (one per GPU in a multi-GPU install)", _worker)
    worker.add_argument("--count", type=int, default=1, help="worker processes to run (default 1)")
    worker.add_argument("--index", type=int, default=None, help=argparse.SUPPRESS)
    status = _add(subparsers, "status", "queue depths, recent errors and the state of each job", _status)
    status.add_argument("--jobs", type=int, default=50, help="how many recent jobs to list (default 50)")
    status.add_argument("--format", choices=("text", "json"), default="text")
    retry = _add(subparsers, "retry", "queue a failed/held/skipped job again, or resend its failed deliveries",
                 _retry)
    retry.add_argument("job", type=int, help="job number from `status`")
    complete = _add(subparsers, "complete", "process a series that waits for its sender's resend as it is (partial)",
                    _complete)
    complete.add_argument("series", help="Series Instance UID from `status`")
    echo = _add(subparsers, "echo", "C-ECHO a DICOM peer with the node's AE title", _echo)
    echo.add_argument("peer", help="AE@host:port, e.g. PACS@10.0.0.5:104")
    config = subparsers.add_parser("config", help="configuration tools")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    _add(config_sub, "check", "validate the config file and show the effective values", _config_check)
    worklist = _add(subparsers, "worklist", "screening worklist of processed studies", _worklist)
    worklist.add_argument("--since", help="only studies with StudyDate on or after this date (YYYY-MM-DD)")
    worklist.add_argument("--format", choices=("csv", "json"), default="csv")
    worklist.add_argument("--where", action="append", default=[], metavar="COLUMN<NUMBER",
                          help='keep rows where a column compares so, e.g. "t1_t10_median_hu_per_year<-2" '
                               "(muscle HU fell more than 2 HU a year); repeatable")
    worklist.add_argument("--sort", metavar="[-]COLUMN", help="order by a column, descending with a leading -")
    trend = _add(subparsers, "trend", "one patient's results over time from the state, with the change of each",
                 _trend)
    trend.add_argument("patient_id", help="Patient ID as the series carry it")
    trend.add_argument("--format", choices=("text", "json"), default="text")


def _add(subparsers: argparse._SubParsersAction, name: str, help_text: str, handler) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(name, help=help_text, description=help_text)
    parser.add_argument("--config", type=Path, default=None, help="node TOML config (see config/node.toml)")
    parser.set_defaults(handler=lambda args: _guarded(handler, args))
    return parser


def _guarded(handler, args: argparse.Namespace) -> int:
    """Configuration and state problems end in one line naming the fix, never a traceback."""
    try:
        config = load_config(args.config)
        return handler(args, config)
    except (ConfigError, StateError) as exc:
        print(f"paraspinal-node {args.command}: {exc}", file=sys.stderr)
        return ExitCode.USAGE


def _serve(args: argparse.Namespace, config: Config) -> int:
    from node.service.serve import StartError, serve

    os.umask(PRIVATE_UMASK)
    configure(config.logging)
    try:
        return serve(config, args.config, args.init)
    except StartError as exc:
        print(f"paraspinal-node serve: {exc}", file=sys.stderr)
        return ExitCode.USAGE


def _worker(args: argparse.Namespace, config: Config) -> int:
    from node.service.worker import run_worker

    os.umask(PRIVATE_UMASK)
    configure(config.logging)
    store = open_configured(config)
    if args.index is not None or args.count == 1:
        return run_worker(config, store, args.index or 0)
    from node.service.serve import stop_on_signals
    from node.service.supervisor import WorkerSupervisor

    stop = stop_on_signals()
    supervisor = WorkerSupervisor(args.config, args.count, store)
    while not stop.wait(1.0):
        supervisor.check()
    supervisor.stop()
    return ExitCode.OK


def _status(args: argparse.Namespace, config: Config) -> int:
    state = open_configured(config)
    jobs = state.jobs(args.jobs)
    report = {
        "pending_series": [{"series": p.series_uid, "instances": p.instances, "reason": str(p.reason),
                            "why": p.reason.description, "since": _when(p.since)}
                           for p in read_pending(pending_path(config.storage.state_dir))],
        "jobs": state.job_counts(),
        "deliveries": state.delivery_counts(),
        "workers": [_worker_row(view) for view in worker_views(state, state.now())],
        "hosts": [{"host": h.host, "done_last_hour": h.done, "running": h.running}
                  for h in state.host_throughput(THROUGHPUT_WINDOW_S)],
        "recent_errors": [{"kind": k, "id": i, "error": e} for k, i, e in state.recent_errors()],
        "recent_jobs": [{"id": j.id, "series": j.series_uid, "status": str(j.status), "attempts": j.attempts,
                         "updated": _when(j.updated_at), "last_error": j.last_error} for j in jobs],
    }
    print(json.dumps(report, indent=2) if args.format == "json" else _status_text(report))
    return ExitCode.OK


def _worker_row(view: WorkerView) -> dict:
    report = view.record.report
    return {"host": report.host, "pid": report.pid, "slot": report.index, "device": report.device,
            "state": "running" if view.lease else "idle" if view.alive else "lost",
            "job": view.job_id, "lease_until": _when(view.lease.expires_at) if view.lease else None,
            "heartbeat": _when(view.record.heartbeat_at)}


def _status_text(report: dict) -> str:
    lines = ["jobs:       " + _counts(report["jobs"]), "deliveries: " + _counts(report["deliveries"]), ""]
    lines += ["workers:"] + [
        f"  {w['host']} pid {w['pid']} slot {w['slot']} on {w['device']}: {w['state']}"
        + (f" job {w['job']} lease until {w['lease_until']}" if w["job"] else "") + f", heartbeat {w['heartbeat']}"
        for w in report["workers"]]
    lines += ["hosts (last hour):"] + [f"  {h['host']}: {h['done_last_hour']} done, {h['running']} running"
                                       for h in report["hosts"]]
    lines += [""]
    lines += ["series being received (as serve last recorded them):"] + [
        f"  {p['series']}  {p['instances']} instances since {p['since']}: {p['why']}" for p in report["pending_series"]]
    lines += [""]
    lines += ["recent errors:"] + [f"  {e['kind']} {e['id']}: {e['error']}" for e in report["recent_errors"]]
    lines += ["", f"{'job':>6}  {'status':8} {'tries':>5}  {'updated':19}  series / last error"]
    for job in report["recent_jobs"]:
        line = f"{job['id']:>6}  {job['status']:8} {job['attempts']:>5}  {job['updated']:19}  {job['series']}"
        lines.append(line + (f"\n{'':44}{job['last_error']}" if job["last_error"] else ""))
    return "\n".join(lines)


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{status} {n}" for status, n in sorted(counts.items())) or "none"


def _when(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


def _retry(args: argparse.Namespace, config: Config) -> int:
    print(open_configured(config).retry(args.job))
    return ExitCode.OK


def _complete(args: argparse.Namespace, config: Config) -> int:
    """Leave a request for the running serve; only a series `status` lists as waiting can be completed."""
    state_dir = config.storage.state_dir
    waiting = {p.series_uid: p for p in read_pending(pending_path(state_dir))}
    if args.series not in waiting or not waiting[args.series].reason.waits_for_resend:
        why = waiting[args.series].reason.description if args.series in waiting else "it is not being received"
        print(f"paraspinal-node complete: series {args.series} is not waiting for a resend ({why}): "
              "see `paraspinal-node status`", file=sys.stderr)
        return ExitCode.FAILED
    try:
        request_completion(state_dir, args.series)
    except ValueError as exc:
        print(f"paraspinal-node complete: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    print(f"series {args.series} ({waiting[args.series].instances} instances): serve processes it as it is "
          f"within a few seconds, after completion.release_quiet_s ({config.completion.release_quiet_s:g} s)")
    return ExitCode.OK


def _echo(args: argparse.Namespace, config: Config) -> int:
    from node.delivery.destinations import DicomPeer
    from node.delivery.sender import echo
    from node.tls import TlsError

    try:
        peer = DicomPeer.from_key(args.peer).config
    except ValueError as exc:
        print(f"paraspinal-node echo: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    priors = config.priors.peer if config.priors.pacs else None
    known = [p for p in [*config.destinations, config.backfill.pacs, priors] if p is not None]
    peer = next((p for p in known if (p.ae_title, p.host, p.port) == (peer.ae_title, peer.host, peer.port)), peer)
    try:  # a configured peer is echoed with its TLS settings
        outcome = echo(peer, config.receiver.ae_title, config.delivery.timeout_s)
    except TlsError as exc:
        print(f"paraspinal-node echo: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    print(f"{args.peer}: {outcome.describe()}")
    return ExitCode.OK if outcome.ok else ExitCode.FAILED


def _config_check(args: argparse.Namespace, config: Config) -> int:
    from node.weights import missing_models

    source = args.config or "built-in defaults"
    print(f"config OK ({source})")
    print(f"  receiver:     {config.receiver.ae_title} on {config.receiver.bind_address}:{config.receiver.port}")
    print(f"  state:        {config.storage.state_dir}")
    print("  destinations: " + (", ".join(f"{d.ae_title}@{d.host}:{d.port}" for d in config.destinations) or "none"))
    print(f"  segmenter:    {config.segmenter.backend} on {config.segmenter.device}")
    for warning in exposure_warnings(config):
        print(f"  warning: {warning}")
    if config.segmenter.backend == "totalsegmentator":
        missing = missing_models(config.segmenter, config.selection.modalities)
        if missing:
            print(f"  warning: weights missing in {config.segmenter.weights_dir}: {', '.join(missing)} "
                  "(jobs will be held until `paraspinal-node weights install` adds them)")
    return ExitCode.OK


def exposure_warnings(config: Config) -> list[str]:
    """What `serve` warns about at start on exposure, word for word: an open receiver, open pages, a readable secret."""
    from node.service.serve import exposure_warning
    from node.web.auth import readable_secret_warning, unprotected_warning

    warnings = [exposure_warning(config.receiver), unprotected_warning(config.web)]
    secret = config.web.secret_file
    if config.web.enabled and config.web.auth != "none" and secret is not None:
        with contextlib.suppress(OSError):  # unreadable: serve refuses to start, naming the file
            warnings.append(readable_secret_warning(secret, secret.stat().st_mode))
    return [warning for warning in warnings if warning is not None]


def _worklist(args: argparse.Namespace, config: Config) -> int:
    from node.state.worklist import parse_condition, parse_since, render, select, worklist_row

    try:
        since = parse_since(args.since) if args.since else None
        conditions = [parse_condition(text) for text in args.where]
        select([], [], args.sort)  # a misspelt --sort is a usage error even on an empty worklist
    except ValueError as exc:
        print(f"paraspinal-node worklist: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    state = open_configured(config)
    rows = [worklist_row(series, job_id, result, config.measure.low_attenuation_hu)
            for series, job_id, result in state.processed(since)]
    sys.stdout.write(render(select(rows, conditions, args.sort), args.format))
    return ExitCode.OK


def _trend(args: argparse.Namespace, config: Config) -> int:
    """Every done result of one patient, oldest first: T1-T10 and bone figures, and the change each job found."""
    from node.state.worklist import trend_rows

    rows = trend_rows(open_configured(config).patient_results(args.patient_id, limit=1000))
    if not rows:
        print(f"paraspinal-node trend: no results for Patient ID {args.patient_id!r} in the state", file=sys.stderr)
        return ExitCode.FAILED
    if args.format == "json":
        print(json.dumps(rows, indent=2))
        return ExitCode.OK
    names = list(rows[0])
    print("  ".join(names))
    for row in rows:
        print("  ".join("-" if row[name] is None else f"{row[name]:.1f}" if isinstance(row[name], float)
                        else str(row[name]) for name in names))
    return ExitCode.OK
