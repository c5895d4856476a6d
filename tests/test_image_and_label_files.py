"""Images and label files read as what they are, or refused with one line: a 16-bit PNG at its true bit depth (the
same detections as its 8-bit copy, not a white image), a decompression bomb refused by export and eval, a label
path that is a folder, a dangling symbolic link or a FIFO an error rather than "no objects"."""

from __future__ import annotations

import json
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from yolozu.cli import main as cli
from yolozu.demo.synth import SynthSpec, write_split

OLD = b'["the previous run"]\n'
EXPORT = ("export", "--adapter", "detector", "--quiet", "--workers", "0", "--split", "val")


def _run(capsys, *argv: str) -> tuple[int | str, list[str], str]:
    try:
        code = cli(list(argv))
    except BaseException as e:  # noqa: B036 - report what escaped instead of ending the session
        code = f"escaped: {type(e).__name__}"
    captured = capsys.readouterr()
    return code, captured.err.strip().splitlines(), captured.out


def _grey_copies(tmp_path: Path) -> tuple[Path, Path]:
    """The same synthetic val split twice in greyscale: 8-bit PNGs, and 16-bit PNGs of the values x 257."""
    write_split(tmp_path / "rgb", "val", 2, seed=5, spec=SynthSpec(image_size=160))
    roots = (tmp_path / "grey8", tmp_path / "grey16")
    for root in roots:
        shutil.copytree(tmp_path / "rgb", root)
    for image in sorted((tmp_path / "rgb" / "images" / "val").glob("*.png")):
        grey = np.asarray(Image.open(image).convert("L"))
        Image.fromarray(grey, mode="L").save(roots[0] / "images" / "val" / image.name)
        Image.fromarray(grey.astype(np.uint16) * 257).save(roots[1] / "images" / "val" / image.name)
        assert Image.open(roots[1] / "images" / "val" / image.name).mode.startswith("I")  # really 16-bit
    return roots


def test_a_16_bit_png_gives_the_detections_of_its_8_bit_copy(tmp_path, capsys):
    detections = []
    for root in _grey_copies(tmp_path):
        out = tmp_path / f"{root.name}.json"
        code, err, _ = _run(capsys, *EXPORT, "--dataset", str(root), "--output", str(out))
        assert code == 0, err
        detections.append([entry["detections"] for entry in json.loads(out.read_text())])
    assert detections[0] == detections[1]
    assert max(d["score"] for dets in detections[0] for d in dets) > 0.3  # the images are not blank to the model


def _png_bomb(path: Path, side: int = 40000) -> None:
    """A PNG whose header announces ``side`` x ``side`` pixels (1.6 G) in a file of a few dozen bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    body = zlib.compress(b"\0" * 64)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b""))


@pytest.fixture()
def dataset(tmp_path) -> Path:
    root = tmp_path / "ds"
    (root / "images" / "val").mkdir(parents=True)
    (root / "labels" / "val").mkdir(parents=True)
    for name in ("a", "b"):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "images" / "val" / f"{name}.png")
        (root / "labels" / "val" / f"{name}.txt").write_text("1 0.5 0.5 0.2 0.2\n")
    return root


@pytest.mark.parametrize("command", ["export", "eval"])
def test_a_decompression_bomb_is_refused_with_one_line(tmp_path, dataset, capsys, command):
    _png_bomb(dataset / "images" / "val" / "b.png")
    out = tmp_path / "out.json"
    out.write_bytes(OLD)
    preds = tmp_path / "p.json"
    preds.write_text(json.dumps([{"image": str(dataset / "images" / "val" / n), "detections": []}
                                 for n in ("a.png", "b.png")]))
    if command == "export":
        code, err, _ = _run(capsys, *EXPORT, "--dataset", str(dataset), "--output", str(out))
    else:
        code, err, _ = _run(capsys, "eval", "--dataset", str(dataset), "--split", "val", "--predictions", str(preds),
                            "--output", str(out))
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith("error: refusing image") and "b.png" in err[0] and "decompression bomb" in err[0]
    assert out.read_bytes() == OLD


def _break_label(label: Path, kind: str) -> None:
    label.unlink()
    if kind == "folder":
        label.mkdir()
    elif kind == "dangling link":
        label.symlink_to(label.parent / "nowhere.txt")
    else:
        os.mkfifo(label)


@pytest.mark.parametrize("kind", ["folder", "dangling link", "fifo"])
def test_eval_refuses_a_label_path_that_is_not_a_regular_file(tmp_path, dataset, capsys, kind):
    preds = tmp_path / "p.json"
    preds.write_text(json.dumps([
        {"image": str(dataset / "images" / "val" / n),
         "detections": [{"class_id": 1, "score": 0.9, "bbox": {"cx": 0.5, "cy": 0.5, "w": 0.2, "h": 0.2}}]}
        for n in ("a.png", "b.png")
    ]))
    label = dataset / "labels" / "val" / "b.txt"
    _break_label(label, kind)
    out = tmp_path / "report.json"
    out.write_bytes(OLD)
    code, err, stdout = _run(capsys, "eval", "--dataset", str(dataset), "--split", "val", "--predictions", str(preds),
                             "--output", str(out))
    assert code == 1 and len(err) == 1 and stdout == ""
    assert err[0].startswith(f"error: label file {label} is ")
    assert out.read_bytes() == OLD
