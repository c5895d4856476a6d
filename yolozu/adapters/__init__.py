"""Adapters by name: ``build_adapter("dummy")`` or ``build_adapter("detector", checkpoint=..., ...)``."""

from __future__ import annotations

from typing import Any, Callable

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


__all__ = ["ADAPTERS", "build_adapter"]
