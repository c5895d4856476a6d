"""Checkpoint files: ``{"config": architecture kwargs, "state_dict": tensors}``, loadable with weights_only=True."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from yolozu.models.detector import CenterNetDetector

DEFAULT_CHECKPOINT = Path(__file__).resolve().parent / "checkpoints" / "detector.pt"
"""The committed detector trained by ``make train`` (its training record: ``detector.json`` beside it)."""


def build_detector(config: dict[str, Any] | None = None) -> CenterNetDetector:
    """A freshly initialised detector from architecture kwargs (defaults when None)."""
    config = dict(config or {})
    if "widths" in config:
        config["widths"] = tuple(config["widths"])
    return CenterNetDetector(**config)


def save_detector(model: CenterNetDetector, path: str | Path) -> None:
    """Write ``model``'s config and state dict to ``path`` (parent directories are created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    torch.save({"config": dict(model.config), "state_dict": state}, path)


def load_detector(path: str | Path | None = None, *, device: str | torch.device = "cpu") -> CenterNetDetector:
    """Load a detector checkpoint (the committed default when ``path`` is None), in eval mode.

    A file that is not a detector checkpoint (not a torch file, another object, weights of another
    architecture) is a ValueError naming it; a missing file is FileNotFoundError."""
    path = Path(path) if path is not None else DEFAULT_CHECKPOINT
    if path.exists() and not path.is_file():
        kind = "a folder" if path.is_dir() else "not a regular file (a device, a FIFO or a socket)"
        raise ValueError(f"{path} is not a detector checkpoint: it is {kind}; give a checkpoint file")
    if not path.is_file():
        hint = " (run `make train` to create the default checkpoint)" if path == DEFAULT_CHECKPOINT else ""
        raise FileNotFoundError(f"detector checkpoint not found: {path}{hint}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as e:  # unpickling garbage raises anything: UnpicklingError, KeyError, EOFError, RuntimeError
        raise ValueError(f"{path} is not a detector checkpoint: torch.load cannot read it ({type(e).__name__})") from e
    if not isinstance(blob, dict) or "config" not in blob or "state_dict" not in blob:
        raise ValueError(f"{path} is not a detector checkpoint: expected a dict with 'config' and 'state_dict'")
    try:
        model = build_detector(blob["config"])
        model.load_state_dict(blob["state_dict"])
    except (TypeError, ValueError, RuntimeError, OverflowError, MemoryError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path} is not a usable detector checkpoint: {first}") from e
    return model.to(device).eval()
