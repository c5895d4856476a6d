"""COCO evaluation, predictions schema, loading, wrapping and atomic writing."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from yolozu.cli.eval import main
from yolozu.io.predictions import (
    PredictionsError,
    load_predictions,
    validate_predictions,
    wrap,
    write_json_atomic,
)
from yolozu.metrics import EvaluationError, evaluate

LABELS = [
    [
        {"class_id": 0, "cx": 0.30, "cy": 0.30, "w": 0.20, "h": 0.25},
        {"class_id": 4, "cx": 0.70, "cy": 0.60, "w": 0.15, "h": 0.20},
    ],
    [{"class_id": 4, "cx": 0.50, "cy": 0.50, "w": 0.30, "h": 0.30}],
    [
        {"class_id": 9, "cx": 0.20, "cy": 0.75, "w": 0.12, "h": 0.18},
        {"class_id": 0, "cx": 0.80, "cy": 0.20, "w": 0.25, "h": 0.20},
    ],
]


@pytest.fixture()
def dataset(tmp_path):
    """A YOLO-layout dataset with 3 images (of different sizes) under ``tmp_path/ds``."""
    root = tmp_path / "ds"
    (root / "images" / "val").mkdir(parents=True)
    (root / "labels" / "val").mkdir(parents=True)
    records = []
    for i, labels in enumerate(LABELS):
        path = root / "images" / "val" / f"{i:03d}.png"
        Image.fromarray(np.zeros((100 + 20 * i, 120, 3), dtype=np.uint8)).save(path)
        (root / "labels" / "val" / f"{i:03d}.txt").write_text(
            "".join(f"{o['class_id']} {o['cx']} {o['cy']} {o['w']} {o['h']}\n" for o in labels)
        )
        records.append({"image": str(path), "labels": labels})
    return root, records


def _perfect(records, shift: float = 0.0):
    return [
        {
            "image": r["image"],
            "detections": [
                {
                    "class_id": o["class_id"],
                    "score": 0.9,
                    "bbox": {"cx": (o["cx"] + shift) % 1.0, "cy": o["cy"], "w": o["w"], "h": o["h"]},
                }
                for o in r["labels"]
            ],
        }
        for r in records
    ]


def test_ground_truth_as_predictions_scores_one(dataset):
    _, records = dataset
    report = evaluate(_perfect(records), records)
    assert report["map50"] == pytest.approx(1.0) and report["map"] == pytest.approx(1.0)
    assert report["ground_truth"] == 5 and report["detections"] == 5


def test_perturbed_boxes_score_lower(dataset):
    _, records = dataset
    slight = evaluate(_perfect(records, shift=0.03), records)
    far = evaluate(_perfect(records, shift=0.5), records)
    assert slight["map50"] == pytest.approx(1.0) and slight["map"] < 1.0
    assert far["map50"] < 0.5 and far["map"] < slight["map"]
    wrong_class = _perfect(records)
    wrong_class[1]["detections"][0]["class_id"] = 7
    assert evaluate(wrong_class, records)["map50"] < 1.0


def test_empty_predictions_score_zero(dataset):
    _, records = dataset
    report = evaluate([{"image": r["image"], "detections": []} for r in records], records)
    assert report["map50"] == 0.0 and report["map"] == 0.0


def test_images_match_by_split_and_file_name(dataset, tmp_path):
    _, records = dataset
    preds = _perfect(records)
    for p in preds:  # as if written on another machine
        p["image"] = "/elsewhere/data/images/val/" + os.path.basename(p["image"])
    assert evaluate(preds, records)["map50"] == pytest.approx(1.0)


def test_mismatched_image_sets_are_errors(dataset):
    _, records = dataset
    preds = _perfect(records)
    with pytest.raises(EvaluationError, match="002.png"):
        evaluate(preds[:2], records)
    extra = preds + [{"image": "/x/images/val/999.png", "detections": []}]
    with pytest.raises(EvaluationError, match="999.png"):
        evaluate(extra, records)
    with pytest.raises(EvaluationError, match="more than once"):
        evaluate(preds + preds[:1], records)
    no_labels = [{"image": r["image"], "labels": []} for r in records]
    with pytest.raises(EvaluationError, match="no labelled objects"):
        evaluate(preds, no_labels)


def test_cli_prints_and_writes_the_report(dataset, tmp_path, capsys):
    root, records = dataset
    pred_path = tmp_path / "preds.json"
    write_json_atomic(pred_path, wrap(_perfect(records), {"note": "test"}))
    out = tmp_path / "report.json"
    assert main(["--predictions", str(pred_path), "--dataset", str(root), "--output", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["map50"] == pytest.approx(1.0) and printed["split"] == "val"
    assert json.loads(out.read_text()) == printed
    assert main(["--predictions", str(tmp_path / "missing.json"), "--dataset", str(root)]) == 1
    assert "missing.json" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- schema
GOOD = {
    "image": "a.png",
    "detections": [{"class_id": 1, "score": 0.5, "bbox": {"cx": 0.5, "cy": 0.5, "w": 0.1, "h": 0.1}}],
}


@pytest.mark.parametrize(
    "entry, where",
    [
        ({"detections": []}, r"predictions\[1\]\.image"),
        ({"image": "b.png"}, r"predictions\[1\]\.detections"),
        (
            {"image": "b.png", "detections": [{"class_id": "1", "score": 0.5, "bbox": GOOD["detections"][0]["bbox"]}]},
            r"detections\[0\]\.class_id",
        ),
        (
            {
                "image": "b.png",
                "detections": [{"class_id": 1, "score": float("nan"), "bbox": GOOD["detections"][0]["bbox"]}],
            },
            r"detections\[0\]\.score",
        ),
        (
            {"image": "b.png", "detections": [{"class_id": 1, "score": 0.5, "bbox": {"cx": 0.5, "cy": 0.5, "w": 0.1}}]},
            r"detections\[0\]\.bbox\.h",
        ),
        (
            {
                "image": "b.png",
                "detections": [{"class_id": 1, "score": 0.5, "bbox": {"cx": 0.5, "cy": 0.5, "w": -0.1, "h": 0.1}}],
            },
            r"width and height",
        ),
    ],
)
def test_schema_errors_name_the_entry_and_field(entry, where):
    validate_predictions([GOOD])
    with pytest.raises(PredictionsError, match=where):
        validate_predictions([GOOD, entry])


def test_load_plain_and_wrapped(tmp_path):
    plain, wrapped = tmp_path / "plain.json", tmp_path / "wrapped.json"
    write_json_atomic(plain, [GOOD])
    write_json_atomic(wrapped, wrap([GOOD], {"ttt": None}))
    assert load_predictions(plain) == load_predictions(wrapped) == [GOOD]
    assert json.loads(wrapped.read_text())["schema_version"] == 1
    bad = tmp_path / "bad.json"
    bad.write_text('{"predictions": [{"image": 3, "detections": []}]}')
    with pytest.raises(PredictionsError, match=r"bad.json.*predictions\[0\]\.image"):
        load_predictions(bad)
    bad.write_text("{not json")
    with pytest.raises(PredictionsError, match="not valid JSON"):
        load_predictions(bad)


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.json"
    with pytest.raises(TypeError):
        write_json_atomic(target, {"x": object()})
    assert list(tmp_path.iterdir()) == []
    write_json_atomic(target, {"x": 1})
    with pytest.raises(ValueError):
        write_json_atomic(target, {"x": float("nan")})
    assert json.loads(target.read_text()) == {"x": 1}  # the old file survives a failed rewrite
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_atomic_write_to_a_missing_or_unwritable_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_json_atomic(tmp_path / "no" / "out.json", [])
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        # root ignores folder permissions; /proc refuses new files to everyone
        folder = locked if os.geteuid() != 0 else Path("/proc")
        if not folder.is_dir():
            pytest.skip("no folder that refuses writes here")
        with pytest.raises(PermissionError, match="not writable"):
            write_json_atomic(folder / "yolozu-out.json", [])
    finally:
        locked.chmod(0o700)
