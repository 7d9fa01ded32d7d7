"""`paraspinal-node measure CT [--seg SEG] --out DIR [--dicom]`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from node.cli.exit_codes import ExitCode
from node.config import ConfigError, load_config
from node.errors import InputError


def add_subcommand(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("measure", help="measure one CT series (DICOM folder or NIfTI)")
    parser.add_argument("ct", type=Path, help="folder of one DICOM CT series, or a NIfTI file")
    parser.add_argument("--seg", type=Path, help="existing TotalSegmentator output: folder of masks or multilabel NIfTI")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--dicom", action="store_true", help="also write seg.dcm, sr.dcm and keyimage.dcm (DICOM input)")
    parser.add_argument("--config", type=Path, help="node.toml (segmenter and method options)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from node.pipeline.segment import SegmenterError, WeightsMissingError
    from node.run import run_pipeline

    try:
        config = load_config(args.config)
        result = run_pipeline(args.ct, args.out, config, seg_path=args.seg, dicom=args.dicom)
    except (ConfigError, InputError, WeightsMissingError, SegmenterError) as exc:
        print(f"paraspinal-node measure: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    except OSError as exc:
        print(f"paraspinal-node measure: {exc.strerror or exc}: {exc.filename or ''} (check the paths and permissions)",
              file=sys.stderr)
        return ExitCode.USAGE
    for name, path in result.files.items():
        print(f"{name}: {path}")
    return ExitCode.OK
