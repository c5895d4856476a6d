"""The shift benchmark: how much accuracy each method wins back on corrupted data, at what cost.

For every split (clean val and the chosen corruption/severity copies of it) and every recipe
(``yolozu.demo.bench.recipes``) it runs the export flow in-process on the same images with the same seeds,
evaluates COCO mAP50 and mAP@[.5:.95], and times the export against the no-TTT export of the same split.
Peak memory is measured once per recipe on a fixed subset. Everything lands in one JSON file that
``yolozu.demo.bench.report`` turns into docs/benchmarks.md and its plots.

    python -m yolozu.demo.bench.shift --quick       # make bench
    python -m yolozu.demo.bench.shift --full        # make bench-full
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import date
from pathlib import Path
from typing import Sequence

import torch

from yolozu.adapters.detector import DetectorAdapter
from yolozu.data import build_manifest
from yolozu.demo.bench.memory import peak_bytes
from yolozu.demo.bench.recipes import BENCHMARKED, RECIPES, Recipe
from yolozu.demo.corruptions import CORRUPTIONS, HELDOUT_CORRUPTIONS
from yolozu.demo.data import corrupted_split_name
from yolozu.eval import evaluate
from yolozu.predict import Predictor
from yolozu.predictions import write_json_atomic
from yolozu.tta.config import TTTConfig
from yolozu.tta.schedules import adapt_and_predict

PREDICT_BATCH = 32
CALIBRATION_IMAGES = 512
"""Images of a method's in-distribution split (EATA's Fisher) the benchmark reads: the first 512 of it."""


class Runner:
    """Runs recipes on records, one detector per set of adapter options. Every run starts from the source
    weights: the export's schedules adapt copies of the tensors and leave the module as it was."""

    def __init__(self, device: str = "cpu", dataset: str = "data/demo") -> None:
        self.device = device
        self.dataset = dataset
        self._adapters: dict[tuple, DetectorAdapter] = {}
        self._calibration: dict[str, list[dict]] = {}

    def adapter(self, recipe: Recipe) -> DetectorAdapter:
        key = tuple(sorted(recipe.adapter.items()))
        if key not in self._adapters:
            self._adapters[key] = DetectorAdapter(device=self.device, batch_size=PREDICT_BATCH, **recipe.adapter)
        return self._adapters[key]

    def calibration(self, config: TTTConfig) -> list[dict] | None:
        """The in-distribution records a method asks for (EATA's Fisher split), read once per split."""
        split = config.calibration_split()
        if split and split not in self._calibration:
            self._calibration[split] = build_manifest(self.dataset, split)[:CALIBRATION_IMAGES]
        return self._calibration.get(split) if split else None

    def predict(self, recipe: Recipe, records: Sequence[dict]) -> tuple[list[dict], dict | None]:
        """The recipe's predictions and, for TTT recipes, its report."""
        adapter = self.adapter(recipe)
        if recipe.ttt is not None:
            config = recipe.config()
            predictions, report = adapt_and_predict(
                adapter, records, config, batch_size=PREDICT_BATCH, calibration=self.calibration(config)
            )
            return predictions, report.to_dict()
        if recipe.bn_stats:
            predictor = Predictor(adapter, **({} if recipe.bn_prior is None else {"bn_prior": recipe.bn_prior}))
            return predictor.predict(records, bn=recipe.bn, batch_size=recipe.bn_batch), None
        return adapter.predict(records), None


def machine(device: str) -> dict:
    """Where a benchmark ran (for its provenance line)."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "torch": torch.__version__,
    }


def splits_for(corruptions: Sequence[str], severities: Sequence[int]) -> list[str]:
    """``val`` then every ``val-<corruption>-<severity>``."""
    return ["val"] + [corrupted_split_name(c, s) for c in corruptions for s in severities]


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
) -> dict:
    """Every recipe on every split; returns the JSON-ready results."""
    runner = Runner(device, dataset)
    chosen = [RECIPES[name] for name in recipes]
    if log_dir:
        Path(log_dir).mkdir(parents=True, exist_ok=True)
    rows = []
    started = time.perf_counter()
    for split in splits:
        records = build_manifest(dataset, split)[:images]
        for recipe in chosen:
            start = time.perf_counter()
            predictions, report = runner.predict(recipe, records)
            seconds = time.perf_counter() - start
            scores = evaluate(predictions, records)
            row = {
                "split": split,
                "method": recipe.name,
                "map50": scores["map50"],
                "map": scores["map"],
                "images": len(records),
                "seconds": seconds,
            }
            if report is not None:
                row["steps_run"] = report["steps_run"]
                row["stopped_early"] = report["stopped_early"]
                if log_dir and split != "val":
                    write_json_atomic(
                        Path(log_dir) / f"{recipe.name}__{split}.json",
                        {"output": None, "ttt": {"method": recipe.name, "report": report}},
                    )
            rows.append(row)
            if progress:
                print(
                    f"{split:<28} {recipe.name:<13} mAP50 {row['map50']:.3f}  mAP {row['map']:.3f}  "
                    f"{len(records) / seconds:7.1f} img/s",
                    file=sys.stderr,
                    flush=True,
                )
    memory_split = splits[-1]
    memory_records = build_manifest(dataset, memory_split)[:memory_images]
    memory = {}
    for recipe in chosen:
        runner.predict(recipe, memory_records)  # warm-up
        memory[recipe.name] = peak_bytes(lambda recipe=recipe: runner.predict(recipe, memory_records), device)
    curve = Path(log_dir or "") / f"tent__{splits[-1]}.json"
    return {
        "loss_curve_log": str(curve) if log_dir and curve.is_file() else None,
        "date": date.today().isoformat(),
        "machine": machine(device),
        "dataset": dataset,
        "images_per_split": images,
        "splits": list(splits),
        "recipes": {r.name: r.meta() for r in chosen},
        "rows": rows,
        "peak_memory_bytes": memory,
        "memory_split": memory_split,
        "memory_images": len(memory_records),
        "seconds": time.perf_counter() - started,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("--quick", action="store_true", help="15 corruptions at severity 5 (default)")
    scope.add_argument("--full", action="store_true", help="15 corruptions x severities 1-5")
    scope.add_argument("--heldout", action="store_true", help="the 4 held-out corruptions at severities 3 and 5")
    parser.add_argument("--dataset", default="data/demo")
    parser.add_argument("--images", type=int, default=300, help="images per split (default 300)")
    parser.add_argument("--memory-images", type=int, default=32, help="images of the peak-memory export (32)")
    parser.add_argument("--recipes", nargs="+", default=list(BENCHMARKED), choices=list(RECIPES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", help="results JSON (default runs/bench/<scope>.json)")
    parser.add_argument("--docs", default="docs", help="where benchmarks.md and the plots go ('' to skip)")
    args = parser.parse_args(argv)
    name = "full" if args.full else "heldout" if args.heldout else "quick"
    if args.full:
        splits = splits_for(CORRUPTIONS, (1, 2, 3, 4, 5))
    elif args.heldout:
        splits = splits_for(HELDOUT_CORRUPTIONS, (3, 5))
    else:
        splits = splits_for(CORRUPTIONS, (5,))
    output = Path(args.output or f"runs/bench/{name}.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    results = run(
        args.dataset,
        splits,
        args.recipes,
        images=args.images,
        device=args.device,
        memory_images=args.memory_images,
        log_dir=str(output.parent / f"{name}-logs"),
    )
    results["scope"] = name
    results["command"] = "python -m yolozu.demo.bench.shift " + " ".join(sys.argv[1:] if argv is None else argv)
    write_json_atomic(output, results, indent=1)
    print(f"wrote {output} ({results['seconds']:.0f} s)", file=sys.stderr)
    if args.docs and name != "heldout" and {"source", "bn"} <= set(args.recipes):
        from yolozu.demo.bench.report import write_report

        stream = output.parent / "continual.json"  # the continual protocol's results, when make bench made them
        continual = json.loads(stream.read_text()) if name == "quick" and stream.is_file() else None
        for path in write_report(results, Path(args.docs), name, continual):
            print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
