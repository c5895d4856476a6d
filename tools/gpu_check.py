#!/usr/bin/env python
"""One GPU check (``make gpu-check``): CUDA tests, a two-run determinism check, bench-core (both models, with
the targets of docs/gpu.md), the export's throughput (and a profile of it), bench-streams and the quick shift
benchmark on CUDA; writes runs/gpu/summary.md and summary.json with the card, torch and CUDA versions.

Sized to finish within about 6 minutes on one H100: the CUDA tests run while the data is made, then the
untimed steps (the exports compared for determinism, the shift benchmark) side by side, then each timed
benchmark alone. A group that would start after ``--budget`` seconds is skipped (and says so), and the summary
is rewritten after every step, so that it is always there.

Without CUDA it says so and runs the same steps on CPU on a few images (a dry run of the script); the exit
code is 0 when every step passed and both determinism checks found identical runs.

    python tools/gpu_check.py [--out runs/gpu] [--shift-images 30] [--budget 300]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import torch

from yolozu.demo.bench.recipes import BENCHMARKED
from yolozu.demo.corruptions import CORRUPTIONS
from yolozu.tta.preset_table import GUARDS

ROOT = Path(__file__).resolve().parents[1]
SPLIT = "val-fog-5"
STEP_TIMEOUT = 240


def _has_torchvision() -> bool:
    try:
        import torchvision  # noqa: F401
    except ImportError:
        return False
    return True


def steps(device: str, out: Path, shift_images: int) -> list[list[tuple[str, list[str]]]]:
    """The (name, command) of every step in groups: the steps of a group run side by side (none of them is
    timed); the timed benchmarks each form a group of one, so nothing else runs beside them. On CPU the same
    steps on a few images."""
    py = sys.executable
    dry = device == "cpu"
    core = ["--rounds", "1", "--batches", "1", "--image-size", "32", "--width", "8"] if dry else ["--rounds", "15"]
    r50 = ["--rounds", "1", "--batches", "1", "--image-size", "64", "--streams-batches", "1"] if dry else [
        "--rounds", "10", "--image-size", "224", "--streams-batches", "1", "8"]
    export = [py, "tools/export_predictions.py", "--adapter", "detector", "--dataset", "data/demo", "--split"]
    export += [SPLIT, "--device", device, "--wrap", "--quiet", "--seed", "0", *(["--max-images", "8"] if dry else [])]
    tent = ["--ttt", "--ttt-method", "tent", "--ttt-lr", "3e-3", "--ttt-update-filter", "norm_only"]
    tent += [flag for guard in GUARDS for flag in ("--ttt-" + guard.replace("_", "-"), "none")]  # unguarded
    tent += ["--ttt-max-batches", "none"]
    schedules = {"online": ["--ttt-schedule", "online"], "sample": ["--ttt-reset", "sample", "--ttt-streams", "8"]}
    side_by_side = [(f"determinism {schedule} {run}", [*export, *tent, *flags, "--output",
                                                        str(out / f"det_{schedule}_{run}.json")])
                    for run in ("a", "b") for schedule, flags in schedules.items()]
    side_by_side.append(("shift benchmark", [
        py, "-m", "yolozu.demo.bench.shift", "--quick", "--device", device, "--docs", "", "--images",
        str(4 if dry else shift_images), "--memory-images", "4" if dry else "32", "--recipes", *BENCHMARKED,
        "--output", str(out / "shift.json")]))  # every recipe: every schedule on CUDA
    timed = []
    if _has_torchvision():
        timed.append(("bench-core resnet50", [py, "tools/bench_core.py", "--device", device, "--model", "resnet50",
                                              *r50, "--json", str(out / "bench_core_resnet50.json")]))
    timed += [
        ("bench-core resnet18", [py, "tools/bench_core.py", "--device", device, *core,
                                 "--json", str(out / "bench_core_resnet18.json")]),
        ("bench-export", [py, "tools/bench_export.py", "--device", device, "--split", "val-fog-5" if dry else "train",
                          "--max-images", "8" if dry else "1000", "--json", str(out / "bench_export.json")]),
        ("bench-streams", [py, "tools/bench_streams.py", "--device", device, "--split", SPLIT,
                           *(["--images", "4", "--streams", "2", "--rounds", "1"] if dry else []),
                           "--json", str(out / "bench_streams.json")]),
        ("profile export", [py, "-m", "cProfile", "-s", "tottime", *export[1:7], "train" if not dry else SPLIT,
                            "--device", device, "--quiet", "--max-images", "8" if dry else "1000",
                            "--output", str(out / "profiled.json")]),
    ]
    return [side_by_side, *([step] for step in timed)]


CUDA_TESTS = ("cuda tests", [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider"])
"""Run while the demo data is made (they need none of it)."""


def make_data(env: dict) -> None:
    """The demo splits the steps read: train and val, then the 15 corruptions of val at severity 5 in parallel."""
    base = [sys.executable, "tools/make_demo_data.py", "--root", "data/demo", "--severities", "5"]
    subprocess.run([*base, "--corruptions", "none"], cwd=ROOT, env=env, check=True)
    jobs = [subprocess.Popen([*base, "--skip-clean", "--corruptions", name], cwd=ROOT, env=env)
            for name in CORRUPTIONS]
    failed = [name for name, job in zip(CORRUPTIONS, jobs) if job.wait() != 0]
    if failed:
        raise SystemExit(f"gpu-check: making the demo data failed for {', '.join(failed)}")


def _same_run(out: Path, schedule: str) -> bool:
    """Two seeded exports agree bitwise: predictions and report, the report's wall-clock seconds aside."""
    docs = [json.loads((out / f"det_{schedule}_{run}.json").read_text()) for run in ("a", "b")]
    reports = [{**d["meta"]["ttt"]["report"], "seconds": None} for d in docs]
    return docs[0]["predictions"] == docs[1]["predictions"] and reports[0] == reports[1]


def _figures(out: Path) -> dict:
    """The benchmark figures the steps wrote, as far as they got."""
    figures = {}
    for name in ("bench_core_resnet18", "bench_core_resnet50", "bench_export", "bench_streams", "shift"):
        path = out / f"{name}.json"
        if path.is_file():
            figures[name] = json.loads(path.read_text())
    return figures


def markdown(summary: dict) -> str:
    lines = [f"# GPU check ({summary['mode']})", "", f"{summary['date']}: {summary['device_name']}, torch "
             f"{summary['torch']}, CUDA {summary['cuda']}, Python {summary['python']}; "
             f"{summary['seconds']:.0f} s in all", "",
             "| step | status | seconds |", "|---|---|---|"]
    lines += [f"| {s['name']} | {s['status']} | {s['seconds']:.1f} |" for s in summary["steps"]]
    lines += ["", "Determinism (two seeded runs, bitwise): " + ", ".join(
        f"{k} {'identical' if v else 'DIFFERENT'}" for k, v in summary["determinism"].items())]
    for key in ("bench_core_resnet18", "bench_core_resnet50"):
        core = summary["figures"].get(key)
        if not core:
            continue
        lines += ["", f"{key} (ms per step; ratios; peak memory over classic; dispatched ops per step):", "",
                  "| batch | bare | classic | functional | captured | graph alone | func/bare | capt/classic | "
                  "graph/classic | func/classic | func mem | capt mem | ops bare/classic/func/capt |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in core["rows"]:
            t, o = r["seconds"], r["ops"]
            lines.append(f"| {r['batch']} | {1e3 * t['bare']:.2f} | {1e3 * t['classic']:.2f} | "
                         f"{1e3 * t['functional']:.2f} | {1e3 * t['captured']:.2f} | {1e3 * t['graph']:.2f} | "
                         f"{r['functional_over_bare']:.3f} | {r['captured_over_classic']:.3f} | "
                         f"{r['graph_over_classic']:.3f} | {r['functional_over_classic']:.3f} | "
                         f"{r['functional_over_classic_memory']:.3f} | {r['captured_over_classic_memory']:.3f} | "
                         f"{o['bare']}/{o['classic']}/{o['functional']}/{o['captured']} |")
        lines += [f"- K=8 streams, batch {r['batch']}: vmap {r['vmap_speedup']:.2f}x the loop, captured "
                  f"{r['captured_vmap_speedup']:.2f}x; memory 8 streams / 8 x one {r['vmap8_over_8x_one_memory']:.2f}"
                  for r in core["streams"]]
        lines += [f"- target {t['target']}: {t['value']:.3f} (bound {t['bound']}): {'met' if t['met'] else 'NOT met'}"
                  + (f" (the graph alone: {t['floor']:.3f})" if "floor" in t else "") for t in core["targets"]]
    throughput = summary["figures"].get("bench_export")
    if throughput:
        lines += ["", f"Export throughput ({throughput['split']}, {throughput['images']} images):"]
        lines += [f"- {name}: {r['images_per_second']:.0f} img/s ({r['over_none']:.2f}x of none)"
                  for name, r in throughput["rows"].items()]
    return "\n".join(lines) + "\n"


def run_step(name: str, command: list[str], out: Path, env: dict) -> dict:
    """Run one step with a time limit; its whole output goes to a log beside the summary."""
    start = time.perf_counter()
    try:
        result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=STEP_TIMEOUT)
        status = "passed" if result.returncode == 0 else f"FAILED (exit {result.returncode})"
        text = result.stdout + result.stderr
    except subprocess.TimeoutExpired as expired:
        status = f"TIMED OUT ({STEP_TIMEOUT} s)"
        text = "".join(x.decode() if isinstance(x, bytes) else x or "" for x in (expired.stdout, expired.stderr))
    seconds = time.perf_counter() - start
    (out / f"{name.replace(' ', '_')}.log").write_text(text)
    print(f"gpu-check: {name}: {status} in {seconds:.1f} s", file=sys.stderr, flush=True)
    return {"name": name, "status": status, "seconds": seconds, "tail": text[-2000:]}


def write_summary(out: Path, cuda: bool, done: list[dict], started: float) -> list[str]:
    """summary.json and summary.md as far as the steps got (rewritten after every step, so that a run stopped
    from outside still leaves one); returns the names of what failed."""
    determinism = {s: _same_run(out, s) for s in ("online", "sample")
                   if all((out / f"det_{s}_{r}.json").is_file() for r in ("a", "b"))}
    summary = {
        "mode": "cuda" if cuda else "cpu dry run",
        "date": time.strftime("%Y-%m-%d"),
        "device_name": torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "seconds": time.perf_counter() - started,
        "steps": done,
        "determinism": determinism,
        "figures": _figures(out),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "summary.md").write_text(markdown(summary))
    return [s["name"] for s in done if s["status"] != "passed"] + [k for k, v in determinism.items() if not v]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/gpu")
    parser.add_argument("--shift-images", type=int, default=30, help="images per split of the shift benchmark")
    parser.add_argument("--budget", type=float, default=300.0, help="seconds after which no step starts (300)")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    if not cuda:
        print("gpu-check: no CUDA device here; a CPU dry run of the same steps on a few images", file=sys.stderr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    started = time.perf_counter()
    done: list[dict] = []
    with ThreadPoolExecutor(max_workers=1) as beside:
        tests = beside.submit(run_step, *CUDA_TESTS, out, env)
        make_data(env)
        done.append(tests.result())
    failed = write_summary(out, cuda, done, started)
    for group in steps(device, out, args.shift_images):
        spent = time.perf_counter() - started
        if spent > args.budget:
            for name, _ in group:
                done.append({"name": name, "status": "skipped (out of time)", "seconds": 0.0, "tail": ""})
                print(f"gpu-check: {name}: skipped, {spent:.0f} s spent", file=sys.stderr)
            failed = write_summary(out, cuda, done, started)
            continue
        with ThreadPoolExecutor(max_workers=len(group) if cuda else 1) as pool:  # 2 CPU cores: one at a time
            for finished in as_completed([pool.submit(run_step, name, command, out, env) for name, command in group]):
                done.append(finished.result())
                failed = write_summary(out, cuda, done, started)
    print(f"gpu-check: {time.perf_counter() - started:.0f} s in all", file=sys.stderr)
    print(f"gpu-check: wrote {out / 'summary.md'} and summary.json", file=sys.stderr)
    if failed:
        print(f"gpu-check: failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
