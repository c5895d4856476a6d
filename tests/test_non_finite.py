"""A model whose weights went non-finite never reaches predictions silently: the export refuses (exit 1, nothing
written) unless --ttt-allow-non-finite, and then warns on stderr and in the report."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from tests.toy import UNGUARDED
from yolozu.cli.export import main
from yolozu.demo.synth import SynthSpec, write_split
from yolozu.inference.predictor import NON_FINITE, finite_per_image

OLD = b'["the previous run"]\n'
DIVERGE = ["--ttt", "--ttt-lr", "1e30", "--ttt-steps", "2", "--ttt-batch-size", "2"]
GUARDS_OFF = {
    "no-stop": ["--no-ttt-stop-on-non-finite", *UNGUARDED],
    "no-rollback": ["--no-ttt-rollback-on-stop"],
    "no-rollback-reusing-the-forward": [  # batch 1 diverges; batch 2 is predicted with its weights
        "--no-ttt-rollback-on-stop",
        "--ttt-batch-size",
        "1",
        "--ttt-schedule",
        "online",
        "--ttt-online-predict",
        "adapt_forward",
    ],
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("nan")
    write_split(root, "val", 2, seed=3, spec=SynthSpec(image_size=160))
    return root


def _export(dataset: Path, out: Path, *extra: str) -> int:
    args = ["--adapter", "detector", "--dataset", str(dataset), "--split", "val", "--output", str(out), "--quiet"]
    return main(args + list(extra))


@pytest.mark.parametrize("guards", GUARDS_OFF.values(), ids=GUARDS_OFF.keys())
def test_non_finite_outputs_are_an_error_that_writes_nothing(tmp_path, dataset, capsys, guards):
    out = tmp_path / "p.json"
    out.write_bytes(OLD)
    assert _export(dataset, out, *DIVERGE, *guards) == 1
    err = capsys.readouterr().err.strip()
    assert re.match(f"error: {NON_FINITE} on [12] of 2 images", err) and "--ttt-allow-non-finite" in err
    assert len(err.splitlines()) == 1
    assert out.read_bytes() == OLD


def test_allowed_non_finite_outputs_are_written_with_warnings(tmp_path, dataset, capsys):
    out = tmp_path / "p.json"
    assert _export(dataset, out, *DIVERGE, *GUARDS_OFF["no-stop"], "--wrap", "--ttt-allow-non-finite") == 0
    assert f"warning: {NON_FINITE} on 2 of 2 images" in capsys.readouterr().err
    doc = json.loads(out.read_text())
    assert any(w.startswith(NON_FINITE) for w in doc["meta"]["ttt"]["report"]["warnings"])


def test_guards_that_roll_back_keep_predictions_finite_without_a_warning(tmp_path, dataset, capsys):
    out = tmp_path / "p.json"
    assert _export(dataset, out, *DIVERGE, "--wrap") == 0
    assert NON_FINITE not in capsys.readouterr().err
    report = json.loads(out.read_text())["meta"]["ttt"]["report"]
    assert report["stop_reason"] == "non_finite_metrics"
    assert report["warnings"] == ["non_finite_metrics"]  # the stop reason (YOLOZU's), no non-finite prediction


def test_finite_per_image_looks_at_every_tensor_of_the_output():
    logits = torch.zeros(3, 2, 4, 4)
    boxes = torch.zeros(3, 4, 4, 4)
    assert finite_per_image({"logits": logits, "boxes": boxes}, 3) == [True, True, True]
    logits[1, 0, 2, 2] = float("nan")
    boxes[2, 3, 0, 0] = float("inf")
    assert finite_per_image({"logits": logits, "boxes": boxes}, 3) == [True, False, False]
    assert finite_per_image([torch.tensor(float("nan"))], 2) == [False, False]  # no batch dim: every image
    assert finite_per_image({"ids": torch.tensor([1, 2, 3])}, 3) == [True, True, True]  # integers are finite
