"""Bounded waits and resources, and lines that say only what they should: eval reads only regular files of bounded
size as predictions, a stdout that cannot take the report is one line, names with control characters are printed
escaped, a label file outside the dataset never has its content echoed, a corrupt checkpoint size and an
over-long output name are one line each, and a torchrun rank with no peer gives up after --dist-timeout with a
line saying what it waited for."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.cli_cases import OLD, one_image_dataset, run_cli
from yolozu.models.checkpoint import load_detector

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def dataset(tmp_path) -> Path:
    return one_image_dataset(tmp_path)


_run = run_cli


@pytest.mark.parametrize("kind", ["fifo", "/dev/zero", "folder"])
def test_eval_reads_only_regular_predictions_files(tmp_path, dataset, capsys, kind):
    preds = tmp_path / "preds.json"
    if kind == "fifo":
        os.mkfifo(preds)  # opening it would wait for a writer forever
    elif kind == "folder":
        preds.mkdir()
    else:
        preds = Path(kind)  # reading it would never end
    code, err = _run(capsys, "eval", "--dataset", str(dataset), "--split", "val", "--predictions", str(preds))
    assert code == 1 and len(err) == 1 and err[0].startswith(f"error: the predictions file {preds} is ")


def test_eval_to_a_full_stdout_is_one_line(tmp_path, dataset):
    preds = tmp_path / "p.json"
    preds.write_text(json.dumps([{"image": str(dataset / "images" / "val" / "a.png"), "detections": []}]))
    with open("/dev/full", "w") as full:
        done = subprocess.run(
            [sys.executable, "-c", "import sys; from yolozu.cli import main; sys.exit(main())", "eval", "--dataset",
             str(dataset), "--split", "val", "--predictions", str(preds)],
            stdout=full, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120,
        )
    assert done.returncode == 1
    assert done.stderr == "error: cannot print the report to stdout: No space left on device\n"


def test_control_characters_of_a_name_are_printed_escaped(tmp_path, dataset, capsys):
    bad = dataset / "images" / "val" / "b\nerror: all good\x1b[32m.png"
    bad.write_bytes(b"not a png")
    code, err = _run(capsys, "export", "--adapter", "detector", "--workers", "0", "--quiet", "--dataset", str(dataset),
                     "--split", "val", "--output", str(tmp_path / "p.json"))
    assert code == 1 and len(err) == 1
    assert "b\\nerror: all good\\x1b[32m.png" in err[0] and "\x1b" not in err[0]


def test_a_label_linked_outside_the_dataset_is_not_echoed(tmp_path, dataset, capsys):
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0:the-secret-line\n")
    label = dataset / "labels" / "val" / "a.txt"
    label.unlink()
    label.symlink_to(secret)
    code, err = _run(capsys, "export", "--quiet", "--dataset", str(dataset), "--split", "val", "--output",
                     str(tmp_path / "p.json"))
    assert code == 1 and len(err) == 1 and f"{label}:1: not a label line" in err[0]
    assert "secret" not in err[0] and "root:x" not in err[0]


def test_a_checkpoint_with_an_absurd_image_size_is_one_line(tmp_path, dataset, capsys):
    model = load_detector()
    ckpt = tmp_path / "huge.pt"
    torch.save({"config": {**model.config, "image_size": 2**31}, "state_dict": model.state_dict()}, ckpt)
    code, err = _run(capsys, "export", "--adapter", "detector", "--checkpoint", str(ckpt), "--quiet", "--dataset",
                     str(dataset), "--split", "val", "--output", str(tmp_path / "p.json"))
    assert code == 1 and len(err) == 1
    assert err[0].startswith(f"error: {ckpt} is not a usable detector checkpoint: image_size must be an integer")


def test_an_output_name_too_long_for_the_file_system_is_a_usage_error(tmp_path, dataset, capsys):
    code, err = _run(capsys, "export", "--quiet", "--dataset", str(dataset), "--split", "val", "--output",
                     str(tmp_path / ("x" * 300 + ".json")))
    assert code == 2 and err[0].startswith("usage:") and len(err) == 2
    assert "is 305 bytes, over this file system's limit of" in err[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_rank_without_peers_gives_up_after_the_dist_timeout(tmp_path, dataset, capsys, monkeypatch):
    port = _free_port()
    for name, value in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "p.json"
    out.write_bytes(OLD)
    code, err = _run(capsys, "export", "--quiet", "--dataset", str(dataset), "--split", "val", "--output", str(out),
                     "--dist-timeout", "1")
    assert code == 1 and len(err) == 1
    assert err[0].startswith(f"error: rank 0 of 2 waited 1 s for the other ranks of the process group at "
                             f"127.0.0.1:{port}")
    assert out.read_bytes() == OLD


def test_a_client_rank_without_a_store_is_one_line_without_torchs_log(tmp_path, dataset):
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_free_port()), "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.pop("TORCH_CPP_LOG_LEVEL", None)
    out = tmp_path / "p.json"
    out.write_bytes(OLD)
    done = subprocess.run(
        [sys.executable, "-m", "yolozu.cli", "export", "--quiet", "--dataset", str(dataset), "--split", "val",
         "--output", str(out), "--dist-timeout", "1"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1, done.stderr
    assert lines[0].startswith("error: rank 1 of 2 waited 1 s for the other ranks")
    assert out.read_bytes() == OLD


def test_a_dist_timeout_that_is_not_positive_is_a_usage_error(tmp_path, dataset, capsys):
    code, err = _run(capsys, "export", "--quiet", "--dataset", str(dataset), "--output", str(tmp_path / "p.json"),
                     "--dist-timeout", "0")
    assert code == 2 and err[-1] == "error: --dist-timeout must be > 0 (seconds), got 0"


def test_running_out_of_file_descriptors_is_one_line(tmp_path):
    import resource

    from yolozu.demo.synth import SynthSpec, write_split

    write_split(tmp_path / "many", "val", 3, seed=1, spec=SynthSpec(image_size=64))
    out = tmp_path / "p.json"
    out.write_bytes(OLD)
    done = subprocess.run(
        [sys.executable, "-c", "import sys; from yolozu.cli import main; sys.exit(main())", "export", "--adapter",
         "detector", "--dataset", str(tmp_path / "many"), "--split", "val", "--output", str(out), "--quiet",
         "--workers", "2", "--batch-size", "1"],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (12, 12)),
    )
    assert done.returncode == 1, done.stderr[-2000:]
    assert done.stderr.strip().splitlines() == ["error: too many open files while 2 image-loading processes ran (the "
                                                "limit, ulimit -n, is 12); raise it or pass --workers 0"]
    assert out.read_bytes() == OLD
