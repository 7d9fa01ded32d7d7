"""`paraspinal-node backfill`: start, list and cancel backfills of earlier studies from the PACS.

The command records the backfill in the state; the running `serve` of this config does the work
(README "Backfill"), so it goes on after a restart and shows on the status page.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from datetime import date
from pathlib import Path

from node.cli.exit_codes import ExitCode
from node.config import Config, ConfigError, load_config, load_query
from node.service.ids import serve_name
from node.state.backfill import BackfillProgress, NewBackfill
from node.state.store import StateError, open_configured

HOUR_S = 3600.0


def add_subcommand(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("backfill", help="measure earlier studies from the PACS ([backfill] in the config)",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=None, help="node TOML config (see config/node.toml)")
    parser.add_argument("--from", dest="date_from", type=_date, help="first study date, YYYY-MM-DD")
    parser.add_argument("--to", dest="date_to", type=_date, help="last study date, YYYY-MM-DD (default: today)")
    parser.add_argument("--query-config", type=Path, help="TOML with a [query] table overriding backfill.query")
    parser.add_argument("--no-send-results", action="store_true",
                        help="results of these studies go to the worklist and results folder only, not to the PACS")
    parser.add_argument("--list", action="store_true", help="show every backfill and its progress")
    parser.add_argument("--cancel", type=int, metavar="ID", help="stop a backfill (what it retrieved stays)")
    parser.add_argument("--format", choices=("text", "json"), default="text")
    parser.set_defaults(handler=_run)


def _date(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date: write YYYY-MM-DD, e.g. 2020-01-01") from None


def _run(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
        if args.cancel is not None:
            return _cancel(config, args.cancel)
        if args.list or args.date_from is None:
            return _list(config, args.format)
        return _start(config, args)
    except (ConfigError, StateError) as exc:
        print(f"paraspinal-node backfill: {exc}", file=sys.stderr)
        return ExitCode.USAGE


def _start(config: Config, args: argparse.Namespace) -> int:
    if config.backfill.pacs is None:
        raise ConfigError("no [backfill.pacs] in the config: name the PACS to query (ae_title, host, port)")
    date_to = args.date_to or date.today()
    if args.date_from > date_to:
        raise ConfigError(f"--from {args.date_from} is after --to {date_to}: swap them")
    query = load_query(args.query_config, config) if args.query_config else config.backfill.query
    state = open_configured(config)
    backfill_id = state.add_backfill(NewBackfill(
        serve=serve_name(config), date_from=args.date_from.strftime("%Y%m%d"), date_to=date_to.strftime("%Y%m%d"),
        query=dataclasses.asdict(query), send_results=config.backfill.send_results and not args.no_send_results))
    print(f"backfill {backfill_id}: {args.date_from} to {date_to} from {config.backfill.pacs.ae_title}, run by "
          f"`serve` ({serve_name(config)}); follow it with `paraspinal-node backfill --list` or on the status page")
    return ExitCode.OK


def _cancel(config: Config, backfill_id: int) -> int:
    if open_configured(config).cancel_backfill(backfill_id):
        print(f"backfill {backfill_id} cancelled")
        return ExitCode.OK
    print(f"paraspinal-node backfill: no running backfill {backfill_id} (see --list)", file=sys.stderr)
    return ExitCode.FAILED


def progress_row(progress: BackfillProgress) -> dict:
    """One backfill as the CLI and the status page show it."""
    backfill = progress.backfill
    eta = progress.eta_s()
    return {"id": backfill.id, "from": backfill.date_from, "to": backfill.date_to, "status": str(backfill.status),
            "searched_to": min(backfill.next_day, backfill.date_to) if backfill.searching else backfill.date_to,
            "searching": backfill.searching, "found": progress.found, "retrieved": progress.retrieved,
            "measured": progress.measured, "failed": progress.failed, "send_results": backfill.send_results,
            "eta_s": None if eta is None else round(eta)}


def _list(config: Config, output: str) -> int:
    state = open_configured(config)
    rows = [progress_row(p) for p in state.backfill_progress(time.time() - HOUR_S)]
    if output == "json":
        print(json.dumps(rows, indent=2))
        return ExitCode.OK
    if not rows:
        print("no backfills: start one with --from YYYY-MM-DD --to YYYY-MM-DD")
    for row in rows:
        eta = "unknown" if row["eta_s"] is None else f"{row['eta_s'] / 3600:.1f} h"
        search = f", searching at {row['searched_to']}" if row["searching"] else ""
        print(f"backfill {row['id']} {row['from']}..{row['to']} {row['status']}{search}: found {row['found']}, "
              f"retrieved {row['retrieved']}, measured {row['measured']}, failed {row['failed']}, ETA {eta}")
    return ExitCode.OK
