"""No run replaces what it reads and no run ends silently with no detection: every file a run reads is an input
no output may name (the default checkpoint, the calibration split's files; ``yolozu.cli.inputs``); non-finite
and out-of-range numbers are refused at parse time naming the flag; a model with non-finite weights is an error on
every path, not only under --ttt."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from yolozu.cli import main as cli
from yolozu.cli.inputs import default_checkpoint, model_inputs
from yolozu.models.checkpoint import DEFAULT_CHECKPOINT, load_detector, save_detector

OLD = b'["the previous run"]\n'
BASE = ("export", "--adapter", "detector", "--quiet", "--workers", "0")


@pytest.fixture()
def dataset(tmp_path) -> Path:
    """Two small images with a label each, in splits val and train."""
    root = tmp_path / "ds"
    for split in ("val", "train"):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for i in range(2):
            pixels = np.random.default_rng(i).integers(0, 255, (16, 16, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "images" / split / f"{i:06d}.png")
            (root / "labels" / split / f"{i:06d}.txt").write_text("1 0.5 0.5 0.2 0.2\n")
    return root


def _run(capsys, *argv: str) -> tuple[int | str, list[str]]:
    try:
        code = cli(list(argv))
    except SystemExit as e:  # argparse's own usage errors
        code = e.code
    except BaseException as e:  # noqa: B036 - report what escaped instead of ending the session
        code = f"escaped: {type(e).__name__}"
    return code, capsys.readouterr().err.strip().splitlines()


def test_the_default_checkpoint_is_an_input(tmp_path, dataset, capsys):
    shipped = DEFAULT_CHECKPOINT.read_bytes()
    try:
        code, err = _run(capsys, *BASE, "--dataset", str(dataset), "--split", "val", "--output",
                         str(DEFAULT_CHECKPOINT))
    finally:  # a failure of the check must not cost the shipped model
        if DEFAULT_CHECKPOINT.read_bytes() != shipped:
            DEFAULT_CHECKPOINT.write_bytes(shipped)
            pytest.fail("the export replaced the default checkpoint")
    assert code == 2 and err[-1].startswith(f"error: --output {DEFAULT_CHECKPOINT} is the detector adapter's default "
                                            "checkpoint")


def test_a_link_to_the_default_checkpoint_is_an_input(tmp_path, dataset, capsys):
    link = tmp_path / "model-link.json"
    link.symlink_to(DEFAULT_CHECKPOINT)
    shipped = DEFAULT_CHECKPOINT.read_bytes()
    code, err = _run(capsys, *BASE, "--dataset", str(dataset), "--split", "val", "--output", str(link))
    assert code == 2 and "default checkpoint" in err[-1]
    assert DEFAULT_CHECKPOINT.read_bytes() == shipped


def test_model_inputs_name_the_given_or_the_default_checkpoint():
    assert model_inputs("detector", None) == [("the detector adapter's default checkpoint", str(DEFAULT_CHECKPOINT))]
    assert model_inputs("detector", "m.pt") == [("the --checkpoint", "m.pt")]
    assert model_inputs("dummy", None) == [] and default_checkpoint("dummy") is None


@pytest.mark.parametrize("victim", ["labels/train/000001.txt", "images/train/000000.png"])
def test_the_calibration_split_files_are_inputs(tmp_path, dataset, capsys, victim):
    target = dataset / victim
    before = target.read_bytes()
    code, err = _run(capsys, *BASE, "--dataset", str(dataset), "--split", "val", "--output", str(target),
                     "--ttt", "--ttt-method", "eata", "--ttt-eata-fisher-data", "train")
    assert code == 2 and "calibration split 'train'" in err[-1] and "an input of this run" in err[-1]
    assert target.read_bytes() == before


@pytest.mark.parametrize(
    "flags, flag",
    [
        (("--bn-stats", "mix", "--bn-prior", "nan"), "--bn-prior"),
        (("--bn-stats", "mix", "--bn-prior", "inf"), "--bn-prior"),
        (("--bn-stats", "shrink", "--bn-shrink", "nan"), "--bn-shrink"),
        (("--ttt", "--ttt-lr", "-inf"), "--ttt-lr"),
        (("--tta", "--tta-iou", "NaN"), "--tta-iou"),
        (("--seed", str(2**64)), "--seed"),
        (("--ttt", "--ttt-max-batches", str(10**23)), "--ttt-max-batches"),
    ],
)
def test_numbers_no_run_can_use_are_usage_errors_naming_the_flag(tmp_path, dataset, capsys, flags, flag):
    out = tmp_path / "p.json"
    out.write_bytes(OLD)
    code, err = _run(capsys, *BASE, "--dataset", str(dataset), "--output", str(out), *flags)
    assert code == 2 and err[-1].startswith(f"yolozu export: error: argument {flag}")
    assert out.read_bytes() == OLD


@pytest.mark.parametrize(
    "flags",
    [(), ("--bn-stats", "batch"), ("--tta",), ("--ttt", "--ttt-lr", "1e-3")],
    ids=["plain", "bn-stats", "tta", "ttt"],
)
def test_a_checkpoint_with_nan_weights_fails_on_every_path(tmp_path, dataset, capsys, flags):
    model = load_detector()
    with torch.no_grad():
        next(iter(model.parameters())).fill_(float("nan"))
    ckpt = tmp_path / "nan.pt"
    save_detector(model, ckpt)
    out = tmp_path / "p.json"
    out.write_bytes(OLD)
    code, err = _run(capsys, *BASE, "--dataset", str(dataset), "--split", "val", "--output", str(out),
                     "--checkpoint", str(ckpt), *flags)
    assert code == 1 and len(err) == 1
    assert err[0].startswith("error: the model has non-finite weights (1 tensors:") and str(ckpt) in err[0]
    assert out.read_bytes() == OLD
