#!/usr/bin/env python
"""Tune the online recipes' step size at the benchmark's budget, on the held-out corruptions only.

At 50 updates per corruption (400 images, batches of ``recipes.BUDGET_BATCH``) a step tuned for a handful of
updates drifts, so each gradient recipe is rerun at a few fractions of its learning rate on the held-out
corruptions (speckle_noise, gaussian_blur, spatter, saturate) at severity 5, never on the 15 test corruptions,
and scored by mean mAP50 against BatchNorm statistics of the same batches. Prints the table of
docs/benchmark-notes.md, one row per candidate, and writes every score to ``--output`` as it goes.

    python tools/tune_budget.py [--recipes tent tent-pre eata sar cotta mim] [--images 400]
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import attrs

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from yolozu.data import build_manifest  # noqa: E402
from yolozu.demo.bench.budget import split_images, updates  # noqa: E402
from yolozu.demo.bench.recipes import BUDGET_BATCH, RECIPES  # noqa: E402
from yolozu.demo.bench.runner import Runner  # noqa: E402
from yolozu.demo.corruptions import HELDOUT_CORRUPTIONS  # noqa: E402
from yolozu.demo.data import corrupted_split_name  # noqa: E402
from yolozu.io.predictions import write_json_atomic  # noqa: E402
from yolozu.metrics import evaluate  # noqa: E402

FRACTIONS = (1.0, 1 / 3, 1 / 10)
"""The learning rates tried: these fractions of each recipe's own (tuned for a few updates per split)."""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="data/demo")
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--recipes", nargs="+", default=["tent", "tent-pre", "eata", "sar", "cotta", "mim"],
                        choices=[name for name, r in RECIPES.items() if r.ttt and not r.episodic])
    parser.add_argument("--fractions", type=float, nargs="+", default=list(FRACTIONS))
    parser.add_argument("--output", default="runs/bench/tuning-budget.json")
    args = parser.parse_args(argv)
    splits = [corrupted_split_name(c, 5) for c in HELDOUT_CORRUPTIONS]
    records = {s: build_manifest(args.dataset, s)[: args.images] for s in splits}
    images = split_images({s: len(r) for s, r in records.items()}, args.images)
    runner = Runner(dataset=args.dataset)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)

    def score(recipe) -> dict:
        return {s: evaluate(runner.predict(recipe, records[s])[0], records[s])["map50"] for s in splits}

    bn = score(RECIPES["bn"])
    bn_mean = statistics.fmean(bn.values())
    print(f"held-out at severity 5, {images} images per corruption, batch {BUDGET_BATCH} "
          f"({updates(images, BUDGET_BATCH)} updates): BatchNorm statistics {bn_mean:.4f}", flush=True)
    results = {"splits": splits, "images": images, "batch": BUDGET_BATCH, "bn": bn, "candidates": []}
    table = ["| recipe | lr | held-out mean mAP50 | vs BN stats (points) |", "|---|---|---|---|"]
    for name in args.recipes:
        recipe = RECIPES[name]
        for fraction in args.fractions:
            lr = float(f"{recipe.ttt['lr'] * fraction:.2g}")
            start = time.perf_counter()
            per_split = score(attrs.evolve(recipe, ttt={**recipe.ttt, "lr": lr}))
            mean = statistics.fmean(per_split.values())
            print(f"{name:<9} lr {lr:<8g} {mean:.4f} ({100 * (mean - bn_mean):+.2f} vs BN) "
                  f"{time.perf_counter() - start:4.0f}s {per_split}", flush=True)
            results["candidates"].append({"recipe": name, "lr": lr, "mean": mean, "splits": per_split})
            write_json_atomic(args.output, results, indent=1)
            table.append(f"| {name} | {lr:g} | {mean:.4f} | {100 * (mean - bn_mean):+.2f} |")
    print("\n".join(table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
