"""The ``yolozu export`` command line: general, test-time augmentation and test-time training flags (the ``--ttt-*``
settings generated from ``TTTConfig``'s fields)."""

from __future__ import annotations

import argparse

import attrs

from yolozu.adapters.images import default_workers
from yolozu.bridge import BN_PRIOR, BN_SHRINK
from yolozu.cli.adapter_flags import add_adapter_flags
from yolozu.cli.lora_flags import add_lora_flags
from yolozu.cli.numbers import bound_numbers
from yolozu.inference.flip import MERGES, FlipTTAConfig
from yolozu.parallel.plan import DIST_SYNC
from yolozu.parallel.world import DIST_TIMEOUT
from yolozu.tta.base import TTAConfig
from yolozu.tta.cli_options import add_ttt_arguments

TTA_MODES = ("model", "postprocess")


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
    general.add_argument(
        "--workers",
        type=int,
        help=f"image-loading processes (default: half the CPUs, at most 4; here {default_workers()}); 0 reads in "
        "this process. Predictions do not depend on it",
    )
    general.add_argument("--seed", type=int, default=0, help="global seed (default 0)")
    general.add_argument(
        "--bn-stats",
        choices=("running", "batch", "mix", "shrink"),
        default="running",
        help="without --ttt: normalise with the stored running statistics (default), the test batch's statistics "
        "(BatchNorm adaptation, no gradient step), the stored ones as a prior of --bn-prior images mixed with "
        "the batch's (mix) or the batch's soft-thresholded towards the stored ones at --bn-shrink standard errors "
        "(shrink); mix and shrink are for small batches and single images",
    )
    general.add_argument(
        "--bn-prior",
        type=float,
        help=f"--bn-stats mix: the stored statistics' strength in images (Schneider et al. 2020's N; default "
        f"{BN_PRIOR:g})",
    )
    general.add_argument(
        "--bn-shrink",
        type=float,
        help=f"--bn-stats shrink: the threshold in standard errors of the batch's statistics (Gong et al. 2022's "
        f"instance-aware BatchNorm; default {BN_SHRINK:g})",
    )
    _dist_flags(general)
    general.add_argument("--quiet", action="store_true", help="no progress bars")
    general.add_argument(
        "--deterministic",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="deterministic kernels, cuDNN without autotuning and a fixed cuBLAS workspace, so a seed repeats "
        "bitwise on the same GPU (default on; --no-deterministic lets cuDNN/cuBLAS pick faster kernels)",
    )
    _tta_flags(parser.add_argument_group("test-time augmentation"))
    add_lora_flags(parser.add_argument_group("low-rank adapters (LoRA) for test-time training"))
    _ttt_flags(parser.add_argument_group("test-time training"))
    return bound_numbers(parser)


def _dist_flags(general: argparse._ArgumentGroup) -> None:
    general.add_argument(
        "--dist-timeout",
        type=float,
        default=DIST_TIMEOUT,
        metavar="SECONDS",
        help=f"under torchrun: how long a rank waits for the others to join before it gives up with a line saying "
        f"what it waited for (default {DIST_TIMEOUT:g})",
    )


def _tta_flags(tta: argparse._ArgumentGroup) -> None:
    tta.add_argument("--tta", action="store_true", help="also predict on the horizontally flipped image and merge")
    tta.add_argument("--tta-merge", choices=MERGES, default="wbf", help="wbf (default) or nms")
    tta.add_argument(
        "--tta-mode",
        choices=TTA_MODES,
        default="model",
        help="model (default): predict on the flipped image too and merge; postprocess (YOLOZU's default): mirror "
        "each detection of the plain predictions with probability --tta-flip-prob (seeded; no second forward)",
    )
    tta.add_argument(
        "--tta-iou",
        "--tta-model-merge-iou",
        type=float,
        default=0.55,
        help="IoU threshold of the model-mode merge (default 0.55; --tta-model-merge-iou is YOLOZU's name)",
    )
    tta.add_argument("--tta-log-out", help="write a JSON log of the TTA settings")
    tta.add_argument(
        "--tta-flip-prob",
        type=float,
        help="model mode: probability that an image gets the flipped branch, drawn per image (default 1: every "
        "image); postprocess mode: probability that a detection is mirrored, drawn per detection (default 0.5, "
        "YOLOZU's)",
    )
    tta.add_argument(
        "--tta-keypoint-swap-pairs",
        type=swap_pairs,
        help="keypoint index pairs swapped by a mirror, e.g. 1:2,3:4 (detections with keypoints only)",
    )
    tta.add_argument(
        "--tta-flip-keypoints",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="mirror detections' keypoints too (default on; detections with keypoints only)",
    )
    tta.add_argument(
        "--tta-flip-pose-offsets",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="negate the x of detections' pose offsets when mirroring (default on; detections with offsets only)",
    )
    tta.add_argument("--tta-seed", type=int, help="seed of the per-image flip draw (default: --seed)")
    tta.add_argument(
        "--tta-norm-only",
        action="store_true",
        default=None,
        help="mirror only normalised boxes (YOLOZU's flag; every box here is normalised, so it changes nothing)",
    )


def _ttt_flags(ttt: argparse._ArgumentGroup) -> None:
    add_ttt_arguments(ttt)
    ttt.add_argument(  # an export policy, not a TTTConfig field: its dest has no ttt_ prefix
        "--ttt-allow-non-finite",
        dest="allow_non_finite",
        action="store_true",
        help="write the predictions even where the adapted model's outputs are non-finite (those images get no "
        "detection; the report and stderr warn); without it such a run is an error and writes nothing",
    )
    ttt.add_argument(
        "--ttt-dist-sync",
        dest="dist_sync",
        choices=DIST_SYNC,
        help="under torchrun, --ttt-reset stream: none (default), each rank adapts its own model on its shard "
        "(independent streams); grads (online schedule), the ranks all-reduce gradients and BatchNorm batch "
        "statistics: one model, as one process adapting on the global batch of --ttt-batch-size x world images",
    )


def swap_pairs(text: str) -> tuple[tuple[int, int], ...]:
    """argparse type of ``--tta-keypoint-swap-pairs``: ``1:2,3:4`` -> ((1, 2), (3, 4)), indices >= 0."""
    pairs = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        a, sep, b = item.partition(":")
        if not sep or not a.strip().isdigit() or not b.strip().isdigit():
            raise argparse.ArgumentTypeError(f"expected index pairs >= 0 like 1:2,3:4, got {text!r}")
        pairs.append((int(a), int(b)))
    return tuple(pairs)


def flip_tta_of(args: argparse.Namespace) -> FlipTTAConfig | TTAConfig | None:
    """The TTA settings of ``--tta``: the model-mode flip (``FlipTTAConfig``), the postprocess mirror
    (``TTAConfig``), None without ``--tta``."""
    if not args.tta:
        return None
    seed = args.seed if args.tta_seed is None else args.tta_seed
    keypoints = {
        "keypoint_swap_pairs": args.tta_keypoint_swap_pairs,
        "flip_keypoints": args.tta_flip_keypoints,
        "flip_pose_offsets": args.tta_flip_pose_offsets,
    }
    if args.tta_mode == "postprocess":
        prob = attrs.fields(TTAConfig).flip_prob.default if args.tta_flip_prob is None else args.tta_flip_prob
        return TTAConfig(enabled=True, seed=seed, flip_prob=prob, norm_only=bool(args.tta_norm_only), **keypoints)
    return FlipTTAConfig(
        merge=args.tta_merge,
        iou=args.tta_iou,
        flip_prob=1.0 if args.tta_flip_prob is None else args.tta_flip_prob,
        seed=seed,
        norm_only=bool(args.tta_norm_only),
        **keypoints,
    )
