"""`paraspinal-node` command line: one subcommand per job, each returning an exit code."""

from __future__ import annotations

import argparse
import os
import sys

from node import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="paraspinal-node", description=__doc__)
    parser.add_argument("--version", action="version", version=__version__)
    sub = parser.add_subparsers(dest="command", required=True)
    from node.cli import backfill, measure, service, weights

    measure.add_subcommand(sub)
    weights.add_subcommand(sub)
    service.add_subcommand(sub)
    backfill.add_subcommand(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = int(args.handler(args))
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        return _output_closed()


def _output_closed() -> int:
    """The reader went away (`status | head`): exit quietly, with stdout pointed where a last flush cannot fail."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main())
