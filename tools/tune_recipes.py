#!/usr/bin/env python
"""Tune the benchmark recipes on the held-out corruptions only (speckle_noise, gaussian_blur, spatter, saturate;
the ImageNet-C validation protocol), never on the 15 test corruptions.

Every candidate runs on the held-out splits at severities 3 and 5 (300 images each) and is scored by mean mAP50,
printed against BatchNorm statistics alone on the same images. Each run starts from the source weights.

    python tools/tune_recipes.py [--methods tent mim cotta eata sar episodic_mix episodic_shrink bn_prior bn_shrink]
                                 [--images 300] [--clean] [--output runs/bench/tuning.json]

``--clean`` (and ``bn_prior``, ``bn_shrink``) also score each candidate's clean mAP50 drop against the source model
on clean training images (in-distribution, and no test split).
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from yolozu.data import build_manifest  # noqa: E402
from yolozu.demo.bench.recipes import EPISODIC, ONLINE, Recipe  # noqa: E402
from yolozu.demo.bench.shift import Runner, splits_for  # noqa: E402
from yolozu.demo.corruptions import HELDOUT_CORRUPTIONS  # noqa: E402
from yolozu.io.predictions import write_json_atomic  # noqa: E402
from yolozu.metrics import evaluate  # noqa: E402

EARLIER_BATCH = 32
"""The batch of the tables this search printed (docs/benchmark-notes.md, before the 50-update budget; the budget's
search is tools/tune_budget.py): candidates and BatchNorm statistics alike."""
EARLIER_ONLINE = {**ONLINE, "batch_size": EARLIER_BATCH}
CANDIDATES = {
    "tent": [
        *({"method": "tent", **EARLIER_ONLINE, "lr": lr} for lr in (1e-3, 3e-3, 5e-3, 1e-2)),
        {"method": "tent", **EARLIER_ONLINE, "lr": 3e-3, "batch_size": 16},
        {"method": "tent", **EARLIER_ONLINE, "lr": 3e-3, "update_filter": "lora_norm_only"},
        {"method": "tent", **EARLIER_ONLINE, "lr": 2e-3, "steps": 2},
        {"method": "tent", **EARLIER_ONLINE, "lr": 3e-3, "schedule": "pre"},
        {"method": "tent", **EPISODIC, "lr": 3e-3},
        {"method": "tent", **EPISODIC, "lr": 1e-2, "steps": 2},
    ],
    "mim": [
        *({"method": "mim", **EARLIER_ONLINE, "lr": lr, "mim_mask_prob": 0.5} for lr in (1e-4, 3e-4, 3e-3, 1e-2, 3e-2)),
        {"method": "mim", **EARLIER_ONLINE, "lr": 1e-3, "mim_mask_prob": 0.5, "bn_mode": "batch"},
        {"method": "mim", **EARLIER_ONLINE, "lr": 1e-3, "mim_mask_prob": 0.5, "mim_mask_value": 0.5},
        {"method": "mim", **EARLIER_ONLINE, "lr": 1e-3, "mim_mask_prob": 0.3, "mim_patch_size": 8},
        {"method": "mim", **EARLIER_ONLINE, "lr": 1e-4, "mim_mask_prob": 0.5, "update_filter": "all"},
        {"method": "mim", **EARLIER_ONLINE, "lr": 1e-3, "mim_mask_prob": 0.5, "update_filter": "lora_only"},
        {"method": "mim", **EARLIER_ONLINE, "lr": 1e-2, "mim_mask_prob": 0.5, "update_filter": "lora_norm_only"},
        {"method": "mim", **EPISODIC, "lr": 1e-3, "mim_mask_prob": 0.5},
    ],
    "cotta": [
        *({"method": "cotta", **EARLIER_ONLINE, "lr": lr, "cotta_ema_momentum": m} for lr, m in
          ((1e-2, 0.9), (1e-2, 0.99), (3e-2, 0.9), (3e-2, 0.8), (5e-2, 0.9))),
        {"method": "cotta", **EARLIER_ONLINE, "lr": 1e-2, "cotta_ema_momentum": 0.9, "cotta_aggregation": "mean"},
        {"method": "cotta", **EPISODIC, "lr": 3e-2, "cotta_ema_momentum": 0.8},
    ],
    "eata": [
        *({"method": "eata", **EARLIER_ONLINE, "lr": lr} for lr in (3e-3, 1e-2)),
        {"method": "eata", **EARLIER_ONLINE, "lr": 3e-3, "eata_fisher_data": "train"},
        {"method": "eata", **EPISODIC, "lr": 1e-2, "steps": 2},
    ],
    "episodic_mix": [  # Tent episodic normalising with per-image statistics, alone or mixed with the source's
        {"method": "tent", **EPISODIC, "lr": 1e-2, "steps": 2, "bn_mode": "batch"},
        *({"method": "tent", **EPISODIC, "lr": 1e-2, "steps": 2, "bn_mode": "mix", "bn_prior": n}
          for n in (2.0, 3.0, 4.0)),
        {"method": "tent", **EPISODIC, "lr": 3e-2, "steps": 2, "bn_mode": "mix", "bn_prior": 4.0},
    ],
    "episodic_shrink": [  # Tent episodic normalising with per-image statistics shrunk towards the source's
        *({"method": "tent", **EPISODIC, "lr": lr, "steps": 2, "bn_shrink": k}
          for lr, k in ((1e-2, 8.0), (3e-2, 8.0), (1e-2, 11.0))),
    ],
    "sar": [  # the paper's selection: norm layers minus the top block
        *({"method": "sar", **EARLIER_ONLINE, "lr": lr, "update_filter": "norm_but_top"} for lr in (3e-3, 1e-2)),
        {"method": "sar", **EPISODIC, "lr": 1e-2, "steps": 2, "update_filter": "norm_but_top"},
    ],
}
PER_IMAGE = {"bn_prior": (0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0), "bn_shrink": (1.0, 4.0, 8.0, 11.0, 16.0, 64.0)}
"""Strengths of the stored BatchNorm statistics tried for per-image normalisation: prior images (``--methods
bn_prior``, the ``mix`` mode) and thresholds in standard errors (``--methods bn_shrink``, the ``shrink`` mode)."""
ADAPTER_CANDIDATES = [  # Tent losses of the detector adapter
    ({"method": "tent", **EARLIER_ONLINE, "lr": 3e-3}, {"tent_peaks": 16}),
    ({"method": "tent", **EARLIER_ONLINE, "lr": 1e-2}, {"tent_peaks": 16}),
    ({"method": "tent", **EARLIER_ONLINE, "lr": 3e-4}, {"tent_loss": "sigmoid"}),
    ({"method": "tent", **EARLIER_ONLINE, "lr": 1e-3}, {"tent_loss": "sigmoid"}),
]


class CleanDrop:
    """The clean mAP50 a recipe loses against the source model on the first ``images`` training images (clean and
    in-distribution, and no test split)."""

    def __init__(self, runner: Runner, dataset: str, images: int) -> None:
        self.runner = runner
        self.records = build_manifest(dataset, "train")[:images]
        self.source = self.map50(Recipe("source", "source"))
        print(f"source on {len(self.records)} clean training images: mAP50 {self.source:.4f}", flush=True)

    def map50(self, recipe: Recipe) -> float:
        return evaluate(self.runner.predict(recipe, self.records)[0], self.records)["map50"]

    def __call__(self, recipe: Recipe) -> float:
        return self.source - self.map50(recipe)


def tune_per_image(kind: str, strengths: list[float], score, clean_drop: CleanDrop) -> list[dict]:
    """Per-image BatchNorm statistics combined with the stored ones, ``kind`` ``bn_prior`` (mixed) or ``bn_shrink``
    (soft-thresholded), for each of ``strengths``: the held-out mean and the clean drop."""
    found = []
    for strength in strengths:
        recipe = Recipe("candidate", "candidate", bn_stats=True, bn_batch=1, **{kind: strength})
        mean, per_split = score(recipe)
        drop = clean_drop(recipe)
        found.append({kind: strength, "mean": mean, "splits": per_split, "clean_drop": drop})
        print(f"per-image BN, {kind} {strength}: held-out {mean:.4f}, clean drop {100 * drop:+.2f} points", flush=True)
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="data/demo")
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--methods", nargs="+", default=list(CANDIDATES), choices=[*CANDIDATES, *PER_IMAGE],
                        help="bn_prior / bn_shrink: per-image BatchNorm statistics with each strength of --bn-priors /"
                        " --bn-shrinks")
    parser.add_argument("--bn-priors", type=float, nargs="+", default=list(PER_IMAGE["bn_prior"]), metavar="N",
                        help="strengths (images) tried by --methods bn_prior (0: per-image statistics alone)")
    parser.add_argument("--bn-shrinks", type=float, nargs="+", default=list(PER_IMAGE["bn_shrink"]), metavar="K",
                        help="thresholds (standard errors) tried by --methods bn_shrink")
    parser.add_argument("--clean", action="store_true", help="also the clean mAP50 drop of every candidate")
    parser.add_argument("--output", default="runs/bench/tuning.json")
    args = parser.parse_args(argv)
    splits = splits_for(HELDOUT_CORRUPTIONS, (3, 5))[1:]
    records = {s: build_manifest(args.dataset, s)[: args.images] for s in splits}
    runner = Runner(dataset=args.dataset)

    def score(recipe: Recipe) -> tuple[float, dict]:
        per_split = {s: evaluate(runner.predict(recipe, records[s])[0], records[s])["map50"] for s in splits}
        return statistics.fmean(per_split.values()), per_split

    bn, bn_splits = score(Recipe("bn", "bn", bn_stats=True, bn_batch=EARLIER_BATCH))
    print(f"BatchNorm statistics only: mean mAP50 {bn:.4f} over {', '.join(splits)}", flush=True)
    results = {"splits": splits, "bn": {"mean": bn, "splits": bn_splits}, "candidates": []}
    per_image = [m for m in args.methods if m in PER_IMAGE]
    clean_drop = CleanDrop(runner, args.dataset, args.images) if args.clean or per_image else None
    for kind in per_image:
        results[kind] = tune_per_image(kind, getattr(args, kind + "s"), score, clean_drop)
    runs = [(ttt, {}) for m in args.methods if m not in PER_IMAGE for ttt in CANDIDATES[m]]
    runs += [run for run in ADAPTER_CANDIDATES if "tent" in args.methods]
    for ttt, adapter in runs:
        start = time.perf_counter()
        recipe = Recipe("candidate", "candidate", ttt, adapter=adapter)
        mean, per_split = score(recipe)
        drop = clean_drop(recipe) if clean_drop else None
        results["candidates"].append({"ttt": ttt, "adapter": adapter, "mean": mean, "splits": per_split,
                                      "clean_drop": drop})
        clean = f", clean drop {100 * drop:+.2f} points" if drop is not None else ""
        print(f"{mean:.4f} ({100 * (mean - bn):+.2f} vs BN{clean}) {time.perf_counter() - start:4.0f}s {ttt} {adapter}",
              flush=True)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.output, results, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
