"""Adapters by name: ``build_adapter("dummy")`` or ``build_adapter("detector", checkpoint=..., ...)``."""

from __future__ import annotations

from typing import Any, Callable

import torch

from yolozu.adapter import DummyAdapter, ModelAdapter


def _detector(**kwargs: Any) -> ModelAdapter:
    from yolozu.adapters.detector import DetectorAdapter

    return DetectorAdapter(**kwargs)


def _dummy(**kwargs: Any) -> ModelAdapter:
    if kwargs:
        raise TypeError(f"the dummy adapter takes no options, got {', '.join(sorted(kwargs))}")
    return DummyAdapter()


ADAPTERS: dict[str, Callable[..., ModelAdapter]] = {"dummy": _dummy, "detector": _detector}


def build_adapter(name: str, **kwargs: Any) -> ModelAdapter:
    """The adapter called ``name`` built with ``kwargs``; an unknown name is a ValueError listing the choices."""
    try:
        factory = ADAPTERS[name]
    except KeyError:
        raise ValueError(f"unknown adapter {name!r}; choose one of: {', '.join(sorted(ADAPTERS))}") from None
    return factory(**kwargs)


def parse_device(name: str) -> torch.device:
    """The device ``name`` (``cpu`` or ``cuda[:N]``) if this machine has it; else a ValueError that begins with
    the name and says what to use."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"{name!r} is not a device; use cpu or cuda[:N]") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"{name}: only cpu and cuda[:N] are supported")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{name}: this machine has no CUDA device (or torch is a CPU build); use cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"{name}: this machine has {torch.cuda.device_count()} CUDA device(s), cuda:0 and up")
    return device


__all__ = ["ADAPTERS", "build_adapter", "parse_device"]
