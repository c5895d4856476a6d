"""YOLO manifest parsing: good files, each kind of malformed line, missing labels, split auto-detection."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from yolozu.data import ManifestError, build_manifest
from yolozu.data.manifest import SPLIT_ORDER


def _image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(path)


def _dataset(root: Path, split: str = "val", labels: dict[str, str] | None = None, images=("a.png",)) -> Path:
    for name in images:
        _image(root / "images" / split / name)
    for stem, text in (labels or {}).items():
        p = root / "labels" / split / f"{stem}.txt"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return root


def test_good_manifest_sorted_with_labels_and_missing_label_file(tmp_path):
    root = _dataset(
        tmp_path,
        images=("b.jpg", "a.png", "c.jpeg"),
        labels={"a": "3 0.5 0.25 0.1 0.2\n\n7 0 1 1 0.000001\n", "c": ""},
    )
    (root / "images" / "val" / "notes.txt").write_text("not an image")
    recs = build_manifest(root, "val")
    assert [Path(r["image"]).name for r in recs] == ["a.png", "b.jpg", "c.jpeg"]
    assert recs[0]["labels"] == [
        {"class_id": 3, "cx": 0.5, "cy": 0.25, "w": 0.1, "h": 0.2},
        {"class_id": 7, "cx": 0.0, "cy": 1.0, "w": 1.0, "h": 0.000001},
    ]
    assert isinstance(recs[0]["labels"][0]["class_id"], int)
    assert recs[1]["labels"] == []  # no label file
    assert recs[2]["labels"] == []  # empty label file


def test_integer_valued_float_class_id_is_accepted(tmp_path):
    root = _dataset(tmp_path, labels={"a": "2.0 0.5 0.5 0.1 0.1\n"})
    assert build_manifest(root, "val")[0]["labels"][0]["class_id"] == 2


@pytest.mark.parametrize(
    "line, what",
    [
        ("0 0.5 0.5 0.1", "expected 5 fields"),
        ("0 0.5 0.5 0.1 0.1 0.9", "expected 5 fields"),
        ("cat 0.5 0.5 0.1 0.1", "non-numeric"),
        ("0 0.5 abc 0.1 0.1", "non-numeric"),
        ("-1 0.5 0.5 0.1 0.1", "non-negative integer"),
        ("1.5 0.5 0.5 0.1 0.1", "non-negative integer"),
        ("nan 0.5 0.5 0.1 0.1", "non-negative integer"),
        ("0 1.5 0.5 0.1 0.1", "cx=1.5 is outside [0, 1]"),
        ("0 0.5 -0.2 0.1 0.1", "cy=-0.2 is outside [0, 1]"),
        ("0 0.5 0.5 1.01 0.1", "w=1.01 is outside [0, 1]"),
        ("0 0.5 0.5 0.1 nan", "h=nan is outside [0, 1]"),
    ],
)
def test_malformed_line_names_file_line_and_problem(tmp_path, line, what):
    root = _dataset(tmp_path, labels={"a": f"1 0.5 0.5 0.1 0.1\n{line}\n"})
    with pytest.raises(ManifestError) as info:
        build_manifest(root, "val")
    msg = str(info.value)
    assert str(root / "labels" / "val" / "a.txt") + ":2:" in msg
    assert what in msg
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("first", range(len(SPLIT_ORDER)))
def test_split_autodetection_order(tmp_path, first):
    for split in SPLIT_ORDER[first:]:
        _image(tmp_path / "images" / split / "x.png")
    _image(tmp_path / "images" / "test" / "x.png")  # never picked automatically
    recs = build_manifest(tmp_path)
    assert Path(recs[0]["image"]).parent.name == SPLIT_ORDER[first]


def test_no_split_found_is_an_error(tmp_path):
    _image(tmp_path / "images" / "test" / "x.png")
    with pytest.raises(ManifestError, match="no split found.*make demo-data"):
        build_manifest(tmp_path)


def test_missing_root_split_or_images_are_clear_errors(tmp_path):
    with pytest.raises(ManifestError, match=r"does not exist.*make demo-data"):
        build_manifest(tmp_path / "nope")
    root = _dataset(tmp_path / "d", split="train")
    with pytest.raises(ManifestError, match=r"split 'val' not found.*images/val"):
        build_manifest(root, "val")
    (root / "images" / "val").mkdir()
    (root / "images" / "val" / "readme.txt").write_text("x")
    with pytest.raises(ManifestError, match=r"no images .* in .*images/val.*make demo-data"):
        build_manifest(root, "val")
