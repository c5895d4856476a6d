"""The export's checks of its own inputs and results, each before anything is written: the general flags' ranges,
a model with non-finite weights, an adapter's predictions against the records, and which plug-in (if any) a run
trusts."""

from __future__ import annotations

import argparse

import torch

from yolozu.adapters import ADAPTERS
from yolozu.cli import tta_modes
from yolozu.cli.errors import NonFiniteError, UsageError
from yolozu.inference.predictor import non_finite_tensors
from yolozu.io.predictions import PredictionsError, check_against_records


def check_numbers(args: argparse.Namespace) -> None:
    """The general flags' ranges (usage errors, before any work)."""
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.max_images is not None and args.max_images < 1:
        raise UsageError(f"--max-images must be >= 1, got {args.max_images}")
    if args.seed < 0:
        raise UsageError(f"--seed must be >= 0, got {args.seed}")
    if args.dist_timeout <= 0:
        raise UsageError(f"--dist-timeout must be > 0 (seconds), got {args.dist_timeout:g}")
    if args.workers is not None and args.workers < 0:
        raise UsageError(f"--workers must be >= 0, got {args.workers}")
    if not 0 < args.tta_iou <= 1:
        raise UsageError(f"--tta-iou must be in (0, 1] (an IoU threshold), got {args.tta_iou}")
    if args.tta_flip_prob is not None and not 0 <= args.tta_flip_prob <= 1:
        raise UsageError(f"--tta-flip-prob must be in [0, 1] (a probability), got {args.tta_flip_prob}")
    if args.tta_seed is not None and args.tta_seed < 0:
        raise UsageError(f"--tta-seed must be >= 0, got {args.tta_seed}")
    for flag, mode, unit in (("--bn-prior", "mix", "images"), ("--bn-shrink", "shrink", "standard errors")):
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None and (args.bn_stats != mode or value < 0):
            raise UsageError(f"{flag} applies to --bn-stats {mode} and must be >= 0 ({unit}), got {value} with "
                             f"--bn-stats {args.bn_stats}; with --ttt use --ttt-bn-mode {mode} --ttt-{flag[2:]} N")
    if misused := tta_modes.misused_flag(args):
        raise UsageError(misused)


def check_model_finite(args: argparse.Namespace, adapter: object) -> None:
    """A model with a NaN or infinite weight predicts nothing at all, whatever the path (plain, BatchNorm
    statistics, TTA or TTT): an error before any image is read (``--ttt-allow-non-finite`` lets a TTT run go on,
    with the warnings of its report)."""
    get_model = getattr(adapter, "get_model", None)
    model = get_model() if callable(get_model) else None
    if not isinstance(model, torch.nn.Module):
        return
    names = non_finite_tensors(model)
    if names and not (args.ttt and args.allow_non_finite):
        shown = ", ".join(names[:3]) + (" ..." if len(names) > 3 else "")
        source = f"--checkpoint {args.checkpoint}" if args.checkpoint else f"the {args.adapter} adapter's model"
        raise NonFiniteError(
            f"the model has non-finite weights ({len(names)} tensors: {shown}); {source} is corrupt or diverged and "
            "would predict no detection on any image. Nothing was written"
        )


def check_predictions(args: argparse.Namespace, adapter: object, records: list[dict], predictions: list) -> None:
    """Predictions are checked against the records (count, order, image paths, score and box ranges, class ids)
    before anything is written: a plug-in adapter's are untrusted, and a non-finite prediction is never written."""
    try:
        check_against_records(predictions, records, getattr(adapter, "num_classes", None))
    except PredictionsError as e:
        raise PredictionsError(f"adapter {args.adapter!r} returned bad predictions: {e}; nothing was written") from None


def plugin_of(args: argparse.Namespace) -> str | None:
    """The name of the plug-in adapter the run uses (None for a built-in one): its failures are named after it."""
    return None if args.adapter in ADAPTERS else args.adapter
