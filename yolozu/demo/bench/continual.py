"""The continual protocol (CoTTA's): the 15 corruptions at severity 5, in the standard order, as one stream that
is never reset, then clean val at the end of the stream (what the adaptation forgot).

Each recipe adapts once over the whole stream (online schedule; BatchNorm statistics over consecutive batches);
its predictions are scored per corruption as the stream passes it. Episodic recipes restart from the source at
every image, so the stream changes nothing for them and they are left out. Results land in
``runs/bench/continual.json``; ``yolozu.demo.bench.continual_report`` writes docs/benchmarks-continual.md and the
plot, and the quick report reads the file for its ``Continual:`` line.

    python -m yolozu.demo.bench.continual [--images 96]       # part of make bench
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
from yolozu.demo.bench.recipes import BENCHMARKED, RECIPES
from yolozu.demo.bench.shift import Runner, machine
from yolozu.demo.corruptions import CORRUPTIONS
from yolozu.demo.data import corrupted_split_name
from yolozu.eval import evaluate
from yolozu.predictions import write_json_atomic

STREAM = [corrupted_split_name(c, 5) for c in CORRUPTIONS] + ["val"]
"""The stream, in order: ImageNet-C's standard corruption order at severity 5, then clean val."""
CONTINUAL = tuple(name for name in BENCHMARKED if not name.endswith("-sample"))
"""The recipes whose state carries along a stream (episodic ones restart at every image)."""


def run(
    dataset: str,
    recipes: Sequence[str],
    images: int,
    device: str = "cpu",
    *,
    stream_splits: Sequence[str] = STREAM,
    progress: bool = True,
) -> dict:
    """Every recipe once over the whole stream (``STREAM``: its splits in order); the rows score each segment."""
    runner = Runner(device, dataset)
    segments = {split: build_manifest(dataset, split)[:images] for split in stream_splits}
    stream = [record for records in segments.values() for record in records]
    rows, started = [], time.perf_counter()
    for name in recipes:
        start = time.perf_counter()
        predictions, report = runner.predict(RECIPES[name], stream)
        seconds = time.perf_counter() - start
        at = 0
        for split, records in segments.items():
            scores = evaluate(predictions[at : at + len(records)], records)
            share = seconds * len(records) / len(stream)
            rows.append({"split": split, "method": name, "map50": scores["map50"], "map": scores["map"],
                         "images": len(records), "seconds": share})
            at += len(records)
        if progress:
            corrupted = rows[-len(segments) : -1]
            mean = sum(r["map50"] for r in corrupted) / max(1, len(corrupted))
            steps = f", {report['steps_run']} steps" if report else ""
            print(f"continual {name:<8} mean mAP50 {mean:.3f}, clean at the end {rows[-1]['map50']:.3f}"
                  f"{steps}, {len(stream) / seconds:.1f} img/s", file=sys.stderr, flush=True)
    return {
        "scope": "continual",
        "date": date.today().isoformat(),
        "machine": machine(device),
        "dataset": dataset,
        "images_per_split": images,
        "splits": list(stream_splits),
        "recipes": {n: RECIPES[n].meta() for n in recipes},
        "rows": rows,
        "seconds": time.perf_counter() - started,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="data/demo")
    parser.add_argument("--images", type=int, default=96, help="images per corruption (default 96: 1,536 in all)")
    parser.add_argument("--recipes", nargs="+", default=list(CONTINUAL), choices=list(CONTINUAL))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", default="runs/bench/continual.json")
    parser.add_argument("--docs", default="docs", help="where benchmarks-continual.md and its plot go ('' to skip)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    results = run(args.dataset, args.recipes, args.images, args.device)
    results["command"] = " ".join(["python -m yolozu.demo.bench.continual", *(sys.argv[1:] if argv is None else argv)])
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.output, results, indent=1)
    print(f"wrote {args.output} ({results['seconds']:.0f} s)", file=sys.stderr)
    if args.docs and {"source", "bn"} <= set(args.recipes):
        from yolozu.demo.bench.continual_report import write_continual_report

        for path in write_continual_report(results, Path(args.docs)):
            print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
