"""Out-of-range values are errors naming where they are: label class ids beyond the model's classes, scores and
box fields outside [0, 1], a flip-TTA IoU threshold outside (0, 1]."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from yolozu.cli.eval import main as eval_main
from yolozu.cli.export import main as export_main
from yolozu.data import ManifestError, build_manifest
from yolozu.demo.synth import SynthSpec, write_split
from yolozu.inference.flip import FlipTTAConfig
from yolozu.io.predictions import PredictionsError, load_predictions, validate_predictions

GOOD = {
    "image": "a.png",
    "detections": [{"class_id": 1, "score": 0.5, "bbox": {"cx": 0.5, "cy": 0.5, "w": 0.1, "h": 0.1}}],
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ranges")
    write_split(root, "val", 1, seed=3, spec=SynthSpec(image_size=160))
    return root


def test_a_label_class_beyond_the_models_classes_names_file_and_line(tmp_path, dataset, capsys):
    label = next((dataset / "labels" / "val").iterdir())
    good = label.read_text()
    lines = good.count("\n")
    try:
        label.write_text(good + "10 0.5 0.5 0.1 0.1\n")
        code = export_main(["--adapter", "detector", "--dataset", str(dataset), "--split", "val", "--quiet",
                            "--output", str(tmp_path / "p.json")])
    finally:
        label.write_text(good)
    err = capsys.readouterr().err.strip()
    assert code == 1 and err == (
        f"error: {label}:{lines + 1}: class id 10 is beyond the model's 10 classes (0 to 9); these labels are for "
        "another model or the file is corrupt"
    )
    assert not (tmp_path / "p.json").exists()


def test_build_manifest_checks_class_ids_only_when_given_the_class_count(dataset):
    records = build_manifest(dataset, "val", num_classes=10)
    top = max(label["class_id"] for label in records[0]["labels"])
    assert build_manifest(dataset, "val") == records
    with pytest.raises(ManifestError, match=f"class id {top} is beyond the model's {top} classes"):
        build_manifest(dataset, "val", num_classes=top)


def _with(path: tuple, value) -> list:
    entry = copy.deepcopy(GOOD)
    target = entry["detections"][0]
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return [GOOD, entry]


@pytest.mark.parametrize(
    "path,value,what",
    [
        (("score",), 3.2, r"predictions\[1\]\.detections\[0\]\.score: must be in \[0, 1\] \(a confidence"),
        (("score",), -0.1, r"\.score: must be in \[0, 1\]"),
        (("bbox", "cx"), 320.0, r"\.bbox\.cx: must be in \[0, 1\] \(normalised to the image size, not pixels\)"),
        (("bbox", "cy"), -0.5, r"\.bbox\.cy: must be in \[0, 1\]"),
        (("bbox", "w"), 1.5, r"\.bbox\.w: must be in \[0, 1\]"),
        (("bbox", "h"), 64, r"\.bbox\.h: must be in \[0, 1\]"),
    ],
    ids=["score-logit", "score-negative", "cx-pixels", "cy-negative", "w-over-one", "h-pixels"],
)
def test_scores_and_box_fields_outside_the_unit_range_are_errors(path, value, what):
    with pytest.raises(PredictionsError, match=what):
        validate_predictions(_with(path, value))


def test_float_rounding_and_boxes_crossing_the_border_are_accepted():
    validate_predictions(_with(("score",), 1 + 1e-9))
    validate_predictions(_with(("bbox", "cx"), -1e-9))
    crossing = _with(("bbox", "cx"), 0.98)
    crossing[1]["detections"][0]["bbox"]["w"] = 0.2  # extends past the right edge, as unclipped detectors do
    validate_predictions(crossing)


def test_eval_names_the_file_of_an_out_of_range_prediction(tmp_path, dataset, capsys):
    preds = tmp_path / "pixels.json"
    preds.write_text(json.dumps(_with(("bbox", "cx"), 320.0)))
    with pytest.raises(PredictionsError, match=f"{preds}: predictions\\[1\\]\\.detections\\[0\\]\\.bbox\\.cx"):
        load_predictions(preds)
    assert eval_main(["--predictions", str(preds), "--dataset", str(dataset), "--split", "val"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {preds}: predictions[1].detections[0].bbox.cx: must be in [0, 1]")


@pytest.mark.parametrize("iou", ["0", "1.5", "-0.2"])
def test_tta_iou_outside_zero_one_is_a_usage_error(tmp_path, dataset, capsys, iou):
    out = tmp_path / "p.json"
    code = export_main(["--dataset", str(dataset), "--split", "val", "--output", str(out), "--tta", "--tta-iou", iou])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1] == f"error: --tta-iou must be in (0, 1] (an IoU threshold), got {float(iou)}"
    assert not out.exists()
    with pytest.raises(ValueError, match=r"FlipTTAConfig.iou must be in \(0, 1\]"):
        FlipTTAConfig(iou=float(iou))


def test_a_nan_tta_iou_is_refused_when_parsed(tmp_path, dataset, capsys):
    with pytest.raises(SystemExit) as exit_info:
        export_main(["--dataset", str(dataset), "--split", "val", "--output", str(tmp_path / "p.json"), "--tta",
                     "--tta-iou", "nan"])
    assert exit_info.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "argument --tta-iou" in line and line.endswith(": must be a finite number, got 'nan'")
    with pytest.raises(ValueError, match=r"FlipTTAConfig.iou must be in \(0, 1\]"):
        FlipTTAConfig(iou=float("nan"))
