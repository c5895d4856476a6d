"""Outputs are all written or none, never onto an input, a device, a FIFO or each other; failed runs leave every
file and folder as it was (yolozu.io.commit, and the export and eval commands that use it)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli_cases import OLD, blank_dataset
from yolozu.cli.eval import main as eval_main
from yolozu.cli.export import main as export_main
from yolozu.io import commit
from yolozu.io.commit import write_outputs
from yolozu.io.paths import OutputPathError, check_outputs

TTA_LOG = ("--adapter", "detector", "--tta", "--tta-log-out")
"""A run with a log (the detector predicts with flip TTA and logs its settings)."""


@pytest.fixture()
def dataset(tmp_path) -> Path:
    """Two blank images with one label each under ``tmp_path/ds`` (split val)."""
    return blank_dataset(tmp_path / "ds")


def _export(dataset: Path, output: Path | str, *extra: str) -> int:
    return export_main(["--dataset", str(dataset), "--split", "val", "--output", str(output), "--quiet", *extra])


def _unwritable_folder(tmp_path: Path) -> Path:
    """A folder that refuses new files: a read-only folder, or /proc for root (who ignores permissions)."""
    if os.geteuid() == 0:
        return Path("/proc")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    return locked


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------- all or none
def test_a_log_that_cannot_be_written_leaves_the_predictions_as_they_were(tmp_path, dataset, capsys):
    out = tmp_path / "p.json"
    out.write_bytes(OLD)
    log = _unwritable_folder(tmp_path) / "yolozu-tta-log.json"
    code = _export(dataset, out, *TTA_LOG, str(log))
    assert code != 0 and "error:" in capsys.readouterr().err
    assert out.read_bytes() == OLD
    assert not log.exists()


@pytest.fixture(params=["anonymous", "named"])
def temp_kind(request, monkeypatch) -> str:
    """Both kinds of temporary file: anonymous (Linux) and hidden named files (the fallback elsewhere)."""
    if request.param == "anonymous" and not commit.ANONYMOUS:
        pytest.skip("no anonymous temporary files here")
    monkeypatch.setattr(commit, "ANONYMOUS", request.param == "anonymous")
    return request.param


def test_write_outputs_replaces_and_creates_with_either_kind_of_temporary_file(tmp_path, temp_kind):
    old, new = tmp_path / "old.json", tmp_path / "a" / "b" / "new.json"
    old.write_bytes(OLD)
    write_outputs([(old, {"x": 1}, None), (new, [1, 2], 2)])
    assert old.read_bytes() == b'{"x": 1}\n' and json.loads(new.read_text()) == [1, 2]
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == ["a", "a/b", "a/b/new.json", "old.json"]


def test_write_outputs_is_all_or_none(tmp_path, monkeypatch, temp_kind):
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_bytes(OLD)
    real_fsync = os.fsync
    calls = []

    def fsync(fd):
        calls.append(fd)
        if len(calls) == 2:  # the second document's bytes cannot reach the disk
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(commit.os, "fsync", fsync)
    with pytest.raises(OSError, match=f"cannot write {second}: No space left on device"):
        write_outputs([(first, {"new": 1}, None), (second, {"new": 2}, None)])
    assert first.read_bytes() == OLD and not second.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_disk_full_names_the_path(tmp_path, dataset, monkeypatch, capsys):
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    out = tmp_path / "p.json"
    assert _export(dataset, out) == 1
    err = capsys.readouterr().err
    assert f"cannot write {out}: No space left on device" in err and len(err.strip().splitlines()) == 1


def test_a_failed_run_creates_no_folder(tmp_path, dataset, capsys):
    out = tmp_path / "new" / "sub" / "p.json"
    assert _export(dataset, out, "--ttt") != 0  # the dummy adapter cannot adapt
    assert not (tmp_path / "new").exists()
    assert _export(dataset, out) == 0
    assert json.loads(out.read_text())[0]["detections"] == []


def test_a_failed_commit_removes_the_folders_it_made(tmp_path, monkeypatch, temp_kind):
    def fail(staged):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(commit, "_name_in_place", fail)
    with pytest.raises(OSError, match="Input/output error"):
        write_outputs([(tmp_path / "new" / "sub" / "a.json", [], None)])
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------ refused output paths
def test_two_outputs_on_one_file_are_refused(tmp_path, dataset, capsys):
    out = tmp_path / "p.json"
    out.write_bytes(OLD)
    code = _export(dataset, out, *TTA_LOG, str(tmp_path / "." / "p.json"))
    err = capsys.readouterr().err
    assert code == 2 and "--output and --tta-log-out are the same file" in err
    assert out.read_bytes() == OLD


def test_a_hard_link_counts_as_the_same_file(tmp_path):
    (tmp_path / "a.json").write_bytes(OLD)
    os.link(tmp_path / "a.json", tmp_path / "b.json")
    with pytest.raises(OutputPathError, match="same file"):
        check_outputs({"--output": tmp_path / "a.json", "--log": tmp_path / "b.json"})


def test_eval_refuses_to_write_its_report_over_the_predictions(tmp_path, dataset, capsys):
    preds = tmp_path / "p.json"
    assert _export(dataset, preds) == 0
    before = preds.read_bytes()
    code = eval_main(["--predictions", str(preds), "--dataset", str(dataset), "--output", str(preds)])
    captured = capsys.readouterr()
    assert code == 2 and "is the --predictions file" in captured.err and captured.out == ""
    assert preds.read_bytes() == before


def test_an_input_of_the_dataset_is_refused_as_an_output(tmp_path, dataset, capsys):
    label = dataset / "labels" / "val" / "0.txt"
    before = label.read_bytes()
    assert _export(dataset, label) == 2
    assert "a label file of the dataset" in capsys.readouterr().err
    assert label.read_bytes() == before


def test_a_fifo_is_refused_and_left_a_fifo(tmp_path, dataset, capsys):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    assert _export(dataset, fifo) == 2
    assert "is a FIFO (named pipe), not a regular file" in capsys.readouterr().err
    assert fifo.is_fifo()


def test_devices_are_refused_before_anything_is_written():
    with pytest.raises(OutputPathError, match="/dev/null is a character device, not a regular file"):
        check_outputs({"--output": "/dev/null"})


def test_a_symlink_to_a_file_is_followed_and_kept(tmp_path, dataset, capsys):
    real = tmp_path / "runs" / "p.json"
    real.parent.mkdir()
    real.write_bytes(OLD)
    link = tmp_path / "latest.json"
    link.symlink_to(real)
    assert _export(dataset, link) == 0
    err = capsys.readouterr().err
    assert f"--output {link} is a symbolic link; writing the file it points to, {real}" in err
    assert link.is_symlink() and json.loads(real.read_text())[0]["detections"] == []


def test_a_dangling_symlink_is_refused(tmp_path, dataset, capsys):
    link = tmp_path / "latest.json"
    link.symlink_to(tmp_path / "nowhere" / "p.json")
    assert _export(dataset, link) == 2
    assert "which does not exist" in capsys.readouterr().err
    assert link.is_symlink() and not (tmp_path / "nowhere").exists()


def test_eval_report_that_cannot_be_written_is_one_line_and_prints_no_report(tmp_path, dataset, capsys):
    preds = tmp_path / "p.json"
    assert _export(dataset, preds) == 0
    capsys.readouterr()
    report = _unwritable_folder(tmp_path) / "yolozu-report.json"
    code = eval_main(["--predictions", str(preds), "--dataset", str(dataset), "--output", str(report)])
    captured = capsys.readouterr()
    assert code != 0 and captured.out == ""
    assert captured.err.startswith("error:") and len(captured.err.strip().splitlines()) == 1
    assert not report.exists()


def test_a_successful_run_replaces_every_output_and_leaves_no_temporary_file(tmp_path, dataset):
    out, log = tmp_path / "p.json", tmp_path / "logs" / "tta.json"
    out.write_bytes(OLD)
    assert _export(dataset, out, *TTA_LOG, str(log)) == 0
    assert json.loads(log.read_text())["output"] == str(out)
    assert out.read_bytes() != OLD
    assert sorted(_files(tmp_path)) == sorted(
        ["p.json", "logs/tta.json"] + [str(p.relative_to(tmp_path)) for p in dataset.rglob("*") if p.is_file()]
    )


def test_a_temporary_file_left_by_a_killed_commit_is_removed_by_the_next_write(tmp_path):
    target = tmp_path / "p.json"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".p.json.{int(dead.stdout)}.0a1b2c3d.tmp"  # a process that has exited
    stale.write_bytes(OLD)
    mine = tmp_path / f".p.json.{os.getpid()}.0a1b2c3d.tmp"  # a live process (this one) may still commit it
    mine.write_bytes(OLD)
    other = tmp_path / ".other.json.1.0a1b2c3d.tmp"
    other.write_bytes(OLD)
    write_outputs([(target, [], None)])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["p.json", mine.name, other.name])
