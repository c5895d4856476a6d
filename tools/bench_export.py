#!/usr/bin/env python
"""Throughput of the whole export (images read, adapted, predicted, written), side by side in one run.

Variants, each the real ``tools/export_predictions.py`` run in this process on one split:
  - none: no TTT (the source model's predictions);
  - tent: online Tent, the benchmark's recipe (``python -m yolozu.demo.bench.recipes tent``);
  - tent-captured: the same with ``--ttt-capture`` (CUDA graphs);
  - tent-nondeterministic: the same with ``--no-deterministic`` (what determinism costs).
Each variant runs once on a few images (warm-up: CUDA context, cuDNN, worker start), then once timed on the
whole split. Prints images per second and each variant's ratio to ``none``.

    python tools/bench_export.py [--device cuda] [--split train] [--workers 4]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from yolozu.cli.export import main as export
from yolozu.data.manifest import build_manifest
from yolozu.demo.bench.recipes import export_flags

VARIANTS = {
    "none": [],
    "tent": export_flags("tent"),
    "tent-captured": [*export_flags("tent"), "--ttt-capture"],
    "tent-nondeterministic": [*export_flags("tent"), "--no-deterministic"],
}


def timed_export(flags: list[str], common: list[str], out: Path) -> float:
    """Seconds of one export with ``flags`` (an error is fatal: a throughput of a failed run means nothing)."""
    start = time.perf_counter()
    code = export([*common, *flags, "--output", str(out)])
    seconds = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"bench-export: the export {' '.join(flags)} failed with exit {code}")
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dataset", default="data/demo")
    parser.add_argument("--split", default="train", help="the split exported (train: 2,000 images)")
    parser.add_argument("--max-images", type=int, help="export at most this many images")
    parser.add_argument("--workers", type=int, help="image-reading processes (default: the export's)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    images = len(build_manifest(args.dataset, args.split)[: args.max_images])
    common = ["--adapter", "detector", "--dataset", args.dataset, "--split", args.split, "--device", args.device]
    common += ["--wrap", "--quiet", "--seed", "0"]
    common += ["--workers", str(args.workers)] if args.workers is not None else []
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.variants:
            timed_export(VARIANTS[name], [*common, "--max-images", "64"], Path(tmp) / f"{name}-warm.json")
            limit = ["--max-images", str(args.max_images)] if args.max_images else []
            seconds = timed_export(VARIANTS[name], [*common, *limit], Path(tmp) / f"{name}.json")
            rows[name] = {"seconds": seconds, "images_per_second": images / seconds}
    base = rows.get("none", next(iter(rows.values())))["images_per_second"]
    print(f"# bench-export: {args.split} ({images} images), device {args.device}")
    for name, row in rows.items():
        row["over_none"] = row["images_per_second"] / base
        print(f"{name:<22} {row['images_per_second']:8.1f} img/s  {row['over_none']:.2f}x of none")
    if args.json:
        Path(args.json).write_text(json.dumps({"split": args.split, "images": images, "device": args.device,
                                               "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
