#!/usr/bin/env python
"""Benchmark of the export on 1 process against ``torchrun --nproc_per_node 2`` (gloo, CPU), side by side.

For each mode it runs the same export command in one process with torch's default threads (one per core), in
one process with one thread, and under torchrun with two ranks of one thread each (torchrun's default),
interleaved round by round, and prints the wall time of the whole command (process start included) and the
adaptation's own time (``meta.ttt.report.seconds``, the slowest rank's), best of the rounds. Modes: ``predict``
(no TTT), ``episodic`` (Tent, reset sample), ``online-none`` (Tent online, independent streams) and
``online-grads`` (Tent online, one shared model).

    python tools/bench_distributed.py [--images 32] [--rounds 1] [--dataset data/demo --split val-fog-5]

Without ``--dataset`` it writes ``--images`` synthetic demo images to a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from yolozu.tta.preset_table import GUARDS  # noqa: E402

TENT = ["--ttt", "--ttt-method", "tent", "--ttt-max-batches", "none", "--ttt-lr", "1e-3"]
TENT += [flag for guard in GUARDS for flag in ("--ttt-" + guard.replace("_", "-"), "none")]  # unguarded, as measured
MODES = {
    "predict": [],
    "episodic": [*TENT, "--ttt-reset", "sample"],
    "online-none": [*TENT, "--ttt-schedule", "online", "--ttt-batch-size", "8", "--ttt-dist-sync", "none"],
    "online-grads": [*TENT, "--ttt-schedule", "online", "--ttt-batch-size", "8", "--ttt-dist-sync", "grads"],
}
"""Per rank: online batches of 8 (a global batch of 16 for grads on two ranks, 8 for one process)."""


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


RUNS = ("1 process", "1 process, 1 thread", "2 ranks")


def _run(command: list[str], output: Path, threads: str | None) -> tuple[float, float | None]:
    """Wall seconds of ``command`` and the TTT seconds it reports."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("OMP_NUM_THREADS", None)
    env.update({"OMP_NUM_THREADS": threads} if threads else {})
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(command)}\n{done.stderr[-2000:]}")
    report = json.loads(output.read_text())["meta"]["ttt"]["report"]
    return wall, report["seconds"] if report else None


def _commands(export: list[str], output: Path) -> dict[str, tuple[list[str], str | None]]:
    """Each run's command and its OMP_NUM_THREADS (None: torch's default; torchrun sets 1 per rank itself)."""
    script = str(ROOT / "tools" / "export_predictions.py")
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    single = [sys.executable, script, *export, "--output", str(output)]
    ranks = [*launch, "--master_port", str(_port()), script, *export, "--output", str(output)]
    return dict(zip(RUNS, [(single, None), (single, "1"), (ranks, None)]))


def _dataset(args: argparse.Namespace, folder: Path) -> tuple[str, str]:
    if args.dataset:
        return args.dataset, args.split
    from yolozu.demo.synth import SynthSpec, write_split

    write_split(folder / "data", "val", args.images, seed=0, spec=SynthSpec(image_size=160))
    return str(folder / "data"), "val"


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", help="a YOLO-layout dataset (default: synthetic images in a temporary folder)")
    parser.add_argument("--split", default="val-fog-5")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--modes", nargs="+", choices=sorted(MODES), default=list(MODES))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        dataset, split = _dataset(args, folder)
        base = ["--adapter", "detector", "--dataset", dataset, "--split", split, "--max-images", str(args.images)]
        best: dict[tuple[str, str], tuple[float, float | None]] = {}
        for _ in range(args.rounds):
            for mode in args.modes:
                output = folder / f"{mode}.json"
                for run, (command, threads) in _commands([*base, "--quiet", "--wrap", *MODES[mode]], output).items():
                    wall, ttt = _run(command, output, threads)
                    old_wall, old_ttt = best.get((mode, run), (wall, ttt))
                    best[(mode, run)] = (min(wall, old_wall), None if ttt is None else min(ttt, old_ttt))
    _table(args, best)
    return 0


def _table(args: argparse.Namespace, best: dict[tuple[str, str], tuple[float, float | None]]) -> None:
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"{args.images} images, {os.cpu_count()} CPU cores (load average at the end {load}), best of {args.rounds} "
          "round(s); seconds: wall of the command (TTT: adapt and predict, the slowest rank)")
    print("| mode | " + " | ".join(RUNS) + " | 2 ranks vs 1 process |")
    print("|---|" + "---|" * (len(RUNS) + 1))
    for mode in args.modes:
        cells = [f"{best[(mode, run)][0]:.1f} ({_fmt(best[(mode, run)][1])})" for run in RUNS]
        ratio = best[(mode, RUNS[0])][0] / best[(mode, RUNS[2])][0]
        print(f"| {mode} | " + " | ".join(cells) + f" | {ratio:.2f}x |")


if __name__ == "__main__":
    sys.exit(main())
