"""What the command-line failure tests share: a one-image dataset, an old output to keep, and a run of
``yolozu`` that reports an exception escaping ``main`` instead of ending the test session."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from yolozu.cli import main as cli

OLD = b'["the previous run"]\n'
"""The bytes of an earlier run's output, which a failed run must leave as they are."""


def one_image_dataset(tmp_path: Path) -> Path:
    """A YOLO-layout dataset under ``tmp_path/ds`` with one 8x8 black image and one label in split ``val``."""
    root = tmp_path / "ds"
    (root / "images" / "val").mkdir(parents=True)
    (root / "labels" / "val").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "images" / "val" / "a.png")
    (root / "labels" / "val" / "a.txt").write_text("1 0.5 0.5 0.2 0.2\n")
    return root


def run_cli(capsys, *argv: str) -> tuple[int | str, list[str]]:
    """Exit code (or "escaped: <type>" for an exception main let through) and the stderr lines."""
    try:
        code = cli(list(argv))
    except BaseException as e:  # noqa: B036 - a KeyboardInterrupt must not end the test session
        code = f"escaped: {type(e).__name__}"
    return code, capsys.readouterr().err.strip().splitlines()
