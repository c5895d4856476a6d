"""Every failure of the export and eval commands is one clear line (two for a usage error: the usage line and the
error), a non-zero exit, and no traceback; and the words name what the user typed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import yolozu.cli.eval
import yolozu.cli.inputs
from tests.cli_cases import OLD, one_image_dataset, run_cli
from yolozu.cli import main as cli
from yolozu.data import ManifestError, build_manifest
from yolozu.demo.synth import SynthSpec, write_split


@pytest.fixture()
def dataset(tmp_path) -> Path:
    return one_image_dataset(tmp_path)


_run = run_cli


# -------------------------------------------------------------------------------- tracebacks -> one line
def test_a_bad_device_is_a_usage_error(tmp_path, dataset, capsys):
    code, err = _run(capsys, "export", "--dataset", str(dataset), "--output", str(tmp_path / "p.json"),
                     "--adapter", "detector", "--device", "bogus")
    assert code == 2 and err[0].startswith("usage:") and not any("Traceback" in line for line in err)
    assert err[-1] == "error: --device 'bogus' is not a device; use cpu or cuda[:N]"


@pytest.mark.parametrize("content", ["text", "tensor", "wrong_weights"])
def test_a_checkpoint_that_is_not_one_is_one_line(tmp_path, dataset, capsys, content):
    ckpt = tmp_path / "model.pt"
    if content == "text":
        ckpt.write_text("hello")
    elif content == "tensor":
        torch.save(torch.zeros(3), ckpt)
    else:
        torch.save({"config": {}, "state_dict": {"no.such.weight": torch.zeros(1)}}, ckpt)
    code, err = _run(capsys, "export", "--dataset", str(dataset), "--output", str(tmp_path / "p.json"),
                     "--adapter", "detector", "--checkpoint", str(ckpt))
    assert code == 1 and len(err) == 1
    assert err[0].startswith(f"error: {ckpt} is not a") and "detector checkpoint" in err[0]


@pytest.mark.parametrize("command", ["export", "eval"])
def test_ctrl_c_exits_130_with_one_line_and_keeps_the_output(tmp_path, dataset, capsys, monkeypatch, command):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    out = tmp_path / "out.json"
    out.write_bytes(OLD)
    preds = tmp_path / "p.json"
    preds.write_text('[{"image": "a.png", "detections": []}]')
    module = yolozu.cli.inputs if command == "export" else yolozu.cli.eval
    monkeypatch.setattr(module, "build_manifest", interrupt)
    args = ["--output", str(out)] if command == "export" else ["--predictions", str(preds), "--output", str(out)]
    code, err = _run(capsys, command, "--dataset", str(dataset), *args)
    assert code == 130 and err == ["interrupted"]
    assert out.read_bytes() == OLD


# ----------------------------------------------------------------------------------------------- wording
def test_a_label_file_that_is_not_utf8_is_named_with_its_line(dataset):
    label = dataset / "labels" / "val" / "a.txt"
    label.write_bytes(b"1 0.5 0.5 0.2 0.2\n\xff\xfe 0.5 0.5 0.1 0.1\n")
    with pytest.raises(ManifestError, match=f"{label}:2: not UTF-8 text"):
        build_manifest(dataset, "val")


def test_a_file_given_as_dataset_is_not_a_folder(tmp_path, capsys):
    not_a_folder = tmp_path / "data.zip"
    not_a_folder.write_bytes(b"PK")
    code, err = _run(capsys, "export", "--dataset", str(not_a_folder), "--output", str(tmp_path / "p.json"))
    assert code == 1 and err == [f"error: dataset root {not_a_folder} is a file, not a folder; pass the folder that "
                                 "holds images/<split>"]


def test_the_split_hint_names_the_flag(tmp_path, capsys):
    (tmp_path / "ds" / "images" / "test").mkdir(parents=True)
    code, err = _run(capsys, "eval", "--dataset", str(tmp_path / "ds"), "--predictions", str(tmp_path / "p.json"))
    assert code == 1 and len(err) == 1 and "pass --split NAME" in err[0] and "split=..." not in err[0]


def test_a_bad_global_flag_is_not_labelled_ttt(tmp_path, dataset, capsys):
    code, err = _run(capsys, "export", "--dataset", str(dataset), "--output", str(tmp_path / "p.json"), "--seed", "-1")
    assert code == 2 and err[-1] == "error: --seed must be >= 0, got -1"
    assert not any("TTT" in line for line in err)


def test_an_unknown_command_is_named(capsys):
    code, err = _run(capsys, "bogus")
    assert code == 2 and len(err) == 2 and err[0].startswith("usage: yolozu")
    assert err[1] == "error: unknown command 'bogus'; choose one of: export, eval"


def test_after_a_rollback_the_summary_says_no_parameter_changed(tmp_path, capsys):
    write_split(tmp_path / "synth", "val", 2, seed=3, spec=SynthSpec(image_size=160))
    code, err = _run(capsys, "export", "--adapter", "detector", "--dataset", str(tmp_path / "synth"), "--split", "val",
                     "--output", str(tmp_path / "p.json"), "--ttt", "--ttt-lr", "1e30", "--ttt-batch-size", "2")
    assert code == 0 and err[-1].endswith("(TTT tent: 0 steps, 0 parameters changed, stopped: non_finite_metrics)")


@pytest.mark.parametrize("command", ["export", "eval"])
def test_a_usage_error_is_the_usage_line_and_the_error(tmp_path, capsys, command):
    with pytest.raises(SystemExit) as exit_info:
        cli([command, "--dataset", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 2
    assert err[0].startswith(f"usage: yolozu {command}") and "the following arguments are required" in err[1]
