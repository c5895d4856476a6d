"""What the command-line failure tests share: a one-image dataset, an old output to keep, and a run of
``yolozu`` that reports an exception escaping ``main`` instead of ending the test session."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from yolozu.cli import main as cli

OLD = b'["the previous run"]\n'
"""The bytes of an earlier run's output, which a failed run must leave as they are."""


def blank_dataset(root: Path, stems: tuple[str, ...] = ("0", "1"), label: str = "1 0.5 0.5 0.2 0.2") -> Path:
    """A YOLO-layout dataset at ``root``: split ``val`` of one 8x8 black image ``<stem>.png`` per stem, each with
    the one label line ``label`` in ``<stem>.txt``."""
    (root / "images" / "val").mkdir(parents=True)
    (root / "labels" / "val").mkdir(parents=True)
    for stem in stems:
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "images" / "val" / f"{stem}.png")
        (root / "labels" / "val" / f"{stem}.txt").write_text(label + "\n")
    return root


def one_image_dataset(tmp_path: Path) -> Path:
    """``blank_dataset`` of the one image ``a.png`` under ``tmp_path/ds``."""
    return blank_dataset(tmp_path / "ds", stems=("a",))


def run_cli(capsys, *argv: str) -> tuple[int | str, list[str]]:
    """Exit code (or "escaped: <type>" for an exception main let through) and the stderr lines."""
    try:
        code = cli(list(argv))
    except BaseException as e:  # noqa: B036 - a KeyboardInterrupt must not end the test session
        code = f"escaped: {type(e).__name__}"
    return code, capsys.readouterr().err.strip().splitlines()
