"""``yolozu export`` / ``tools/export_predictions.py``: manifest -> adapter -> [TTT] -> predict -> [TTA] -> write.

Without ``--ttt`` (and ``--tta``) the predictions are exactly ``adapter.predict(records)``: byte-identical to
a build without test-time training. Every output path is checked before any work (``yolozu.io.paths``: no two
outputs on one file, no input as an output, no device or FIFO), and the outputs are written together only
when the whole run succeeded: an error, Ctrl-C or a kill leaves every output as it was. Every error is one
line on stderr, its exit code from the one table of ``yolozu.cli.errors``: 2 for a bad command line, 1 for a
run that failed, 130 for Ctrl-C. Under torchrun the
ranks share the records (``yolozu.parallel.plan``) and rank 0 writes the outputs (docs/distributed.md).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from datetime import datetime, timezone
from typing import Sequence

import torch
from tqdm import tqdm

from yolozu.adapters.plugins import call_plugin
from yolozu.bridge import BN_PRIOR, BN_SHRINK
from yolozu.cli import tta_modes
from yolozu.cli.adapter_flags import AdapterUsageError, adapter_from_args
from yolozu.cli.checks import check_model_finite, check_numbers, check_predictions, plugin_of
from yolozu.cli.errors import USAGE, NonFiniteError, TTTError, UsageError, describe, printable, quiet_release
from yolozu.cli.export_parser import build_parser, flip_tta_of
from yolozu.cli.inputs import RunInputs, model_inputs, run_inputs
from yolozu.cli.lora_flags import apply_lora_flags, lora_meta
from yolozu.inference.predictor import NON_FINITE, Predictor, non_finite_warning
from yolozu.io.commit import write_outputs
from yolozu.io.paths import OutputPath, OutputPathError, check_not_inputs, check_outputs, link_notes
from yolozu.io.predictions import wrap
from yolozu.parallel.plan import check_dist_sync, in_order, merge_reports, part_for, plan_for
from yolozu.parallel.world import RankFailed, World, commit, gather_to_root, joined, run_everywhere
from yolozu.runtime import interrupts
from yolozu.runtime.determinism import set_deterministic
from yolozu.runtime.faults import kill_point
from yolozu.tta.config import TTTConfig
from yolozu.tta.flags import (  # noqa: F401 (flag_kwargs, flag_of, ttt_fields re-exported)
    as_flags,
    flag_kwargs,
    flag_of,
    misplaced_flag,
    ttt_config,
    ttt_fields,
    ttt_meta,
)
from yolozu.tta.part import WHOLE, Part
from yolozu.tta.presets import apply_ttt_preset_args, validate_ttt_requirements
from yolozu.tta.report import TTTReport, disabled_report
from yolozu.tta.schedules import adapt_and_predict

OUTPUT_FLAGS = ("--output", "--ttt-log-out", "--tta-log-out")


class _Progress:
    """A tqdm bar on stderr whose every update is also a kill point named after it (``yolozu.runtime.faults``)."""

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
    try:
        outputs = check_outputs(given, model_inputs(args.adapter, args.checkpoint))
    except OutputPathError as e:
        raise UsageError(str(e)) from None
    for note in link_notes(outputs):
        print(note, file=sys.stderr)
    return {out.flag: out for out in outputs}


def _adapter(args: argparse.Namespace, config: TTTConfig, rank_device: str | None = None):
    try:  # the adapter, its model given the --lora-* adapters before any TTT
        return apply_lora_flags(args, adapter_from_args(args, rank_device), config, seed=args.seed)
    except AdapterUsageError as e:
        raise UsageError(str(e)) from None


def _inputs(args: argparse.Namespace, adapter: object, config: TTTConfig, outputs: dict[str, OutputPath]) -> RunInputs:
    """The dataset's records (label class ids checked against the model's classes) and the calibration split's,
    when the method asks for one; no file the run reads is an output (``yolozu.cli.inputs``)."""
    calibration_split = config.calibration_split() if config.enabled else None
    inputs = run_inputs(args, calibration_split, getattr(adapter, "num_classes", None))
    try:
        check_not_inputs(list(outputs.values()), inputs.files)
    except OutputPathError as e:
        raise UsageError(str(e)) from None
    return inputs


def _adapted(
    args, adapter, records: list[dict], config: TTTConfig, tta, part: Part, calibration: list[dict] | None
) -> tuple[list, TTTReport]:
    """Predictions after test-time training and the report; non-finite outputs are an error unless
    ``--ttt-allow-non-finite``, then a warning on stderr (and in the report). A method that calibrates on
    in-distribution data (EATA's ``--ttt-eata-fisher-data``) gets that split's records, ``calibration``.
    ``part``: this rank's share of a distributed run."""
    try:
        predictions, report = adapt_and_predict(
            adapter,
            records,
            config,
            tta=tta,
            batch_size=args.batch_size,
            progress=lambda desc, total: _Progress(desc, total, args.quiet),
            calibration=calibration,
            part=part,
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
    return predictions, report


def _plain_non_finite(predictor: Predictor, records: list[dict]) -> None:
    if predictor.non_finite:
        raise NonFiniteError(f"{non_finite_warning(predictor.non_finite, len(records))}. Nothing was written")


def _norm_options(args: argparse.Namespace) -> dict[str, float]:
    """The strength of the stored statistics ``--bn-stats`` mixes with the batch's: ``--bn-prior`` (mix) or
    ``--bn-shrink`` (shrink), or its default; nothing for the other modes."""
    if args.bn_stats == "mix":
        return {"bn_prior": BN_PRIOR if args.bn_prior is None else args.bn_prior}
    if args.bn_stats == "shrink":
        return {"bn_shrink": BN_SHRINK if args.bn_shrink is None else args.bn_shrink}
    return {}


def _plain(
    args, adapter, records: list[dict], config: TTTConfig, tta, part: Part, calibration: list[dict] | None
) -> tuple[list, TTTReport]:
    """Predictions without test-time training (the adapter's own, or with batch statistics / flip TTA)."""
    del part, calibration
    with _Progress("predict", len(records), args.quiet) as bar:
        if tta is None and args.bn_stats == "running":
            plugin = plugin_of(args)
            predictions = adapter.predict(records) if plugin is None else call_plugin(
                plugin, "predict", adapter.predict, records
            )
            bar.update(len(records))
        else:
            bn = "eval" if args.bn_stats == "running" else args.bn_stats
            predictor = Predictor(adapter, tta=tta, **_norm_options(args))
            predictions = predictor.predict(records, bn=bn, batch_size=args.batch_size, progress=bar)
            _plain_non_finite(predictor, records)
    return predictions, disabled_report(config)


def _meta(args: argparse.Namespace, adapter, records: list[dict], config: TTTConfig, report: dict, tta) -> dict:
    return {
        "adapter": adapter.describe() if callable(getattr(adapter, "describe", None)) else {"adapter": args.adapter},
        "dataset": str(args.dataset),
        "split": args.split,
        "images": len(records),
        "seed": args.seed,
        "deterministic": args.deterministic,
        "bn_stats": args.bn_stats,
        **_norm_options(args),
        "lora": lora_meta(args, adapter),
        "ttt": ttt_meta(config, report if config.enabled else None),
        "tta": tta_modes.flip_meta(tta),
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


def _export(args: argparse.Namespace, outputs: dict[str, OutputPath], config: TTTConfig, tta) -> dict:
    """The export in one process."""
    adapter = _adapter(args, config)
    check_model_finite(args, adapter)
    inputs = _inputs(args, adapter, config, outputs)
    records = inputs.records
    run = _adapted if config.enabled else _plain
    predictions, report = run(args, adapter, records, config, tta_modes.flip(tta), WHOLE, inputs.calibration)
    check_predictions(args, adapter, records, predictions)
    meta = _meta(args, adapter, records, config, report.to_dict(), tta)
    predictions = tta_modes.postprocess(predictions, meta, tta)
    _write(args, outputs, predictions, meta)
    return wrap(predictions, meta)


def _export_ranks(args, outputs: dict[str, OutputPath], config: TTTConfig, tta, world: World) -> dict | None:
    """The export as one rank of a torchrun job: its shard, then rank 0 gathers and writes (returns the document;
    None on the other ranks). A failure on any rank fails every rank, and nothing is written."""
    mine = argparse.Namespace(**{**vars(args), "quiet": args.quiet or world.rank != 0})
    run = _adapted if config.enabled else _plain

    def work(lockstep):
        adapter = _adapter(mine, config, world.device)
        check_model_finite(mine, adapter)
        inputs = _inputs(mine, adapter, config, outputs)
        records = inputs.records
        plan = plan_for(config, args.batch_size, len(records), world.size, args.dist_sync or "none")
        shard = [records[i] for i in plan.indices(world.rank)]
        part = part_for(plan, world.rank, records, lockstep)
        return adapter, records, plan, run(mine, adapter, shard, config, tta_modes.flip(tta), part, inputs.calibration)

    adapter, records, plan, result = run_everywhere(world, work, functools.partial(describe, plugin=plugin_of(args)))
    gathered = gather_to_root(world, result)
    document = None

    def write() -> None:
        nonlocal document
        predictions = in_order(plan, [g[0] for g in gathered])
        check_predictions(args, adapter, records, predictions)
        report = merge_reports(plan, [g[1] for g in gathered])
        meta = _meta(args, adapter, records, config, report.to_dict(), tta)
        meta["distributed"] = meta["ttt"]["distributed"] = plan.meta(world)
        predictions = tta_modes.postprocess(predictions, meta, tta)
        _write(args, outputs, predictions, meta)
        document = wrap(predictions, meta)

    commit(world, write, functools.partial(describe, plugin=plugin_of(args)))
    return document


def run_export(args: argparse.Namespace) -> dict | None:
    """The whole flow; returns the wrapped document (written to ``args.output`` and the logs). Under torchrun
    (``WORLD_SIZE`` > 1) the ranks share the work and rank 0 writes; the other ranks return None."""
    outputs = _outputs(args)
    check_numbers(args)
    for flag, why in (("preset", ""), ("log_out", " (it logs the test-time training run)")):
        if getattr(args, f"ttt_{flag}") and not args.ttt:
            raise UsageError(f"--ttt-{flag.replace('_', '-')} needs --ttt{why}")
    apply_ttt_preset_args(args)
    set_deterministic(args.deterministic)
    torch.manual_seed(args.seed)
    try:
        validate_ttt_requirements(args)  # before the model is built
        config = ttt_config(args)
    except ValueError as e:  # a --ttt-* value out of range, or settings that do not go together
        raise UsageError(as_flags(str(e))) from None
    ignored = misplaced_flag(args, config.method)
    if ignored:
        raise UsageError(ignored)
    if args.ttt and args.bn_stats != "running":
        raise UsageError(f"--bn-stats {args.bn_stats} applies without --ttt; with --ttt, prediction normalises as "
                         "--ttt-bn-mode says (drop --bn-stats)")
    if args.dist_sync and not args.ttt:
        raise UsageError("--ttt-dist-sync needs --ttt (it says how the ranks' test-time training is shared)")
    try:
        check_dist_sync(config, args.dist_sync or "none")
    except ValueError as e:
        raise UsageError(str(e)) from None
    tta = flip_tta_of(args)
    with joined(args.device, os.environ, args.dist_timeout) as world:
        if world is None:
            return _export(args, outputs, config, tta)
        return _export_ranks(args, outputs, config, tta, world)


def _summary(document: dict, output: str) -> str:
    """The line a successful run prints: how many predictions, where, and what TTT did."""
    ttt = document["meta"]["ttt"]
    summary = f"wrote {len(document['predictions'])} predictions to {output}"
    if ttt["enabled"]:
        report = ttt["report"]
        changed = report["updated_param_count"] if report["steps_run"] else 0
        stopped = f", stopped: {report['stop_reason']}" if report["stopped_early"] else ""
        summary += f" (TTT {ttt['method']}: {report['steps_run']} steps, {changed} parameters changed{stopped})"
    spread = document["meta"].get("distributed")
    return summary + (f" on {spread['world_size']} ranks ({spread['semantics']})" if spread else "")


def main(argv: Sequence[str] | None = None) -> int:
    """``yolozu export``: 0 on success, 2 for a bad command line, 1 for a failed run, 130 for Ctrl-C; every
    error is one line on stderr and leaves every output as it was."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        document = run_export(args)
        interrupts.check()
    except RankFailed as e:
        if e.shown and e.code == USAGE:
            parser.print_usage(sys.stderr)
        if e.shown:
            print(printable(str(e)), file=sys.stderr)
        return e.code
    except BaseException as e:  # noqa: B036 - every ending is a row of the table (yolozu.cli.errors)
        code, line = describe(e, plugin_of(args))
        if line is None:
            raise
        quiet_release(e)
        if code == USAGE:
            parser.print_usage(sys.stderr)
        print(line, file=sys.stderr)
        return code
    if document is not None and not args.quiet:
        print(_summary(document, args.output), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
