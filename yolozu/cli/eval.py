"""``yolozu eval``: COCO mAP of a predictions.json on a YOLO-layout dataset, printed and optionally written.

The metrics themselves are ``yolozu.metrics``; this module is the command around them (paths, errors, exit codes).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from typing import Any, Sequence

from yolozu.cli.errors import describe
from yolozu.data import build_manifest
from yolozu.data.manifest import dataset_files, find_split
from yolozu.io.commit import write_outputs
from yolozu.io.paths import check_not_inputs, check_outputs, link_notes
from yolozu.io.predictions import load_predictions
from yolozu.metrics import EvaluationError, evaluate


def build_parser() -> argparse.ArgumentParser:
    """The ``yolozu eval`` command line."""
    parser = argparse.ArgumentParser(
        prog="yolozu eval",
        usage="%(prog)s --predictions FILE --dataset ROOT [--split NAME] [--output FILE]",
        description="COCO mAP of a predictions.json on a YOLO-layout dataset.",
    )
    parser.add_argument("--predictions", required=True, help="predictions.json (plain list or wrapped)")
    parser.add_argument("--dataset", required=True, help="dataset root with images/<split> and labels/<split>")
    parser.add_argument("--split", default=None, help="split name (default: auto-detected)")
    parser.add_argument("--output", default=None, help="also write the report to this JSON file")
    return parser


def _report(args: argparse.Namespace) -> dict[str, Any]:
    """Check the output path, evaluate, write the report (when asked): the whole command but printing."""
    outputs = check_outputs({"--output": args.output}, [("the --predictions file", args.predictions)])
    for note in link_notes(outputs):
        print(note, file=sys.stderr)
    split = args.split
    try:
        split = split or find_split(args.dataset)
        records = build_manifest(args.dataset, split)
        check_not_inputs(outputs, dataset_files(args.dataset, split, records))
        report = evaluate(load_predictions(args.predictions), records)
    except EvaluationError as e:
        hint = f" (split {split!r} was auto-detected; pass --split to evaluate another)" if args.split is None else ""
        raise EvaluationError(f"{e}{hint}") from None
    report = {"predictions": str(args.predictions), "dataset": str(args.dataset), "split": split, **report}
    if outputs:
        write_outputs([(outputs[0].target, report, 2)])
    return report


def _print_report(report: dict[str, Any]) -> None:
    """The report on stdout; stdout that cannot take it (``> /dev/full``, a closed pipe) is an OSError, and stdout
    is pointed at /dev/null so that Python's own flush at exit does not fail again with a traceback."""
    try:
        print(json.dumps(report, indent=2))
        sys.stdout.flush()
    except OSError as e:
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise OSError(f"cannot print the report to stdout: {e.strerror or e}") from None


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``--predictions P --dataset ROOT [--split S] [--output report.json]``; prints the JSON report.

    Exit codes and lines from the table of ``yolozu.cli.errors``: 0; 2 for a bad command line (an output path that
    cannot be written or names an input); 1 for inputs that cannot be used (the predictions, the dataset) or a
    report that cannot be written or printed; 130 on Ctrl-C. Every error is one line on stderr, and a failed run
    prints no report."""
    args = build_parser().parse_args(argv)
    try:
        _print_report(_report(args))
    except BaseException as e:  # noqa: B036 - every ending is a row of the table (yolozu.cli.errors)
        code, line = describe(e)
        if line is None:
            raise
        print(line, file=sys.stderr)
        return code
    return 0
