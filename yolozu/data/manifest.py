"""Read a YOLO-layout dataset (``<root>/images/<split>``, ``<root>/labels/<split>``) into a list of records.

Each record is ``{"image": path, "labels": [{"class_id", "cx", "cy", "w", "h"}]}`` with normalised boxes.
Malformed label lines are errors that name the file and line, so a broken dataset fails loudly, not quietly.
"""

from __future__ import annotations

import math
import os
import stat
from pathlib import Path
from typing import Any

__all__ = [
    "ManifestError",
    "build_manifest",
    "SPLIT_ORDER",
    "IMAGE_SUFFIXES",
    "find_split",
    "label_path",
    "dataset_files",
    "parse_label_file",
]

#: Split names tried, in order, when ``build_manifest`` is given no split.
SPLIT_ORDER: tuple[str, ...] = ("val2017", "val", "valid", "validation", "train2017", "train")
IMAGE_SUFFIXES: frozenset[str] = frozenset({".jpg", ".jpeg", ".png"})
_HINT = "run `make demo-data` to make the demo dataset under data/demo, or pass the root of a YOLO-layout dataset"


class ManifestError(ValueError):
    """A dataset that cannot be read: missing folders, no images, or a malformed label line."""


def _check_root(root: Path) -> None:
    if root.exists() and not root.is_dir():
        raise ManifestError(f"dataset root {root} is a file, not a folder; pass the folder that holds images/<split>")
    if not root.is_dir():
        raise ManifestError(f"dataset root {root} does not exist; {_HINT}")


def find_split(root: str | os.PathLike) -> str:
    """The first split of ``SPLIT_ORDER`` that exists under ``<root>/images/``."""
    _check_root(Path(root))
    images = Path(root) / "images"
    for name in SPLIT_ORDER:
        if (images / name).is_dir():
            return name
    raise ManifestError(
        f"no split found under {images}: looked for {', '.join(SPLIT_ORDER)}; pass --split NAME (split= in Python) "
        f"or {_HINT}"
    )


def _cut(text: str, limit: int = 60) -> str:
    """``text`` for an error message, cut to ``limit`` characters (a corrupt line can be megabytes)."""
    text = text.strip()
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _shown(text: str) -> str:
    return repr(_cut(text))


def _parse_line(where: str, line: str, num_classes: int | None, show: bool = True) -> dict[str, Any]:
    """One label line; ``show=False`` keeps the line's text out of the error (a file from outside the dataset,
    reached through a symbolic link, may be anything: its content is not for an error message to echo)."""
    if not show:
        try:
            return _parse_line(where, line, num_classes)
        except ManifestError:
            raise ManifestError(
                f"{where}: not a label line 'class cx cy w h' (its text is not shown: the file is outside the "
                "dataset, reached through a symbolic link)"
            ) from None
    fields = line.split()
    if len(fields) != 5:
        raise ManifestError(f"{where}: expected 5 fields 'class cx cy w h', got {len(fields)}: {_shown(line)}")
    try:
        values = [float(f) for f in fields]
    except ValueError:
        raise ManifestError(f"{where}: non-numeric field in {_shown(line)}") from None
    cls = values[0]
    if not math.isfinite(cls) or cls != int(cls) or cls < 0:
        raise ManifestError(f"{where}: class id must be a non-negative integer, got {_shown(fields[0])}")
    if num_classes is not None and cls >= num_classes:
        raise ManifestError(
            f"{where}: class id {int(cls)} is beyond the model's {num_classes} classes (0 to {num_classes - 1}); "
            "these labels are for another model or the file is corrupt"
        )
    for name, text, v in zip(("cx", "cy", "w", "h"), fields[1:], values[1:]):
        if not (0.0 <= v <= 1.0):  # also rejects nan
            raise ManifestError(f"{where}: {name}={_cut(text)} is outside [0, 1]")
    return {"class_id": int(cls), "cx": values[1], "cy": values[2], "w": values[3], "h": values[4]}


def parse_label_file(
    path: str | os.PathLike, num_classes: int | None = None, *, show: bool = True
) -> list[dict[str, Any]]:
    """Labels of one YOLO label file; blank lines are skipped, anything else malformed (a bad field, a class id
    of ``num_classes`` or more when given, text that is not UTF-8) raises ManifestError naming the file and line
    (``show=False``: without quoting the line)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ManifestError(f"cannot read the label file {path}: {e.strerror or e}") from None
    out = []
    for lineno, raw in enumerate(data.splitlines(), start=1):
        where = f"{path}:{lineno}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ManifestError(f"{where}: not UTF-8 text (byte {e.start} of the line); a label file is text") from None
        if line.strip():
            out.append(_parse_line(where, line, num_classes, show))
    return out


def _check_split_name(split: str) -> None:
    """A split is a folder under ``images/`` and ``labels/``: an absolute path or ``..`` would read (and make an
    input of) files outside the dataset root."""
    parts = Path(split).parts
    if not split or Path(split).is_absolute() or ".." in parts:
        raise ManifestError(f"split {split!r} must be a folder name under the dataset's images/ (not an absolute "
                            "path, no '..'); pass --split NAME")


def label_path(root: str | os.PathLike, split: str, image: str | os.PathLike) -> Path:
    """The label file of ``<root>/images/<split>/<name>``: ``<root>/labels/<split>/<stem>.txt``."""
    return Path(root) / "labels" / split / (Path(image).stem + ".txt")


def build_manifest(
    root: str | os.PathLike, split: str | None = None, *, num_classes: int | None = None
) -> list[dict[str, Any]]:
    """Records ``{"image": str, "labels": [...]}`` for every image of a split, sorted by image path.

    With ``split=None`` the first existing of ``SPLIT_ORDER`` is used. An image without a label file has no
    labels; ``num_classes`` (the model's) makes a larger class id an error. Raises ManifestError for a missing
    root or split, a root that is a file, a split without images, or a bad label line.
    """
    root = Path(root)
    _check_root(root)
    if split is None:
        split = find_split(root)
    _check_split_name(split)
    img_dir = root / "images" / split
    if not img_dir.is_dir():
        raise ManifestError(f"split {split!r} not found: {img_dir} is not a folder; {_HINT}")
    images = sorted(p for p in img_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise ManifestError(f"no images (.jpg, .jpeg, .png) in {img_dir}; {_HINT}")
    records = []
    inside = os.path.realpath(root)
    for img in images:
        lbl = label_path(root, split, img)
        show = os.path.commonpath([inside, os.path.realpath(lbl)]) == inside
        labels = parse_label_file(lbl, num_classes, show=show) if _label_exists(lbl) else []
        records.append({"image": str(img), "labels": labels})
    return records


def _label_exists(path: Path) -> bool:
    """Whether the label file ``path`` is there: False when nothing has its name (an image without objects);
    anything there that is not a regular file (a folder, a symbolic link to nothing, a FIFO, a device) is a
    ManifestError, since counting it as "no objects" would silently change the metrics."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        if os.path.islink(path):
            raise ManifestError(
                f"label file {path} is a symbolic link to {os.readlink(path)!r}, which does not exist; fix or "
                "remove the link"
            ) from None
        return False
    except OSError as e:
        raise ManifestError(f"cannot read the label file {path}: {e.strerror or e}") from None
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "not a regular file (a FIFO, a device or a socket)"
        raise ManifestError(f"label file {path} is {kind}; a label file is a text file: fix or remove it")
    return True


def dataset_files(root: str | os.PathLike, split: str, records: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """The files a run reads from a dataset split, images and label files, as ``(what, path)`` pairs (what an
    output must never replace)."""
    files = []
    for record in records:
        files.append(("an image of the dataset", str(record["image"])))
        files.append(("a label file of the dataset", str(label_path(root, split, record["image"]))))
    return files
