#!/usr/bin/env python
"""How far a TTT method moves the weights, how much its own loss falls, and what that does to mAP50.

For each split and learning rate: the method's loss on the first and last three batches of an online run, the
drift from the source weights at the end (``total_update_norm``), and mAP50 beside BatchNorm statistics alone.

    python tools/probe_drift.py --method mim --lrs 1e-4 1e-2 3e-2 --splits val-speckle_noise-5 val-saturate-5
"""

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from yolozu.data import build_manifest  # noqa: E402
from yolozu.demo.bench.recipes import ONLINE, Recipe  # noqa: E402
from yolozu.demo.bench.shift import Runner  # noqa: E402
from yolozu.metrics import evaluate  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="data/demo")
    parser.add_argument("--splits", nargs="+", default=["val-speckle_noise-5", "val-saturate-5"])
    parser.add_argument("--method", default="mim", choices=("tent", "mim", "cotta"))
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-4, 1e-2, 3e-2])
    args = parser.parse_args(argv)
    runner = Runner()
    for split in args.splits:
        records = build_manifest(args.dataset, split)
        bn = evaluate(runner.predict(Recipe("bn", "bn", bn_stats=True), records)[0], records)["map50"]
        for lr in args.lrs:
            extra = {"mim_mask_prob": 0.5} if args.method == "mim" else {}
            recipe = Recipe("probe", "probe", {"method": args.method, **ONLINE, "lr": lr, **extra})
            predictions, report = runner.predict(recipe, records)
            losses = report["losses"]
            print(f"{split} {args.method} lr {lr:g}: loss {statistics.fmean(losses[:3]):.4f} -> "
                  f"{statistics.fmean(losses[-3:]):.4f}, drift {report['step_metrics'][-1]['total_update_norm']:.3f}, "
                  f"mAP50 {evaluate(predictions, records)['map50']:.3f} (BN statistics {bn:.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
