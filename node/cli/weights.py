"""`paraspinal-node weights check|install|urls`: the offline weights workflow for an admin."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from node.cli.exit_codes import ExitCode
from node.config import ConfigError, SegmenterConfig, load_config
from node.weights import InstallError, ModelState, install_zip, inventory, zips_in


def add_subcommand(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("weights", help="check or install TotalSegmentator weights (offline)")
    actions = parser.add_subparsers(dest="weights_command", required=True)

    check = actions.add_parser("check", help="list required model folders; exit 0 only when all are present")
    _add_common(check)
    check.set_defaults(handler=_check)

    install = actions.add_parser("install", help="unpack release zips into the weights directory")
    install.add_argument("--from", dest="source", type=Path, required=True,
                         help="folder of TotalSegmentator release zips, or one zip")
    _add_common(install)
    install.set_defaults(handler=_install)

    urls = actions.add_parser("urls", help="print the release zip URLs to fetch on a machine with internet")
    _add_common(urls)
    urls.set_defaults(handler=_urls)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path,
                        help="node.toml (segmenter.weights_dir, fast, vertebral_bodies; selection.modalities: MR adds its models)")
    parser.add_argument("--weights-dir", type=Path, help="overrides segmenter.weights_dir")


@dataclass(frozen=True)
class _Weights:
    """What the weights subcommands read from the config: the segmenter and which modalities are selected."""

    segmenter: SegmenterConfig
    modalities: tuple[str, ...]

    def inventory(self) -> list[ModelState]:
        return inventory(self.segmenter, self.modalities)


def _weights_config(args: argparse.Namespace) -> _Weights:
    config = load_config(args.config)
    if args.weights_dir is not None:
        config.segmenter.weights_dir = args.weights_dir
    return _Weights(config.segmenter, tuple(config.selection.modalities))


def _one_line_errors(handler: Callable[[argparse.Namespace, _Weights], int]) -> Callable[[argparse.Namespace], int]:
    """Every weights subcommand reads the config the same way and reports a bad one in one line."""

    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args, _weights_config(args))
        except (ConfigError, InstallError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return ExitCode.USAGE

    return run


def _report(config: _Weights) -> int:
    print(f"weights directory: {Path(config.segmenter.weights_dir).resolve()}")
    states = config.inventory()
    for state in states:
        if state.required:
            print(f"  {'present' if state.present else 'MISSING'}  {state.model.folder}")
        else:
            shown = "present" if state.present else "absent (optional: whole vertebrae are used)"
            print(f"  {shown}  {state.model.folder}")
    missing = [state.model for state in states if state.required and not state.present]
    if missing:
        print("fetch these on a machine with internet, then run "
              "`paraspinal-node weights install --from <folder of the zips>`:")
        for model in missing:
            print(f"  {model.url}")
        return ExitCode.FAILED
    return ExitCode.OK


@_one_line_errors
def _check(args: argparse.Namespace, config: _Weights) -> int:
    return _report(config)


@_one_line_errors
def _install(args: argparse.Namespace, config: _Weights) -> int:
    for archive in zips_in(args.source):
        for name in install_zip(archive, Path(config.segmenter.weights_dir)):
            print(f"installed {name} from {archive.name}")
    _report(config)  # what is still missing, for the admin; the install itself succeeded
    return ExitCode.OK


@_one_line_errors
def _urls(args: argparse.Namespace, config: _Weights) -> int:
    for state in config.inventory():
        print(state.model.url)
    return ExitCode.OK
