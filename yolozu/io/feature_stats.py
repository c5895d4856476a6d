"""Source statistics files: where they live beside a checkpoint, how they are written and read.

A statistics file (``name.align.pt`` beside the checkpoint ``name.pt``) is one torch file holding
``{layer: {"mean", "var", "pooled_mean", "pooled_var": tensor}}`` (``yolozu.functional.feature_stats``), read
weights-only; its JSON sidecar ``name.align.json`` says what they are (layers and their shapes, BatchNorm mode,
data, count, command). Both are written together or not at all (``yolozu.io.commit.write_files``).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Mapping

import torch

from yolozu.io.commit import serialise, write_files

STATS_SUFFIX = ".align.pt"
MAKE_HINT = "make them with `python tools/source_stats.py`"


def stats_path_for(checkpoint: str | Path) -> Path:
    """Where a checkpoint's statistics live.

    Args:
      checkpoint: the checkpoint ``name.pt``.
    Returns:
      ``name.align.pt`` beside it.
    """
    path = Path(checkpoint)
    return path.with_name(path.name.removesuffix(".pt") + STATS_SUFFIX)


def sidecar_path(path: str | Path) -> Path:
    """The JSON sidecar of a statistics file.

    Args:
      path: the statistics file ``name.align.pt``.
    Returns:
      ``name.align.json`` beside it.
    """
    return Path(path).with_suffix(".json")


def save_stats(path: str | Path, stats: Mapping[str, Any], meta: Mapping[str, Any]) -> None:
    """Write statistics and their sidecar, together or not at all, creating missing folders.

    Args:
      path: the statistics file.
      stats: ``{layer: LayerStats}`` (written as CPU tensors).
      meta: what the sidecar says besides the layers and their shapes (BatchNorm mode, data, count, command).
    """
    path = Path(path)
    blob = {name: {k: v.detach().cpu().contiguous() for k, v in s._asdict().items()} for name, s in stats.items()}
    info = {**meta, "layers": list(stats), "shapes": {name: list(s.mean.shape) for name, s in stats.items()}}
    buffer = io.BytesIO()
    torch.save(blob, buffer)
    write_files([(sidecar_path(path), serialise(info, 2)), (path, buffer.getvalue())])  # the file readers load last


def load_tensors(path: str | Path, what: str = "source statistics", hint: str = MAKE_HINT) -> dict[str, Any]:
    """The dict of tensors a torch file holds, read weights-only.

    Args:
      path: the file.
      what: what the file is, for the error message.
      hint: how to get one, for the error message.
    Returns:
      the dict; a missing or foreign file is a ValueError naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{what} file not found: {path}; {hint}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a foreign pickle raises anything
        raise ValueError(f"{path} is not a {what} file ({type(e).__name__}); {hint}") from e
    if not isinstance(blob, dict):
        raise ValueError(f"{path} is not a {what} file (it holds a {type(blob).__name__}); {hint}")
    return blob
