"""Fault-injection runner for tests/test_kill_points.py: exports killed with SIGKILL at named kill points.

    python tests/kill_runner.py PLAN.json  ->  prints a JSON list of runs

The plan names scenarios (export arguments whose output paths are relative, and the previous output files).
The runner imports the export once, warms it up, then forks one child per run, so that each run costs a fork
rather than a Python start: a census child per scenario (``YOLOZU_KILL_AT=count``) lists the kill points the
scenario passes; then, for every point and occurrence (a seeded sample when there are more than
``max_points``), a child runs the export in a fresh copy of the previous outputs with ``YOLOZU_KILL_AT=name:n``;
and a control child per scenario runs it without a kill. The test judges the folders the runs leave.

torch runs on one thread here: a fork is only safe before a thread pool exists.
"""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)

from yolozu.cli.export import main as export  # noqa: E402
from yolozu.runtime import faults  # noqa: E402


def _prepare(folder: Path, previous: dict[str, str]) -> None:
    folder.mkdir(parents=True)
    for name, text in previous.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)


def _child(folder: Path, argv: list[str], kill: str, census: Path | None) -> int:
    """Run the export in ``folder`` in a forked child; returns the wait status."""
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 99
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            os.chdir(folder)
            os.environ[faults.ENV] = kill
            code = export(argv)
            if census is not None:
                census.write_text(json.dumps(faults.reached()))
        finally:
            os._exit(code)
    return os.waitpid(pid, 0)[1]


def _outcome(status: int) -> dict:
    if os.WIFSIGNALED(status):
        return {"signal": os.WTERMSIG(status), "exit": None}
    return {"signal": None, "exit": os.WEXITSTATUS(status)}


def _points(work: Path, name: str, scenario: dict) -> list[tuple[str, int]]:
    folder, census = work / f"census-{name}", work / f"census-{name}.json"
    _prepare(folder, scenario["previous"])
    status = _child(folder, scenario["argv"], "count", census)
    if _outcome(status)["exit"] != 0:
        raise SystemExit(f"the census run of {name} failed: {_outcome(status)}")
    return [(point, n) for point, count in sorted(json.loads(census.read_text()).items()) for n in range(1, count + 1)]


def run(plan: dict) -> dict:
    work = Path(plan["work"])
    warm = work / "warm-up"
    first = next(iter(plan["scenarios"].values()))
    _prepare(warm, first["previous"])
    os.chdir(warm)
    export(first["argv"])
    points = {name: _points(work, name, s) for name, s in plan["scenarios"].items()}
    kills = [(name, point, n) for name in points for point, n in points[name]]
    if len(kills) > plan["max_points"]:
        kills = sorted(random.Random(plan["seed"]).sample(kills, plan["max_points"]))
    runs = []
    for name, point, n in kills:
        folder = work / f"{name}-{point}-{n}"
        _prepare(folder, plan["scenarios"][name]["previous"])
        status = _child(folder, plan["scenarios"][name]["argv"], f"{point}:{n}", None)
        runs.append({"scenario": name, "kill": f"{point}:{n}", "dir": str(folder), **_outcome(status)})
    for name, scenario in plan["scenarios"].items():
        folder = work / f"{name}-control"
        _prepare(folder, scenario["previous"])
        status = _child(folder, scenario["argv"], "", None)
        runs.append({"scenario": name, "kill": None, "dir": str(folder), **_outcome(status)})
    return {"points": {name: [f"{p}:{n}" for p, n in pts] for name, pts in points.items()}, "runs": runs}


if __name__ == "__main__":
    print(json.dumps(run(json.loads(Path(sys.argv[1]).read_text()))))
