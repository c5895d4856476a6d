#!/usr/bin/env python
"""Feature alignment against Tent and BatchNorm statistics, online, with paired bootstrap intervals over images.

For each corruption split ``val-<name>-<severity>`` of ``--dataset``, the first ``--images`` images in batches of
``--batch-size``: BatchNorm statistics of those batches (no gradient step) and each method given by ``--method``
(online: adapt on batch t, predict batch t; ``images / batch`` updates per corruption, reset per corruption). Each
method's gain in mAP50 over BatchNorm statistics carries a paired bootstrap 95% interval over images
(``yolozu.demo.bench.bootstrap``), per corruption and for the mean over corruptions.

    python tools/align_bench.py --corruptions heldout --method tent=tent,lr=1e-3 --method align=align,lr=1e-3

A method is ``LABEL=METHOD,field=value,...`` with ``TTTConfig`` fields (a tuple's items joined by ``+``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from yolozu.cli.adapter_flags import adapter_from_args, add_adapter_flags  # noqa: E402
from yolozu.data import build_manifest  # noqa: E402
from yolozu.demo.bench.bootstrap import image_matches, map50_gain, paired_interval, weighted_map50  # noqa: E402
from yolozu.demo.corruptions import CORRUPTIONS, HELDOUT_CORRUPTIONS  # noqa: E402
from yolozu.inference.predictor import Predictor  # noqa: E402
from yolozu.tta.config import TTTConfig  # noqa: E402
from yolozu.tta.schedules import adapt_and_predict  # noqa: E402

ONLINE = {"schedule": "online", "update_filter": "norm_only", "max_batches": None, "seed": 0}


def _value(text: str) -> Any:
    if "+" in text:
        return tuple(text.split("+"))
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def parse_method(spec: str) -> tuple[str, dict[str, Any]]:
    """``LABEL=METHOD,field=value,...`` -> (label, TTTConfig fields)."""
    label, _, rest = spec.partition("=")
    method, *pairs = rest.split(",")
    fields = {"method": method}
    for pair in pairs:
        key, _, value = pair.partition("=")
        fields[key] = _value(value)
    return label, fields


def _corruptions(names: list[str]) -> list[str]:
    out: list[str] = []
    for name in names:
        out += list(CORRUPTIONS) if name == "all" else list(HELDOUT_CORRUPTIONS) if name == "heldout" else [name]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_adapter_flags(p)
    p.set_defaults(adapter="detector")
    p.add_argument("--dataset", default="data/demo")
    p.add_argument("--corruptions", nargs="+", default=["heldout"], help="names, 'heldout' or 'all' (the 15 tests)")
    p.add_argument("--severity", type=int, default=5)
    p.add_argument("--images", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--method", action="append", default=[], help="LABEL=METHOD,field=value,... (repeatable)")
    p.add_argument("--draws", type=int, default=1000, help="bootstrap resamples")
    p.add_argument("--output", default=None, help="results JSON")
    p.add_argument("--device", default="cpu")
    p.add_argument("--workers", type=int, default=0)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    adapter = adapter_from_args(args)
    methods = [parse_method(spec) for spec in args.method]
    configs = {label: TTTConfig(enabled=True, batch_size=args.batch_size, **{**ONLINE, **fields})
               for label, fields in methods}
    rows: dict[str, dict[str, Any]] = {}
    matches: dict[str, dict[str, Any]] = {}
    for corruption in _corruptions(args.corruptions):
        split = f"val-{corruption}-{args.severity}"
        records = build_manifest(args.dataset, split)[: args.images]
        started = time.perf_counter()
        found = {"bn": image_matches(Predictor(adapter).predict(records, bn="batch", batch_size=args.batch_size),
                                     records)}
        for label, config in configs.items():
            predictions, _ = adapt_and_predict(adapter, records, config, batch_size=args.batch_size)
            found[label] = image_matches(predictions, records)
        ones = np.ones((1, len(records)))
        row = {"images": len(records), "updates": -(-len(records) // args.batch_size),
               **{label: float(weighted_map50(m, ones)[0]) for label, m in found.items()}}
        for label in configs:
            gain = paired_interval([map50_gain(found["bn"], found[label])], [len(records)], draws=args.draws)
            row[f"{label}_gain"] = gain._asdict()
        rows[corruption], matches[corruption] = row, found
        gains = "  ".join(f"{label} {100 * row[f'{label}_gain']['value']:+.1f} "
                          f"[{100 * row[f'{label}_gain']['low']:+.1f}, {100 * row[f'{label}_gain']['high']:+.1f}]"
                          for label in configs)
        print(f"{corruption:18s} bn {100 * row['bn']:.1f}  {gains}  ({time.perf_counter() - started:.0f}s)",
              flush=True)
        _write(args, argv, methods, rows, None)  # a partial file after each corruption
    mean = {}
    for label in configs:
        stats = [map50_gain(found["bn"], found[label]) for found in matches.values()]
        mean[label] = paired_interval(stats, [r["images"] for r in rows.values()], draws=args.draws)._asdict()
    print("mean over corruptions: " + "  ".join(
        f"{label} {100 * g['value']:+.1f} [{100 * g['low']:+.1f}, {100 * g['high']:+.1f}]" for label, g in mean.items()
    ))
    _write(args, argv, methods, rows, mean)
    return 0


def _write(args: argparse.Namespace, argv: list[str] | None, methods: list, rows: dict, mean: dict | None) -> None:
    """The results so far to ``--output`` (``mean_gain`` None until every corruption is done)."""
    if not args.output:
        return
    result = {"argv": sys.argv[1:] if argv is None else argv, "dataset": args.dataset, "severity": args.severity,
              "batch_size": args.batch_size, "methods": dict(methods), "rows": rows, "mean_gain": mean}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
