#!/usr/bin/env python
"""Print mAP50 and mAP@[.5:.95] of several predictions.json files on one split, side by side.

  python tools/compare_exports.py --dataset data/demo --split val-fog-5 none=runs/a.json tent=runs/b.json
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from yolozu.data import build_manifest  # noqa: E402
from yolozu.io.predictions import load_predictions  # noqa: E402
from yolozu.metrics import evaluate  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--split", required=True)
    parser.add_argument("runs", nargs="+", metavar="NAME=PREDICTIONS", help="the first is the baseline")
    args = parser.parse_args(argv)
    records = build_manifest(args.dataset, args.split)
    rows = []
    for item in args.runs:
        name, _, path = item.partition("=")
        if not path:
            parser.error(f"expected NAME=PREDICTIONS, got {item!r}")
        rows.append((name, evaluate(load_predictions(path), records)))
    base = rows[0][1]["map50"]
    print(f"{args.split} ({len(records)} images)")
    print(f"{'run':<10} {'mAP50':>7} {'mAP':>7} {'vs ' + rows[0][0]:>10}")
    for name, report in rows:
        delta = f"{100 * (report['map50'] - base):+.1f} pts" if name != rows[0][0] else ""
        print(f"{name:<10} {report['map50']:>7.3f} {report['map']:>7.3f} {delta:>10}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
