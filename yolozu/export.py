"""``yolozu export`` / ``tools/export_predictions.py``: manifest -> adapter -> [TTT] -> predict -> [TTA] -> write.

Without ``--ttt`` (and ``--tta``) the predictions are exactly ``adapter.predict(records)``: byte-identical to
a build without test-time training. Every output path is checked before any work (``yolozu.output_paths``: no two
outputs on one file, no input as an output, no device or FIFO), and the outputs are written together only
when the whole run succeeded: an error, Ctrl-C or a kill leaves every output as it was. Every error is one
line on stderr: exit 2 for a bad command line, 1 for a run that failed, 130 for Ctrl-C.
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime, timezone
from typing import Sequence

import torch
from tqdm import tqdm

from yolozu.adapter_args import AdapterUsageError, adapter_from_args, add_adapter_flags
from yolozu.data import build_manifest
from yolozu.data.manifest import dataset_files, find_split
from yolozu.faults import kill_point
from yolozu.flip_tta import MERGES, FlipTTAConfig
from yolozu.output_paths import OutputPath, OutputPathError, check_not_inputs, check_outputs, link_notes
from yolozu.outputs import write_outputs
from yolozu.predict import NON_FINITE, Predictor
from yolozu.predictions import wrap
from yolozu.tta.config import TTTConfig
from yolozu.tta.integration import disabled_report
from yolozu.tta.presets import PRESETS, apply_ttt_preset_args
from yolozu.tta.schedules import adapt_and_predict
from yolozu.ttt_flags import flag_kwargs, flag_of, ttt_config, ttt_fields, ttt_meta  # noqa: F401 (re-exported)

SCHEMA_VERSION = 1

def build_parser() -> argparse.ArgumentParser:
    """The ``yolozu export`` command line (its usage line is short; ``-h`` lists every flag)."""
    parser = argparse.ArgumentParser(
        prog="yolozu export",
        usage="%(prog)s --dataset ROOT --output FILE [--adapter NAME] [--ttt ...] [--tta ...] (-h: every option)",
        description="Export predictions.json, optionally after test-time training (--ttt) and with flip TTA.",
    )
    general = parser.add_argument_group("general")
    add_adapter_flags(general)
    general.add_argument("--dataset", required=True, help="dataset root in YOLO layout")
    general.add_argument("--split", help="split under images/ (default: auto-detect val2017, val, ...)")
    general.add_argument("--output", required=True, help="predictions.json to write")
    general.add_argument("--wrap", action="store_true", help="write {schema_version, predictions, meta}")
    general.add_argument("--max-images", type=int, help="use only the first N images")
    general.add_argument("--batch-size", type=int, default=32, help="images per prediction batch (default 32)")
    general.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    general.add_argument("--seed", type=int, default=0, help="global seed (default 0)")
    general.add_argument(
        "--bn-stats",
        choices=("running", "batch"),
        default="running",
        help="without --ttt: normalise with the stored running statistics (default) or the "
        "test batch's statistics (BatchNorm adaptation, no gradient step)",
    )
    general.add_argument("--quiet", action="store_true", help="no progress bars")
    tta = parser.add_argument_group("test-time augmentation")
    tta.add_argument("--tta", action="store_true", help="also predict on the horizontally flipped image and merge")
    tta.add_argument("--tta-merge", choices=MERGES, default="wbf", help="wbf (default) or nms")
    tta.add_argument("--tta-iou", type=float, default=0.55, help="IoU threshold of the merge (default 0.55)")
    tta.add_argument("--tta-log-out", help="write a JSON log of the TTA settings")
    ttt = parser.add_argument_group("test-time training")
    ttt.add_argument("--ttt", action="store_true", help="adapt the model before/while predicting")
    ttt.add_argument(
        "--ttt-preset",
        choices=sorted(PRESETS),
        help="tested settings; explicit flags win (a plain --ttt gets its method's safe preset)",
    )
    for field in ttt_fields():
        ttt.add_argument(flag_of(field), dest=f"ttt_{field.name}", **flag_kwargs(field))
    ttt.add_argument(  # an export policy, not a TTTConfig field: its dest has no ttt_ prefix
        "--ttt-allow-non-finite",
        dest="allow_non_finite",
        action="store_true",
        help="write the predictions even where the adapted model's outputs are non-finite (those images get no "
        "detection; the report and stderr warn); without it such a run is an error and writes nothing",
    )
    return parser


class UsageError(Exception):
    """Bad command-line input (exit code 2)."""


class TTTError(Exception):
    """Test-time training could not run (its settings, the adapter's hooks, the update filter)."""


class NonFiniteError(Exception):
    """The adapted model's outputs were non-finite and ``--ttt-allow-non-finite`` was not given (exit code 1)."""


OUTPUT_FLAGS = ("--output", "--ttt-log-out", "--tta-log-out")


class _Progress:
    """A tqdm bar on stderr whose every update is also a kill point named after it (``yolozu.faults``)."""

    def __init__(self, desc: str, total: int, quiet: bool) -> None:
        self.desc = desc
        self.bar = tqdm(total=total, desc=desc, unit="img", disable=quiet, file=sys.stderr)

    def update(self, n: int) -> None:
        self.bar.update(n)
        kill_point(self.desc)

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> "_Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _outputs(args: argparse.Namespace) -> dict[str, OutputPath]:
    """The output paths, checked before any work; a symbolic link followed is said on stderr."""
    given = {flag: getattr(args, flag[2:].replace("-", "_")) for flag in OUTPUT_FLAGS}
    checkpoint = [("the --checkpoint", args.checkpoint)] if args.checkpoint else []
    try:
        outputs = check_outputs(given, checkpoint)
    except OutputPathError as e:
        raise UsageError(str(e)) from None
    for note in link_notes(outputs):
        print(note, file=sys.stderr)
    return {out.flag: out for out in outputs}


def _check_numbers(args: argparse.Namespace) -> None:
    """The general flags' ranges (usage errors, before any work)."""
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.max_images is not None and args.max_images < 1:
        raise UsageError(f"--max-images must be >= 1, got {args.max_images}")
    if args.seed < 0:
        raise UsageError(f"--seed must be >= 0, got {args.seed}")
    if not 0 < args.tta_iou <= 1:
        raise UsageError(f"--tta-iou must be in (0, 1] (an IoU threshold), got {args.tta_iou}")


def _adapter(args: argparse.Namespace):
    try:
        return adapter_from_args(args)
    except AdapterUsageError as e:
        raise UsageError(str(e)) from None


def _records(args: argparse.Namespace, adapter: object, outputs: dict[str, OutputPath]) -> list[dict]:
    """The dataset's records (label class ids checked against the model's classes), none of whose files is an
    output."""
    split = args.split or find_split(args.dataset)
    records = build_manifest(args.dataset, split, num_classes=getattr(adapter, "num_classes", None))
    try:
        check_not_inputs(list(outputs.values()), dataset_files(args.dataset, split, records))
    except OutputPathError as e:
        raise UsageError(str(e)) from None
    return records if args.max_images is None else records[: args.max_images]


def _adapted(args: argparse.Namespace, adapter, records: list[dict], config: TTTConfig, tta) -> tuple[list, dict]:
    """Predictions after test-time training and the report; non-finite outputs are an error unless
    ``--ttt-allow-non-finite``, then a warning on stderr (and in the report). A method that calibrates on
    in-distribution data (EATA's ``--ttt-eata-fisher-data``) reads that split of the dataset."""
    try:
        split = config.calibration_split()
        predictions, report = adapt_and_predict(
            adapter,
            records,
            config,
            tta=tta,
            batch_size=args.batch_size,
            progress=lambda desc, total: _Progress(desc, total, args.quiet),
            calibration=build_manifest(args.dataset, split) if split else None,
        )
    except (RuntimeError, ValueError, NotImplementedError) as e:
        raise TTTError(str(e)) from e
    non_finite = [w for w in report.warnings if w.startswith(NON_FINITE)]
    if non_finite and not args.allow_non_finite:
        raise NonFiniteError(
            f"{non_finite[0]}. Nothing was written. Lower --ttt-lr or keep the guards on (--ttt-stop-on-non-finite, "
            "--ttt-rollback-on-stop); --ttt-allow-non-finite writes these predictions anyway"
        )
    for warning in non_finite:
        print(f"warning: {warning}", file=sys.stderr)
    return predictions, report.to_dict()


def _plain(args: argparse.Namespace, adapter, records: list[dict], config: TTTConfig, tta) -> tuple[list, dict]:
    """Predictions without test-time training (the adapter's own, or with batch statistics / flip TTA)."""
    with _Progress("predict", len(records), args.quiet) as bar:
        if tta is None and args.bn_stats == "running":
            predictions = adapter.predict(records)
            bar.update(len(records))
        else:
            bn = "batch" if args.bn_stats == "batch" else "eval"
            predictions = Predictor(adapter, tta=tta).predict(records, bn=bn, batch_size=args.batch_size, progress=bar)
    return predictions, disabled_report(config).to_dict()


def _meta(args: argparse.Namespace, adapter, records: list[dict], config: TTTConfig, report: dict, tta) -> dict:
    return {
        "adapter": adapter.describe() if callable(getattr(adapter, "describe", None)) else {"adapter": args.adapter},
        "dataset": str(args.dataset),
        "split": args.split,
        "images": len(records),
        "seed": args.seed,
        "bn_stats": args.bn_stats,
        "ttt": ttt_meta(config, report if config.enabled else None),
        "tta": tta.to_dict() if tta is not None else {"enabled": False},
    }


def _write(args: argparse.Namespace, outputs: dict[str, OutputPath], predictions: list, meta: dict) -> None:
    """Every output at once: the logs, then the predictions (so new predictions mean new logs)."""
    documents = []
    for flag, key in (("--ttt-log-out", "ttt"), ("--tta-log-out", "tta")):
        if flag in outputs:
            log = {"output": str(args.output), key: meta[key]}
            if key == "ttt":  # YOLOZU's TTT log carries when it was written
                log = {"output": log["output"], "timestamp": datetime.now(timezone.utc).isoformat(), "ttt": meta[key]}
            documents.append((outputs[flag].target, log, 2))
    documents.append((outputs["--output"].target, wrap(predictions, meta) if args.wrap else predictions, None))
    write_outputs(documents)


def run_export(args: argparse.Namespace) -> dict:
    """The whole flow; returns the wrapped document (written to ``args.output`` and the logs)."""
    outputs = _outputs(args)
    _check_numbers(args)
    if args.ttt_preset and not args.ttt:
        raise UsageError("--ttt-preset needs --ttt")
    if args.ttt_log_out and not args.ttt:
        raise UsageError("--ttt-log-out needs --ttt (it logs the test-time training run)")
    apply_ttt_preset_args(args)
    torch.manual_seed(args.seed)
    try:
        config = ttt_config(args)
    except ValueError as e:
        raise TTTError(str(e)) from e
    tta = FlipTTAConfig(merge=args.tta_merge, iou=args.tta_iou) if args.tta else None
    adapter = _adapter(args)
    records = _records(args, adapter, outputs)
    run = _adapted if config.enabled else _plain
    predictions, report = run(args, adapter, records, config, tta)
    meta = _meta(args, adapter, records, config, report, tta)
    _write(args, outputs, predictions, meta)
    return {"schema_version": SCHEMA_VERSION, "predictions": predictions, "meta": meta}


def _summary(document: dict, output: str) -> str:
    """The line a successful run prints: how many predictions, where, and what TTT did."""
    ttt = document["meta"]["ttt"]
    summary = f"wrote {len(document['predictions'])} predictions to {output}"
    if ttt["enabled"]:
        report = ttt["report"]
        changed = report["updated_param_count"] if report["steps_run"] else 0
        stopped = f", stopped: {report['stop_reason']}" if report["stopped_early"] else ""
        summary += f" (TTT {ttt['method']}: {report['steps_run']} steps, {changed} parameters changed{stopped})"
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """``yolozu export``: 0 on success, 2 for a bad command line, 1 for a failed run, 130 for Ctrl-C; every
    error is one line on stderr and leaves every output as it was."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        document = run_export(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except TTTError as e:
        print(f"TTT failed: {e}", file=sys.stderr)
        return 1
    except UsageError as e:
        parser.print_usage(sys.stderr)
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (NonFiniteError, ImportError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if not args.quiet:
        print(_summary(document, args.output), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
