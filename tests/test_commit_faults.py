"""Fault injection in the commit of several outputs (predictions + TTT log) and Ctrl-C at any moment: a rename that
fails or an interrupt during the renames leaves every old output byte-identical, removes the folders the commit
created and leaves no hidden file; Ctrl-C from the first instant of the command is one line, "interrupted", exit
130, even when some code swallowed the KeyboardInterrupt. Faults come from ``YOLOZU_FAULT_AT``
(``yolozu.runtime.faults``): each at an exact, repeatable moment."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from yolozu.cli import main as cli
from yolozu.io.commit import write_outputs
from yolozu.runtime import faults

ROOT = Path(__file__).resolve().parents[1]
PREVIOUS = {"p.json": b'["the previous predictions"]\n', "logs/ttt.json": b'{"the previous": "log"}\n'}


@pytest.fixture()
def dataset(tmp_path) -> Path:
    root = tmp_path / "ds"
    (root / "images" / "val").mkdir(parents=True)
    (root / "labels" / "val").mkdir(parents=True)
    for i in range(2):
        pixels = np.random.default_rng(i).integers(0, 255, (16, 16, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "images" / "val" / f"{i}.png")
    return root


@pytest.fixture()
def fault(monkeypatch):
    def arm(spec: str) -> None:
        monkeypatch.setenv(faults.FAULT_ENV, spec)
        faults.reset_faults()

    yield arm
    faults.reset_faults()


def _tree(folder: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


def _previous(work: Path) -> dict[str, bytes | None]:
    for name, data in PREVIOUS.items():
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        (work / name).write_bytes(data)
    return _tree(work)


def _export(capsys, dataset: Path, work: Path, log: str = "logs/ttt.json") -> tuple[int, list[str]]:
    code = cli(["export", "--adapter", "detector", "--dataset", str(dataset), "--split", "val", "--quiet",
                "--workers", "0", "--output", str(work / "p.json"), "--ttt", "--ttt-lr", "1e-3",
                "--ttt-log-out", str(work / log)])
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("nth", [1, 2])
def test_a_rename_that_fails_leaves_every_old_output(tmp_path, dataset, capsys, fault, nth):
    work = tmp_path / "work"
    before = _previous(work)
    fault(f"output-rename:{nth}")
    code, err = _export(capsys, dataset, work)
    assert code == 1 and len(err) == 1 and "Invalid cross-device link" in err[0]
    assert ".tmp" not in err[0]  # the error names the output, not a hidden temporary file
    assert _tree(work) == before


@pytest.mark.parametrize("nth", [1, 2])
def test_ctrl_c_during_the_renames_leaves_every_old_output(tmp_path, dataset, capsys, fault, nth):
    work = tmp_path / "work"
    before = _previous(work)
    fault(f"output-rename:{nth}:sigint")
    code, err = _export(capsys, dataset, work)
    assert code == 130 and err == ["interrupted"]
    assert _tree(work) == before


def test_a_failed_commit_removes_the_folders_it_created(tmp_path, dataset, capsys, fault):
    work = tmp_path / "work"
    before = _previous(work)
    fault("output-rename:2")
    code, _ = _export(capsys, dataset, work, log="new/deeper/ttt.json")
    assert code == 1 and _tree(work) == before  # no new/ nor new/deeper/ left


def test_the_same_commit_without_a_fault_replaces_both(tmp_path, dataset, capsys):
    work = tmp_path / "work"
    _previous(work)
    code, _ = _export(capsys, dataset, work)
    assert code == 0
    assert all((work / name).read_bytes() != data for name, data in PREVIOUS.items())


def test_write_outputs_restores_a_new_output_by_removing_it(tmp_path, fault):
    (tmp_path / "old.json").write_bytes(b"old\n")
    fault("output-rename:2")
    with pytest.raises(OSError, match="cannot replace"):
        write_outputs([(tmp_path / "fresh.json", [1], None), (tmp_path / "old.json", [2], None)])
    assert _tree(tmp_path) == {"old.json": b"old\n"}


def test_an_interrupt_some_code_swallowed_still_ends_the_run(tmp_path, dataset, capsys):
    out = tmp_path / "p.json"
    out.write_bytes(PREVIOUS["p.json"])
    code = cli(["export", "--adapter", "hostile_plugins:swallows_ctrl_c", "--dataset", str(dataset), "--split", "val",
                "--quiet", "--output", str(out)])
    assert code == 130 and capsys.readouterr().err.strip().splitlines() == ["interrupted"]
    assert out.read_bytes() == PREVIOUS["p.json"]


def test_ctrl_c_at_the_first_instant_of_the_command_is_one_line(tmp_path, dataset):
    out = tmp_path / "p.json"
    out.write_bytes(PREVIOUS["p.json"])
    env = {**os.environ, faults.FAULT_ENV: "cli-start:1:sigint", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", "import sys; from yolozu.cli import main; sys.exit(main())", "export",
         "--dataset", str(dataset), "--output", str(out)],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert done.returncode == 130 and done.stderr == "interrupted\n"
    assert out.read_bytes() == PREVIOUS["p.json"]
