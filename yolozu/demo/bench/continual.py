"""The continual protocol (CoTTA's): the 15 corruptions at severity 5, in the standard order, as one stream that
is never reset, then clean val at the end of the stream (what the adaptation forgot).

Each recipe adapts once over the whole stream (online schedule, with the settings tuned for long streams,
``recipes.STREAM_SETTINGS``; BatchNorm statistics over consecutive batches);
its predictions are scored per corruption as the stream passes it. Episodic recipes restart from the source at
every image, so the stream changes nothing for them and they are left out. Results land in
``runs/bench/continual.json``; ``yolozu.demo.bench.continual_report`` writes docs/benchmarks-continual.md and the
plot, and the quick report reads the file for its ``Continual:`` line.

    python -m yolozu.demo.bench.continual [--images 400]       # part of make bench
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import date
from pathlib import Path
from typing import Callable, Sequence

import torch

from yolozu.data import build_manifest
from yolozu.demo.bench.bootstrap import Matches, image_matches
from yolozu.demo.bench.budget import budget
from yolozu.demo.bench.continual_report import write_continual_report
from yolozu.demo.bench.gains import method_gains
from yolozu.demo.bench.pages import data_root, default_docs, default_output, machine
from yolozu.demo.bench.recipes import BENCHMARKED, GRADIENT_METHODS, RECIPES, STREAM_BATCH, stream_recipe
from yolozu.demo.bench.runner import Runner, add_model_flags, runner_from_args, skipped_recipes
from yolozu.demo.corruptions import CORRUPTIONS
from yolozu.demo.data import corrupted_split_name
from yolozu.io.predictions import write_json_atomic
from yolozu.metrics import evaluate

STREAM = [corrupted_split_name(c, 5) for c in CORRUPTIONS] + ["val"]
"""The stream, in order: ImageNet-C's standard corruption order at severity 5, then clean val."""
IMAGES = 400
"""Images per segment by default: in batches of ``recipes.STREAM_BATCH`` (8), 50 updates per corruption, the
reset-per-corruption protocol's budget."""
STREAMABLE = tuple(name for name in BENCHMARKED if not (RECIPES[name].episodic or RECIPES[name].adapts_first))
"""The recipes whose state carries along a stream as it predicts (episodic ones restart at every image; an
adapt-first one would see the whole stream before its first prediction)."""
CONTINUAL = ("source", "bn", *GRADIENT_METHODS)
"""The stream protocols' default recipes: the streamable ones but the papers' presets (``--recipes`` adds them;
CoTTA's 32 views over a 6,400-image stream would take most of an hour on 2 cores)."""


def segment_slices(predictions: list, segments: list) -> list[tuple[list, list]]:
    """Each segment's ``(predictions, records)``: the stream's predictions cut at the segments' lengths."""
    found, at = [], 0
    for _, records in segments:
        found.append((predictions[at : at + len(records)], records))
        at += len(records)
    return found


def segment_matches(predictions: list, segments: list, clean: str) -> dict[str, Matches]:
    """Each corrupted segment's IoU-0.5 matches (``bootstrap.image_matches``), keyed by the segment's index as a
    string (``gains.method_gains``' split keys); segments of split ``clean`` are left out."""
    slices = segment_slices(predictions, segments)
    return {str(index): image_matches(mine, records)
            for index, ((split, _), (mine, records)) in enumerate(zip(segments, slices)) if split != clean}


def stream_rows(name: str, predictions: list, segments: list, seconds: float) -> list[dict]:
    """One row per segment of one recipe's stream: its slice of the predictions scored, its share of the time."""
    total = sum(len(records) for _, records in segments)
    rows = []
    for index, ((split, _), (mine, records)) in enumerate(zip(segments, segment_slices(predictions, segments))):
        scores = evaluate(mine, records)
        rows.append({"split": split, "segment": index, "method": name, "map50": scores["map50"],
                     "map": scores["map"], "images": len(records), "seconds": seconds * len(records) / total})
    return rows


def run(
    dataset: str,
    recipes: Sequence[str],
    images: int,
    device: str = "cpu",
    *,
    stream_splits: Sequence[str] = STREAM,
    progress: bool = True,
    runner: Runner | None = None,
    scope: str = "continual",
) -> dict:
    """Every recipe the adapter supports once over the whole stream (``stream_splits`` in order; a split may
    come back, as in the gradual protocol); the rows score each segment. ``runner``: the model (default: the
    built-in detector); ``skipped``: the recipes it cannot run, with the reason. ``gains``: each recipe's
    mAP50 gain over BatchNorm statistics (when they ran) with paired bootstrap 95% intervals over images
    (``gains.method_gains``), for the mean over the corrupted segments and per segment (keyed by its index)."""
    runner = runner or Runner(device, dataset)
    cache: dict[str, list[dict]] = {}
    segments = [(split, cache.setdefault(split, build_manifest(dataset, split)[:images])) for split in stream_splits]
    stream = [record for _, records in segments for record in records]
    skipped = skipped_recipes(runner, recipes, segments[0][1])
    chosen = [name for name in recipes if name not in skipped]
    rows, started = [], time.perf_counter()
    matches: dict[str, dict[str, Matches]] = {}
    for name in chosen:
        start = time.perf_counter()
        predictions, report = runner.predict(stream_recipe(name), stream)
        rows += stream_rows(name, predictions, segments, time.perf_counter() - start)
        for index, found in segment_matches(predictions, segments, clean="val").items():
            matches.setdefault(index, {})[name] = found
        if progress:
            corrupted = [r for r in rows[-len(segments):] if r["split"] != "val"]
            mean = sum(r["map50"] for r in corrupted) / max(1, len(corrupted))
            steps = f", {report['steps_run']} steps" if report else ""
            print(f"{scope} {name:<8} mean mAP50 {mean:.3f}, at the end ({segments[-1][0]}) {rows[-1]['map50']:.3f}"
                  f"{steps}, {len(stream) / (time.perf_counter() - start):.1f} img/s", file=sys.stderr, flush=True)
    return {
        "scope": scope,
        "date": date.today().isoformat(),
        "machine": machine(device),
        "dataset": dataset,
        "model": runner.describe(),
        "images_per_split": images,
        "budget": budget(len(segments[0][1]), STREAM_BATCH),
        "splits": list(stream_splits),
        "recipes": {n: stream_recipe(n).meta() for n in chosen},
        "skipped": skipped,
        "rows": rows,
        "gains": method_gains(matches, "bn", chosen) if "bn" in chosen else {},
        "seconds": time.perf_counter() - started,
    }


def add_flags(parser: argparse.ArgumentParser, images: int, protocol: str) -> None:
    """The flags the continual and gradual protocols share: data, images, recipes, model, output and docs."""
    parser.add_argument("--dataset", help="the data (default: data/demo, or data/demo-seed<S> for --seed S)")
    parser.add_argument("--seed", type=int, default=0, help="the demo data's seed (tools/make_demo_data.py --seed)")
    parser.add_argument("--images", type=int, default=images, help=f"images per segment (default {images})")
    parser.add_argument("--recipes", nargs="+", default=list(CONTINUAL), choices=list(STREAMABLE))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", help=f"results JSON (default runs/bench/{protocol}[-<adapter>][-seed<S>].json)")
    parser.add_argument("--docs", help=f"the report: a folder (benchmarks-{protocol}.md and its plot go there), a "
                        f".md path (its plot beside it), or '' to skip (default: docs; "
                        f"docs/benchmarks-{protocol}-<adapter>.md for a plug-in)")
    add_model_flags(parser)


def protocol_main(
    argv: Sequence[str] | None,
    protocol: str,
    images: int,
    stream: Sequence[str],
    write_report: Callable[[dict, Path], list[Path]],
    description: str | None = None,
) -> int:
    """The command line of a stream protocol (continual, gradual): every recipe once over ``stream``, then the
    results file and, unless ``--docs ''``, the report ``write_report(results, docs)`` writes."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags(parser, images, protocol)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    dataset = data_root(args.dataset, args.seed)
    results = run(dataset, args.recipes, args.images, args.device, stream_splits=stream,
                  runner=runner_from_args(args, dataset), scope=protocol)
    results["data_seed"] = args.seed
    given = sys.argv[1:] if argv is None else argv
    results["command"] = " ".join([f"python -m yolozu.demo.bench.{protocol}", *given])
    output = Path(args.output or default_output(protocol, args.adapter, args.seed))
    output.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(output, results, indent=1)
    print(f"wrote {output} ({results['seconds']:.0f} s)", file=sys.stderr)
    for reason in results["skipped"].items():
        print("skipped %s: %s" % reason, file=sys.stderr)
    docs = default_docs(protocol, args.adapter) if args.docs is None else args.docs
    if docs and {"source", "bn"} <= set(results["recipes"]):
        for path in write_report(results, Path(docs)):
            print(f"wrote {path}", file=sys.stderr)
    return 0


def _write_report(results: dict, docs: Path) -> list[Path]:
    return write_continual_report(results, docs)


def main(argv: Sequence[str] | None = None) -> int:
    return protocol_main(argv, "continual", IMAGES, STREAM, _write_report, __doc__)


if __name__ == "__main__":
    sys.exit(main())
