"""Property-based fuzzing of the readers of untrusted files: the label parser, the manifest builder and the
predictions reader. Arbitrary bytes and lines give either a parsed value that holds the reader's promises or the
project's one-line error (ManifestError, PredictionsError: ValueError subclasses), never another exception.
The hypothesis profile (tests/conftest.py) is derandomised, so every run tries the same inputs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from yolozu.data import ManifestError, build_manifest
from yolozu.data.manifest import parse_label_file
from yolozu.io.predictions import PredictionsError, load_predictions, validate_predictions


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def _one_line(error: Exception) -> None:
    text = str(error)
    assert text and "\n" not in text and len(text) < 1000, text


# ---------------------------------------------------------------------------------------------- labels
NUMBER_TEXT = st.one_of(
    st.integers(-3, 20).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["0", "1", "0.5", "1e-3", "nan", "-0", "1_0", "inf", "0x1", "", "1.0000001", "٣"]),
)
LINE = st.lists(st.one_of(NUMBER_TEXT, st.text(max_size=6)), max_size=7).map(" ".join)
LABEL_BYTES = st.one_of(
    st.binary(max_size=200),
    st.lists(LINE, max_size=6).map(lambda lines: "\n".join(lines).encode("utf-8", "surrogatepass")),
)


def _check_labels(labels: list, num_classes: int | None) -> None:
    for label in labels:
        assert set(label) == {"class_id", "cx", "cy", "w", "h"}
        assert type(label["class_id"]) is int and label["class_id"] >= 0
        assert num_classes is None or label["class_id"] < num_classes
        assert all(0.0 <= label[k] <= 1.0 for k in ("cx", "cy", "w", "h"))


@given(data=LABEL_BYTES, num_classes=st.one_of(st.none(), st.integers(1, 12)))
@example(data=b"1 0.5 0.5 0.2 0.2\n\xff 0.5 0.5 0.1 0.1\n", num_classes=None)  # not UTF-8
@example(data=b"0 0.5 0.5 0.1 0.1 " * 20000, num_classes=None)  # one very long line
@example(data=b"\xed\xa0\x80 0.5 0.5 0.1 0.1", num_classes=None)  # an encoded surrogate
@example(data=b"7 0.5 0.5 0.1 0.1\r\n3 1 1 1 1\r", num_classes=5)
def test_the_label_parser_parses_or_raises_a_manifest_error(scratch, data, num_classes):
    path = scratch / "label.txt"
    path.write_bytes(data)
    try:
        labels = parse_label_file(path, num_classes)
    except ManifestError as e:
        _one_line(e)
        assert str(path) in str(e)
    else:
        _check_labels(labels, num_classes)


@given(
    data=LABEL_BYTES,
    split=st.text(max_size=12).filter(lambda s: "/" not in s and "\\" not in s),
    label_is_folder=st.booleans(),
)
@example(data=b"\xff", split="val", label_is_folder=False)
@example(data=b"", split="..", label_is_folder=False)
@example(data=b"", split="a\x00b", label_is_folder=False)
def test_the_manifest_builder_builds_or_raises_a_manifest_error(scratch, data, split, label_is_folder):
    root = scratch / "dataset"
    images = root / "images" / "val"
    labels = root / "labels" / "val"
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    (images / "a.png").write_bytes(b"not decoded by the manifest")
    label = labels / "a.txt"
    if label.is_dir():
        label.rmdir()
    elif label.exists():
        label.unlink()
    if label_is_folder:
        label.mkdir()
    else:
        label.write_bytes(data)
    try:
        records = build_manifest(root, split or None)
    except ManifestError as e:
        _one_line(e)
    else:
        assert [Path(r["image"]).name for r in records] == ["a.png"]
        _check_labels(records[0]["labels"], None)


# ----------------------------------------------------------------------------------------- predictions
KEYS = st.sampled_from(["image", "detections", "class_id", "score", "bbox", "cx", "cy", "w", "h", "predictions",
                        "schema_version", "meta"])
JSON = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(10**30), max_value=10**400),
        st.floats(),
        st.text(max_size=8),
    ),
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.one_of(KEYS, st.text(max_size=4)), children, max_size=6)
    ),
    max_leaves=40,
)
UNIT = st.one_of(st.floats(-0.5, 1.5), st.integers(-2, 2), st.floats(), st.just(10**400))
DETECTION = st.fixed_dictionaries(
    {
        "class_id": st.one_of(st.integers(-1, 12), st.booleans(), st.floats(0, 3)),
        "score": UNIT,
        "bbox": st.fixed_dictionaries({"cx": UNIT, "cy": UNIT, "w": UNIT, "h": UNIT}),
    }
)
SCHEMA_LIKE = st.lists(
    st.fixed_dictionaries({"image": st.one_of(st.text(max_size=8), st.integers()), "detections": st.lists(DETECTION,
                                                                                                         max_size=3)}),
    max_size=3,
)
DOCUMENT = st.one_of(JSON, SCHEMA_LIKE, SCHEMA_LIKE.map(lambda p: {"schema_version": 1, "predictions": p}))


def _check_predictions(preds: list) -> None:
    for entry in preds:
        assert isinstance(entry["image"], str) and entry["image"]
        for det in entry["detections"]:
            assert type(det["class_id"]) is int and det["class_id"] >= 0
            values = [det["score"], *(det["bbox"][k] for k in ("cx", "cy", "w", "h"))]
            assert all(math.isfinite(v) and -1e-6 <= v <= 1 + 1e-6 for v in values)


@given(data=st.one_of(st.binary(max_size=300), DOCUMENT.map(lambda d: json.dumps(d).encode())))
@example(data=b"[" * 100_000)  # nested past the recursion limit
@example(data=b'[{"image": "a", "detections": [{"class_id": ' + b"1" * 5000 + b"}]}]")  # an int too long to parse
@example(data=b'[{"image": "a", "detections": [{"class_id": 1, "score": 1' + b"0" * 400 + b"}]}]")  # too big a float
@example(data=b"\xff\xfe[]")  # not UTF-8
@example(data=b'["\\ud800"]')  # a lone surrogate
def test_the_predictions_reader_reads_or_raises_a_predictions_error(scratch, data):
    path = scratch / "predictions.json"
    path.write_bytes(data)
    try:
        preds = load_predictions(path)
    except PredictionsError as e:
        _one_line(e)
        assert str(path) in str(e)
    else:
        _check_predictions(preds)


@given(document=DOCUMENT)
@example(document=[{"image": "a", "detections": [{"class_id": 1, "score": 10**400, "bbox": {}}]}])
def test_validation_of_any_json_value_passes_or_raises_a_predictions_error(document):
    try:
        preds = validate_predictions(document)
    except PredictionsError as e:
        _one_line(e)
    else:
        _check_predictions(preds)
