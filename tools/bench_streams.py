"""Benchmark of episodic (``--ttt-reset sample``) export: the one-image loop against K vmapped streams.

For the committed detector on N images of a corrupted split it measures, in one run:
  - images per second of the whole episodic export (adapt each image from the source, then predict it) for
    the loop (K=1) and K = 4, 8, 16 streams, interleaved round by round, best of the rounds;
  - the peak memory of adapting and predicting one chunk of K images, against K times one image's peak
    (target: at most 1.5x), for the streams path (vmapped forward, autograd outside the transform) and for the
    fully transformed path (``vmap`` over a ``torch.func.grad`` step), which shows where memory goes.

    python tools/bench_streams.py [--images 32] [--method tent] [--device cpu]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from typing import Iterator

import torch

from yolozu.adapters.detector import DetectorAdapter
from yolozu.data import build_manifest
from yolozu.demo.bench.memory import peak_bytes, sync
from yolozu.functional import rng, streams
from yolozu.functional.readout import readout_of
from yolozu.functional.step import make_update
from yolozu.tta.config import TTTConfig
from yolozu.tta.engine import Adaptation
from yolozu.tta.schedules import adapt_and_predict


@contextlib.contextmanager
def full_float32(device: str) -> Iterator[None]:
    """CUDA convolutions and matrix products in full float32 for the duration: with TF32 (cuDNN's default on
    Ampere and later) the batched convolutions of K streams and the loop's round differently, by up to 3e-3 in
    a score (seen on an H200); in float32 they differ only by summation order."""
    if device == "cpu":
        yield
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="data/demo")
    parser.add_argument("--split", default="val-fog-5")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--streams", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--method", default="tent", choices=("tent", "mim", "cotta"))
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)

    records = build_manifest(args.dataset, args.split)[: args.images]
    adapter = DetectorAdapter(device=args.device)
    base = TTTConfig(
        enabled=True,
        method=args.method,
        reset="sample",
        steps=args.steps,
        lr=1e-3,
        update_filter="lora_norm_only",
        mim_patch_size=16,
        max_batches=None,
        seed=0,
    )
    ks = [1] + args.streams
    print(
        f"# bench-streams: episodic {args.method} export of {len(records)} images of {args.split}, "
        f"{args.steps} step(s) each, device {args.device}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, best of {args.rounds} rounds"
    )

    reference = None
    tolerance = 1e-4 if args.device == "cpu" else 1e-3
    for k in ks:  # warm-up, and the vmapped predictions must equal the loop's
        with full_float32(args.device):
            preds, _ = adapt_and_predict(adapter, records, base.replace(streams=k))
        reference = reference or preds
        worst = max(
            (
                abs(a["score"] - b["score"])
                for p, q in zip(reference, preds)
                for a, b in zip(p["detections"], q["detections"])
            ),
            default=0.0,
        )
        assert worst < tolerance, f"K={k} predictions differ from the loop by {worst}"
    seconds = {k: [] for k in ks}
    for _ in range(args.rounds):
        for k in ks:
            sync(args.device)
            start = time.perf_counter()
            adapt_and_predict(adapter, records, base.replace(streams=k))
            sync(args.device)
            seconds[k].append(time.perf_counter() - start)
    best = {k: min(v) for k, v in seconds.items()}

    adaptation = Adaptation(adapter.get_model(), base, readout_of(adapter))
    x = adapter.load_batch(records[: max(ks)])
    def one_image() -> None:  # the loop's unit of work: one image adapted from the source
        adaptation.restart()
        adaptation.adapt(x[:1], 0, args.steps)

    single = peak_bytes(one_image, args.device)
    naive_step = streams.vmap_step(make_update(adaptation.method, differentiate="func"))
    rows = []
    print(f"{'K':>3} {'images/s':>9} {'vs loop':>8} {'peak MB':>9} {'peak/(K x one)':>15} {'func.grad path':>15}")
    for k in ks:
        lean = peak_bytes(lambda k=k: adaptation.adapt_episodes(x[:k, None], range(k), args.steps), args.device)
        keys = [rng.step_key(adaptation.root, i, 0) for i in range(k)]
        inputs = streams.draw(adaptation.method, keys, adaptation.source.source, x[:k, None])
        stacked = streams.replicate(adaptation.source, k)
        naive = peak_bytes(lambda k=k, s=stacked, n=inputs: naive_step(s, x[:k, None], n), args.device)
        row = {
            "streams": k,
            "images_per_second": len(records) / best[k],
            "speedup": best[1] / best[k],
            "peak_bytes": lean,
            "peak_over_k_single": lean / (k * single),
            "func_grad_peak_over_k_single": naive / (k * single),
        }
        rows.append(row)
        print(
            f"{k:>3} {row['images_per_second']:>9.1f} {row['speedup']:>7.2f}x {lean / 1e6:>9.1f} "
            f"{row['peak_over_k_single']:>15.2f} {row['func_grad_peak_over_k_single']:>15.2f}"
        )
    print(f"one image's adaptation peak (the loop): {single / 1e6:.1f} MB")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                {
                    "device": args.device,
                    "images": len(records),
                    "method": args.method,
                    "rows": rows,
                    "single_peak_bytes": single,
                },
                fh,
                indent=2,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
