"""Fault injection: an export killed with SIGKILL at any of its kill points (every adapted batch, every predicted
batch, every output file written and synced, the commit) leaves the previous predictions and logs byte-identical,
creates no folder and leaves no temporary file. The kill points are named and counted (``yolozu.runtime.faults``), so
each run dies at an exact moment: no timing is involved. The runner (tests/kill_runner.py) forks the runs from
one warmed-up process."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from yolozu.demo.synth import SynthSpec, write_split
from yolozu.io import commit

pytestmark = pytest.mark.skipif(
    not commit.ANONYMOUS, reason="needs anonymous temporary files (Linux O_TMPFILE and /proc/self/fd)"
)

HERE = Path(__file__).resolve().parent
PREVIOUS = {
    "p.json": '[{"image": "from the previous run", "detections": []}]\n',
    "logs/ttt.json": '{"output": "p.json", "ttt": "the previous run"}\n',
}


def _scenarios(dataset: Path) -> dict:
    common = ["--adapter", "detector", "--dataset", str(dataset), "--split", "val", "--output", "p.json", "--quiet",
              "--ttt", "--ttt-batch-size", "1", "--ttt-lr", "1e-3", "--ttt-log-out", "logs/ttt.json"]
    return {
        # adapt on every image, then predict them one by one; two outputs replaced
        "pre": {"argv": [*common, "--batch-size", "1"], "previous": PREVIOUS},
        # adapt and predict batch by batch with flip TTA; the TTA log goes to a folder that does not exist yet
        "online": {
            "argv": [*common, "--ttt-schedule", "online", "--tta", "--tta-log-out", "new/tta.json"],
            "previous": PREVIOUS,
        },
    }


def _tree(folder: Path) -> dict[str, bytes | None]:
    """Every file (its bytes) and folder (None) under ``folder``."""
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def killed(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("kills")
    write_split(root / "ds", "val", 4, seed=3, spec=SynthSpec(image_size=160))
    plan = {"work": str(root / "runs"), "scenarios": _scenarios(root / "ds"), "seed": 0, "max_points": 40}
    (root / "plan.json").write_text(json.dumps(plan))
    done = subprocess.run(
        [sys.executable, str(HERE / "kill_runner.py"), str(root / "plan.json")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def test_there_are_at_least_20_kill_points_across_adaptation_prediction_and_writing(killed):
    points = [p for pts in killed["points"].values() for p in pts]
    assert len(points) >= 20
    stages = {p.split(":")[0] for p in points}
    assert {"adapt", "predict", "adapt+predict", "output-written", "output-synced", "output-commit"} <= stages
    assert len([run for run in killed["runs"] if run["kill"]]) == len(points)


def test_every_killed_export_leaves_the_previous_outputs_exactly(killed):
    before = _tree_of_previous()
    kills = [run for run in killed["runs"] if run["kill"]]
    for run in kills:
        assert run["signal"] == signal.SIGKILL, run  # the kill point was reached: the export did not finish
        assert _tree(Path(run["dir"])) == before, run["kill"]


def test_the_same_export_without_a_kill_replaces_every_output(killed):
    controls = [run for run in killed["runs"] if run["kill"] is None]
    assert len(controls) == 2
    for run in controls:
        assert run["exit"] == 0, run
        tree = _tree(Path(run["dir"]))
        expected = {"p.json", "logs", "logs/ttt.json"}
        expected |= {"new", "new/tta.json"} if run["scenario"] == "online" else set()
        assert set(tree) == expected
        for name, previous in PREVIOUS.items():
            assert tree[name] != previous.encode(), name
        assert json.loads(tree["p.json"])[0]["image"].endswith(".png")


def _tree_of_previous() -> dict[str, bytes | None]:
    tree: dict[str, bytes | None] = {}
    for name, text in PREVIOUS.items():
        parts = Path(name).parts
        for i in range(1, len(parts)):
            tree[str(Path(*parts[:i]))] = None
        tree[name] = text.encode()
    return dict(sorted(tree.items()))
