"""The shift benchmark: how much accuracy each method wins back on corrupted data, at what cost.

For every split (clean val and the chosen corruption/severity copies of it) and every recipe
(``yolozu.demo.bench.recipes``) it runs the export flow in-process on the same images with the same seeds,
evaluates COCO mAP50 and mAP@[.5:.95], and times the export against the no-TTT export of the same split.
Peak memory is measured once per recipe on a fixed subset. Everything lands in one JSON file that
``yolozu.demo.bench.report`` turns into docs/benchmarks.md and its plots.

The budget: reset per corruption, 400 images per corruption in batches of 8 (``recipes.BUDGET_BATCH``), 50
updates per corruption for an online method and as many steps for an adapt-first one, with BatchNorm statistics
computed on the very same batches. Every method's per-image matches on each corrupted split are kept
(``<output>-matches.npz``) and its gain over BatchNorm statistics carries a paired bootstrap 95% interval over
images (``gains``).

    python -m yolozu.demo.bench.shift --quick       # make bench
    python -m yolozu.demo.bench.shift --full        # make bench-full
    python -m yolozu.demo.bench.shift --quick --seed 1                      # the demo data made with seed 1
    python -m yolozu.demo.bench.shift --quick --adapter pkg.mod:factory --checkpoint FILE   # another model
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import date
from pathlib import Path
from typing import Sequence

import torch

from yolozu.data import build_manifest
from yolozu.demo.bench.bootstrap import image_matches
from yolozu.demo.bench.budget import budget, split_images
from yolozu.demo.bench.gains import DRAWS, method_gains, save_matches
from yolozu.demo.bench.memory import peak_bytes
from yolozu.demo.bench.pages import companions, data_root, default_docs, default_output, machine
from yolozu.demo.bench.recipes import BENCHMARKED, BUDGET_BATCH, QUICK, RECIPES, Recipe
from yolozu.demo.bench.report import write_report
from yolozu.demo.bench.runner import Runner, add_model_flags, runner_from_args, skipped_recipes
from yolozu.demo.corruptions import CORRUPTIONS, HELDOUT_CORRUPTIONS
from yolozu.demo.data import corrupted_split_name
from yolozu.io.predictions import write_json_atomic
from yolozu.metrics import evaluate


def splits_for(corruptions: Sequence[str], severities: Sequence[int]) -> list[str]:
    """``val`` then every ``val-<corruption>-<severity>``."""
    return ["val"] + [corrupted_split_name(c, s) for c in corruptions for s in severities]


def _row(
    runner: Runner, recipe: Recipe, split: str, records: list[dict], log_dir: str | None, matches: dict
) -> dict:
    """One recipe on one split: scores, time and, for TTT recipes, the steps (and the log under ``log_dir``);
    on a corrupted split, its per-image matches go into ``matches[split][recipe.name]`` (for the intervals)."""
    start = time.perf_counter()
    predictions, report = runner.predict(recipe, records)
    seconds = time.perf_counter() - start
    scores = evaluate(predictions, records)
    if split != "val":
        matches.setdefault(split, {})[recipe.name] = image_matches(predictions, records)
    row = {"split": split, "method": recipe.name, "map50": scores["map50"], "map": scores["map"],
           "images": len(records), "seconds": seconds}
    if report is not None:
        row["steps_run"] = report["steps_run"]
        row["stopped_early"] = report["stopped_early"]
        if log_dir and split != "val":
            write_json_atomic(Path(log_dir) / f"{recipe.name}__{split}.json",
                              {"output": None, "ttt": {"method": recipe.name, "report": report}})
    return row


def run(
    dataset: str,
    splits: Sequence[str],
    recipes: Sequence[str],
    *,
    images: int | None,
    device: str = "cpu",
    memory_images: int = 32,
    log_dir: str | None = None,
    progress: bool = True,
    runner: Runner | None = None,
    matches_path: str | None = None,
    draws: int = DRAWS,
) -> dict:
    """Every recipe the adapter supports on every split; returns the JSON-ready results (``skipped``: the
    others, with the reason). ``runner``: the model (default: the built-in detector).

    Every split must hold ``images`` images (all of them when None, the same number in each), so every method
    gets the same budget (``budget``: images, batch and updates per corruption). Each method's gain over
    BatchNorm statistics (``bn``) carries paired bootstrap intervals of ``draws`` resamples over images
    (``gains``); the per-image matches they are drawn from are written to ``matches_path`` when given."""
    runner = runner or Runner(device, dataset)
    manifests = {split: build_manifest(dataset, split)[:images] for split in splits}
    per_split = split_images({split: len(records) for split, records in manifests.items()}, images)
    skipped = skipped_recipes(runner, recipes, manifests[splits[-1]])
    chosen = [RECIPES[name] for name in recipes if name not in skipped]
    if log_dir:
        Path(log_dir).mkdir(parents=True, exist_ok=True)
    rows, started = [], time.perf_counter()
    matches: dict[str, dict] = {}
    for split in splits:
        records = manifests[split]
        for recipe in chosen:
            rows.append(_row(runner, recipe, split, records, log_dir, matches))
            if progress:
                row = rows[-1]
                print(f"{split:<28} {recipe.name:<13} mAP50 {row['map50']:.3f}  mAP {row['map']:.3f}  "
                      f"{len(records) / row['seconds']:7.1f} img/s", file=sys.stderr, flush=True)
    memory_split = splits[-1]
    memory_records = build_manifest(dataset, memory_split)[:memory_images]
    memory = {}
    for recipe in chosen:
        runner.predict(recipe, memory_records)  # warm-up
        memory[recipe.name] = peak_bytes(lambda recipe=recipe: runner.predict(recipe, memory_records), device)
    curve = Path(log_dir or "") / f"tent__{splits[-1]}.json"
    compared = [r.name for r in chosen if r.name not in ("source", "bn")]
    gains = method_gains(matches, "bn", compared, draws=draws) if matches else {}
    if matches_path and matches:
        save_matches(Path(matches_path), matches)
    return {
        "budget": budget(per_split, BUDGET_BATCH),
        "gains": gains,
        "matches": matches_path if matches else None,
        "loss_curve_log": str(curve) if log_dir and curve.is_file() else None,
        "date": date.today().isoformat(),
        "machine": machine(device),
        "dataset": dataset,
        "model": runner.describe(),
        "images_per_split": per_split,
        "splits": list(splits),
        "recipes": {r.name: r.meta() for r in chosen},
        "skipped": skipped,
        "rows": rows,
        "peak_memory_bytes": memory,
        "memory_split": memory_split,
        "memory_images": len(memory_records),
        "seconds": time.perf_counter() - started,
    }


BENCH_CORRUPTIONS = ("gaussian_noise", "defocus_blur", "fog", "contrast")
"""make bench's corruptions: one of each ImageNet-C family (noise, blur, weather, digital), so the quick scope runs
the full budget within its time; make bench-full runs all 15."""
IMAGES = 400
"""Images per corruption of every scope: with ``recipes.BUDGET_BATCH`` (8), 50 updates per corruption."""
SCOPES = {
    "quick": ((5,), QUICK, BENCH_CORRUPTIONS),
    "full": ((1, 2, 3, 4, 5), BENCHMARKED, CORRUPTIONS),
    "heldout": ((3, 5), BENCHMARKED, HELDOUT_CORRUPTIONS),
}
"""Each scope's severities, default recipes and corruptions (``--quick`` is make bench's, ``--full`` make
bench-full's)."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("--quick", action="store_true", help="4 corruptions (one of each family) at severity 5, the "
                       "quick recipes (default)")
    scope.add_argument("--full", action="store_true", help="15 corruptions x severities 1-5, every recipe")
    scope.add_argument("--heldout", action="store_true", help="the 4 held-out corruptions at severities 3 and 5")
    parser.add_argument("--dataset", help="the data (default: data/demo, or data/demo-seed<S> for --seed S)")
    parser.add_argument("--seed", type=int, default=0, help="the demo data's seed (tools/make_demo_data.py --seed)")
    parser.add_argument("--corruptions", nargs="+", choices=list(CORRUPTIONS) + list(HELDOUT_CORRUPTIONS),
                        help="only these corruptions (default: the scope's)")
    parser.add_argument("--severities", nargs="+", type=int, choices=(1, 2, 3, 4, 5),
                        help="only these severities (default: the scope's)")
    parser.add_argument("--images", type=int, default=IMAGES, help=f"images per split (default {IMAGES})")
    parser.add_argument("--draws", type=int, default=DRAWS, help=f"bootstrap resamples of each interval ({DRAWS})")
    parser.add_argument("--memory-images", type=int, default=32, help="images of the peak-memory export (32)")
    parser.add_argument("--recipes", nargs="+", choices=list(RECIPES), help="default: the scope's")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", help="results JSON (default runs/bench/<scope>[-<adapter>][-seed<S>].json)")
    parser.add_argument("--docs", help="the report: a folder (benchmarks*.md and plots go there), a .md path (its "
                        "plots beside it), or '' to skip (default: docs; docs/benchmarks-<adapter>.md for a plug-in)")
    add_model_flags(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    name = "full" if args.full else "heldout" if args.heldout else "quick"
    severities, recipes, corruptions = SCOPES[name]
    corruptions = args.corruptions or corruptions
    severities = tuple(args.severities or severities)
    dataset = data_root(args.dataset, args.seed)
    output = Path(args.output or default_output(name, args.adapter, args.seed))
    output.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    recipes = args.recipes or list(recipes)
    try:
        results = run(dataset, splits_for(corruptions, severities), recipes, images=args.images,
                      device=args.device, memory_images=args.memory_images,
                      log_dir=str(output.with_suffix("")) + "-logs", runner=runner_from_args(args, dataset),
                      matches_path=str(output.with_suffix("")) + "-matches.npz", draws=args.draws)
    except ValueError as e:
        print(f"yolozu.demo.bench.shift: error: {e}", file=sys.stderr)
        return 2
    results.update(scope=name, data_seed=args.seed)
    results["command"] = "python -m yolozu.demo.bench.shift " + " ".join(sys.argv[1:] if argv is None else argv)
    write_json_atomic(output, results, indent=1)
    print(f"wrote {output} ({results['seconds']:.0f} s)", file=sys.stderr)
    for reason in results["skipped"].items():
        print("skipped %s: %s" % reason, file=sys.stderr)
    docs = default_docs(name, args.adapter) if args.docs is None else args.docs
    if docs and name != "heldout" and {"source", "bn"} <= set(results["recipes"]):
        for path in write_report(results, Path(docs), name, companions(output, results)):
            print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
