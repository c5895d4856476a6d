"""mAP of a detector checkpoint on clean val and on each corrupted val split: the drops TTT must win back.

``python -m yolozu.demo.robustness --root data/demo --severities 3 5`` prints a markdown table
(and ``--output`` writes the numbers as JSON). The splits come from ``tools/make_demo_data.py``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from yolozu.adapters.detector import DetectorAdapter
from yolozu.data import build_manifest
from yolozu.demo.corruptions import CORRUPTIONS
from yolozu.inference.predictor import Predictor
from yolozu.io.predictions import write_json_atomic
from yolozu.metrics import evaluate


def evaluate_split(adapter: Any, root: Path, split: str, *, batch_stats: int = 0) -> dict[str, Any]:
    """Predict and score one split of ``root`` with ``adapter``; with ``batch_stats`` > 0 also score
    predictions made with test-batch BatchNorm statistics (batches of that size) as ``map50_batch_stats``.

    The test-batch statistics are the "BN adapt" reference of Schneider et al. 2020 (no learning): how much of
    a corruption's drop is a shift of normalisation statistics. ``Predictor`` leaves the model as it was.
    """
    records = build_manifest(root, split)
    report = evaluate(adapter.predict(records), records)
    if batch_stats:
        adapted = evaluate(Predictor(adapter).predict(records, bn="batch", batch_size=batch_stats), records)
        report["map50_batch_stats"] = adapted["map50"]
        report["map_batch_stats"] = adapted["map"]
    return report


def _cell(report: dict[str, Any]) -> str:
    text = f"{report['map50']:.3f} ({report['map']:.3f})"
    if "map50_batch_stats" in report:
        text += f" / {report['map50_batch_stats']:.3f}"
    return text


def markdown_table(clean: dict[str, Any], rows: dict[str, dict[int, dict[str, Any]]], severities: Sequence[int]) -> str:
    """Corruption x severity table: mAP50 (mAP), and "/ mAP50 with test-batch BN statistics" when measured."""
    head = "| split | " + " | ".join(f"severity {s}" for s in severities) + " |"
    lines = [head, "|" + " --- |" * (len(severities) + 1)]
    lines.append(f"| clean val | {_cell(clean)}" + " |" * len(severities))
    for name, by_severity in rows.items():
        lines.append(f"| {name} | " + " | ".join(_cell(by_severity[s]) for s in severities) + " |")
    for key, label in (("map50", "mean mAP50"), ("map50_batch_stats", "mean mAP50, test-batch BN statistics")):
        if all(key in r[s] for r in rows.values() for s in severities):
            means = [sum(r[s][key] for r in rows.values()) / max(1, len(rows)) for s in severities]
            lines.append(f"| {label} | " + " | ".join(f"{m:.3f}" for m in means) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: evaluate the checkpoint on clean val and every corruption at the given severities."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default="data/demo")
    p.add_argument("--checkpoint", default=None, help="detector checkpoint (default: the committed one)")
    p.add_argument("--severities", nargs="+", type=int, default=[3, 5])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--batch-stats",
        type=int,
        default=0,
        metavar="B",
        help="also score with BatchNorm using the statistics of test batches of B images (0: off)",
    )
    p.add_argument("--output", default=None, help="write the numbers as JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    root = Path(args.root)
    adapter = DetectorAdapter(args.checkpoint)
    start = time.perf_counter()
    clean = evaluate_split(adapter, root, "val", batch_stats=args.batch_stats)
    rows: dict[str, dict[int, dict[str, Any]]] = {}
    for name in CORRUPTIONS:
        rows[name] = {
            s: evaluate_split(adapter, root, f"val-{name}-{s}", batch_stats=args.batch_stats) for s in args.severities
        }
        print(
            f"{name}: " + ", ".join(f"sev {s} mAP50 {rows[name][s]['map50']:.3f}" for s in args.severities), flush=True
        )
    print(markdown_table(clean, rows, args.severities))
    print(f"({time.perf_counter() - start:.0f} s)")
    if args.output:
        blob = {"checkpoint": args.checkpoint or "default", "clean": clean, "corrupted": rows}
        write_json_atomic(
            args.output, {**blob, "severities": args.severities, "batch_stats": args.batch_stats}, indent=1
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
