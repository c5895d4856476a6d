"""``tools/source_stats.py``: the source statistics feature alignment needs, computed once from the training split.

Runs the adapter's model over the split's images in the BatchNorm mode used at test time (``--bn-mode``; with
batch statistics the features depend on the batch, so ``--batch-size`` should be the test batch), reads the layers
the adapter names (``Readout.layers``) or ``--layers``, and saves their statistics (``functional.feature_stats``,
``io.feature_stats``) beside the checkpoint, ``name.align.pt`` with the sidecar ``name.align.json`` (layers,
BatchNorm mode, data, count, command), where the adapter finds them.

    python tools/source_stats.py --adapter detector --dataset data/demo --split train --images 2000
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Sequence

from yolozu.adapters.detector import DetectorAdapter
from yolozu.bridge import make_apply
from yolozu.cli.adapter_flags import AdapterUsageError, adapter_from_args, add_adapter_flags
from yolozu.data import build_manifest
from yolozu.functional.feature_stats import compute_stats, per_channel
from yolozu.functional.readout import readout_of
from yolozu.functional.state import extract
from yolozu.functional.step import BN_MODES
from yolozu.io.feature_stats import save_stats, stats_path_for
from yolozu.models.checkpoint import DEFAULT_CHECKPOINT


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_adapter_flags(p)
    p.set_defaults(adapter="detector")
    p.add_argument("--dataset", default="data/demo", help="dataset root (default data/demo)")
    p.add_argument("--split", default="train", help="the source split (default train)")
    p.add_argument("--images", type=int, default=None, help="the first N images of the split (default all)")
    p.add_argument("--batch-size", type=int, default=8, help="images per forward; the test batch (default 8)")
    p.add_argument("--bn-mode", default="batch", choices=BN_MODES, help="BatchNorm as at test time (default batch)")
    p.add_argument("--layers", nargs="+", default=None, help="layers (default: the ones the adapter names)")
    p.add_argument("--per-channel", action="store_true",
                   help="store per-channel moments only (smaller; then align cannot use --ttt-align-per-location)")
    p.add_argument("--output", default=None, help="statistics file (default: NAME.align.pt beside the checkpoint)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--workers", type=int, default=0)
    return p


def _output(args: argparse.Namespace) -> Path:
    if args.output:
        return Path(args.output)
    if args.checkpoint:
        return stats_path_for(args.checkpoint)
    if args.adapter == "detector":
        return stats_path_for(DEFAULT_CHECKPOINT)
    raise AdapterUsageError("--output is needed: this adapter's checkpoint is not given (--checkpoint)")


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.images is not None and args.images < 1:
            raise ValueError(f"--images must be at least 1, got {args.images}")
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
        output = _output(args)
        adapter = adapter_from_args(args)
        layers = tuple(args.layers or readout_of(adapter).layers)
        if not layers:
            raise ValueError("this adapter names no layers to align; give --layers")
        records = build_manifest(args.dataset, args.split)[: args.images]
        model = adapter.get_model()
        params, buffers = extract(model)
        batches = adapter.build_loader(records, batch_size=args.batch_size)
        stats, count = compute_stats(make_apply(model), params, buffers, batches, layers, bn_mode=args.bn_mode)
        if args.per_channel:
            stats = {name: s._replace(**dict(zip(("mean", "var"), per_channel(s.mean, s.var))))
                     for name, s in stats.items()}
    except (ValueError, KeyError, OSError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"source_stats: {message}", file=sys.stderr)
        return 2
    made = Path(args.dataset) / "demo.json"  # how the demo data maker made the split, when it did
    data = {"dataset": args.dataset, "split": args.split, **({"made_with": json.loads(made.read_text())}
                                                             if made.is_file() else {})}
    checkpoint = args.checkpoint or (str(DEFAULT_CHECKPOINT) if isinstance(adapter, DetectorAdapter) else None)
    meta = {
        "adapter": args.adapter, "checkpoint": checkpoint and Path(checkpoint).name, "bn_mode": args.bn_mode,
        "batch_size": args.batch_size, "per_channel": args.per_channel, "data": data, "count": count,
        "command": "python tools/source_stats.py " + shlex.join(sys.argv[1:] if argv is None else list(argv)),
    }
    save_stats(output, stats, meta)
    print(f"source_stats: {count} images, layers {', '.join(layers)} -> {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
