"""``yolozu export`` / ``tools/export_predictions.py``: manifest -> adapter -> [TTT] -> predict -> [TTA] -> write.

Without ``--ttt`` (and ``--tta``) the predictions are exactly ``adapter.predict(records)``: byte-identical to
a build without test-time training. Output files are written to a temporary file and renamed, so a failed
run leaves none behind.
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import attrs
import torch
from tqdm import tqdm

from yolozu.adapters import ADAPTERS, build_adapter
from yolozu.functional.settings import Number
from yolozu.data import build_manifest
from yolozu.flip_tta import MERGES, FlipTTAConfig
from yolozu.predict import Predictor
from yolozu.predictions import wrap, write_json_atomic
from yolozu.tta.config import TTTConfig
from yolozu.tta.integration import disabled_report
from yolozu.tta.presets import PRESETS, apply_ttt_preset_args
from yolozu.tta.schedules import adapt_and_predict

SCHEMA_VERSION = 1

NOT_FLAGS = ("enabled", "preset")
"""``TTTConfig`` fields with a flag of their own shape (``--ttt``, ``--ttt-preset``)."""


class ExplicitNone:
    """The value of an optional setting's flag given as ``none`` (e.g. ``--ttt-max-batches none``: no cap), as
    opposed to an absent flag (the preset's or the default value)."""

    def __repr__(self) -> str:
        return "none"


EXPLICIT_NONE = ExplicitNone()


def optional(kind: type):
    """argparse type of an optional setting: ``none`` (any case) or a value of ``kind``."""

    def parse(text: str):
        return EXPLICIT_NONE if text.lower() == "none" else kind(text)

    parse.__name__ = kind.__name__
    return parse


def flag_of(field: attrs.Attribute) -> str:
    """The command-line flag of a ``TTTConfig`` field: the one its method's registry entry gives it, else
    ``--ttt-`` + its name with dashes."""
    return field.metadata.get("flag") or "--ttt-" + field.name.replace("_", "-")


def flag_kwargs(field: attrs.Attribute) -> dict[str, Any]:
    """argparse keyword arguments of a ``TTTConfig`` field, from its type, validator and help. Every default is
    None, so that an explicit value can be told from an absent one (an explicit value wins over its preset)."""
    default = field.default
    shown = " ".join(default) if isinstance(default, tuple) else default
    expected = getattr(field.validator, "expected", None) if isinstance(field.validator, Number) else None
    text = field.metadata["help"] + (f": {expected}" if expected else "")
    kwargs: dict[str, Any] = {"default": None, "help": f"{text} (default {shown or 'none'})"}
    choices = getattr(field.validator, "choices", None)
    kind = field.metadata["kind"]
    if kind is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif kind is tuple:
        kwargs.update(action="extend", nargs="+", metavar="VALUE" if choices is None else None)
    else:
        kwargs["type"] = optional(kind) if getattr(field.validator, "optional", False) else kind
        kwargs["metavar"] = {int: "N", float: "X"}.get(kind, "TEXT") if choices is None else None
    if choices is not None:
        kwargs["choices"] = choices
    return {k: v for k, v in kwargs.items() if v is not None or k == "default"}


def ttt_fields() -> list[attrs.Attribute]:
    """The ``TTTConfig`` fields that are ``--ttt-*`` flags."""
    return [f for f in attrs.fields(TTTConfig) if f.name not in NOT_FLAGS]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="yolozu export",
        description="Export predictions.json, optionally after test-time training (--ttt) and with flip TTA.",
    )
    general = parser.add_argument_group("general")
    general.add_argument("--adapter", choices=sorted(ADAPTERS), default="dummy", help="model adapter (default dummy)")
    general.add_argument("--checkpoint", help="detector checkpoint (default: the committed one)")
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
    return parser


def ttt_config(args: argparse.Namespace) -> TTTConfig:
    """The TTT config the flags ask for: preset values, then every explicitly given flag."""
    given = {f.name: getattr(args, f"ttt_{f.name}") for f in ttt_fields()}
    explicit = {name: None if value is EXPLICIT_NONE else value for name, value in given.items() if value is not None}
    explicit.setdefault("seed", args.seed)
    if not args.ttt:
        return TTTConfig(**explicit)
    return TTTConfig.from_preset(args.ttt_preset, **{"enabled": True, **explicit})


def ttt_meta(config: TTTConfig, report: dict | None) -> dict:
    """``meta.ttt``: the settings as applied (after presets; each method's under its name), the normalisation
    predictions used and the run's report."""
    return {**config.grouped(), "prediction_bn": config.prediction_bn, "report": report}


class UsageError(Exception):
    """Bad command-line input (exit code 2)."""


class TTTError(Exception):
    """Test-time training could not run (its settings, the adapter's hooks, the update filter)."""


def _records(args: argparse.Namespace) -> list[dict]:
    records = build_manifest(args.dataset, args.split)
    if args.max_images is not None:
        if args.max_images < 1:
            raise UsageError(f"--max-images must be >= 1, got {args.max_images}")
        records = records[: args.max_images]
    return records


def _check_output(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create the output folder {path.parent}: {e.strerror}") from None
    if path.is_dir():
        raise UsageError(f"--output {path} is a folder; give a file path such as {path / 'predictions.json'}")


def _adapter(args: argparse.Namespace):
    if str(args.device).startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: this machine has no CUDA device (or torch is a CPU build); use cpu")
    if args.adapter == "dummy":
        if args.checkpoint:
            raise UsageError("--checkpoint applies to --adapter detector only")
        return build_adapter("dummy")
    return build_adapter(args.adapter, checkpoint=args.checkpoint, device=args.device, batch_size=args.batch_size)


def _check_usage(args: argparse.Namespace) -> None:
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.ttt_preset and not args.ttt:
        raise UsageError("--ttt-preset needs --ttt")
    if args.ttt_log_out and not args.ttt:
        raise UsageError("--ttt-log-out needs --ttt (it logs the test-time training run)")


def run_export(args: argparse.Namespace) -> dict:
    """The whole flow; returns the wrapped document (written to ``args.output`` and the logs)."""
    torch.manual_seed(args.seed)
    output = Path(args.output)
    for path in (output, args.ttt_log_out, args.tta_log_out):
        if path:
            _check_output(Path(path))
    _check_usage(args)
    apply_ttt_preset_args(args)
    try:
        config = ttt_config(args)
    except ValueError as e:
        raise TTTError(str(e)) from e
    tta = FlipTTAConfig(merge=args.tta_merge, iou=args.tta_iou) if args.tta else None
    records = _records(args)
    adapter = _adapter(args)

    def bars(desc: str, total: int) -> tqdm:
        return tqdm(total=total, desc=desc, unit="img", disable=args.quiet, file=sys.stderr)

    if config.enabled:
        try:
            split = config.calibration_split()
            calibration = build_manifest(args.dataset, split) if split else None
            predictions, report = adapt_and_predict(
                adapter, records, config, tta=tta, batch_size=args.batch_size, progress=bars, calibration=calibration
            )
        except (RuntimeError, ValueError, NotImplementedError) as e:
            raise TTTError(str(e)) from e
        report_dict = report.to_dict()
    else:
        with bars("predict", len(records)) as bar:
            if tta is None and args.bn_stats == "running":
                predictions = adapter.predict(records)
                bar.update(len(records))
            else:
                bn = "batch" if args.bn_stats == "batch" else "eval"
                predictions = Predictor(adapter, tta=tta).predict(
                    records, bn=bn, batch_size=args.batch_size, progress=bar
                )
        report_dict = disabled_report(config).to_dict()
    meta = {
        "adapter": adapter.describe() if callable(getattr(adapter, "describe", None)) else {"adapter": args.adapter},
        "dataset": str(args.dataset),
        "split": args.split,
        "images": len(records),
        "seed": args.seed,
        "bn_stats": args.bn_stats,
        "ttt": ttt_meta(config, report_dict if config.enabled else None),
        "tta": tta.to_dict() if tta is not None else {"enabled": False},
    }
    write_json_atomic(output, wrap(predictions, meta) if args.wrap else predictions)
    if args.ttt_log_out:
        log = {"output": str(output), "timestamp": datetime.now(timezone.utc).isoformat(), "ttt": meta["ttt"]}
        write_json_atomic(args.ttt_log_out, log, indent=2)
    if args.tta_log_out:
        write_json_atomic(args.tta_log_out, {"output": str(output), "tta": meta["tta"]}, indent=2)
    return {"schema_version": SCHEMA_VERSION, "predictions": predictions, "meta": meta}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        document = run_export(args)
    except TTTError as e:
        print(f"TTT failed: {e}", file=sys.stderr)
        return 1
    except UsageError as e:
        parser.print_usage(sys.stderr)
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if not args.quiet:
        ttt = document["meta"]["ttt"]
        summary = f"wrote {len(document['predictions'])} predictions to {args.output}"
        if ttt["enabled"]:
            report = ttt["report"]
            summary += (
                f" (TTT {ttt['method']}: {report['steps_run']} steps, "
                f"{report['updated_param_count']} parameters updated"
                + (f", stopped: {report['stop_reason']}" if report["stopped_early"] else "")
                + ")"
            )
        print(summary, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
