"""Adapters by name: ``build_adapter("dummy")``, ``build_adapter("detector", checkpoint=..., ...)``,
``build_adapter("torchvision", model="fasterrcnn_resnet50_fpn", checkpoint=...)``, a name an installed package
registers in the entry-point group ``yolozu.adapters``, or ``build_adapter("package.module:factory", ...)``
(``yolozu.adapters.plugins``)."""

from __future__ import annotations

from typing import Any, Callable

import torch

from yolozu.adapter import DummyAdapter, ModelAdapter
from yolozu.adapters import plugins


class UnknownAdapterError(ValueError):
    """An adapter name that is neither built in, nor installed, nor a ``package.module:factory``."""


def _detector(**kwargs: Any) -> ModelAdapter:
    from yolozu.adapters.detector import DetectorAdapter

    return DetectorAdapter(**kwargs)


def _torchvision(*, model: str | None = None, checkpoint: str | None = None, **kwargs: Any) -> ModelAdapter:
    from yolozu.adapters.tv_adapter import TorchvisionAdapter
    from yolozu.adapters.tv_models import SUPPORTED

    if not model or not checkpoint:
        raise ValueError(
            "the torchvision adapter needs model=NAME and checkpoint=FILE (--model, --checkpoint); models: "
            + ", ".join(SUPPORTED)
        )
    options = {key: kwargs.pop(key) for key in ("num_classes", "frozen_bn_eps", "model_kwargs") if key in kwargs}
    return TorchvisionAdapter.from_checkpoint(model, checkpoint, **options, **kwargs)


def _dummy(**kwargs: Any) -> ModelAdapter:
    if kwargs:
        raise TypeError(f"the dummy adapter takes no options, got {', '.join(sorted(kwargs))}")
    return DummyAdapter()


ADAPTERS: dict[str, Callable[..., ModelAdapter]] = {
    "dummy": _dummy,
    "detector": _detector,
    "torchvision": _torchvision,
}


def adapter_names() -> list[str]:
    """The built-in adapters and those installed packages register, sorted."""
    return sorted(set(ADAPTERS) | set(plugins.installed()))


def adapter_factory(name: str) -> Callable[..., Any]:
    """The factory of adapter ``name``: built in, installed (entry point) or ``package.module:factory``.

    Raises:
      UnknownAdapterError: no such adapter (the message lists them); PluginError: a plug-in that fails to load.
    """
    if name in ADAPTERS:
        return ADAPTERS[name]
    if plugins.is_spec(name):
        return plugins.load_spec(name)
    entry = plugins.installed().get(name)
    if entry is None:
        raise UnknownAdapterError(
            f"unknown adapter {name!r}; choose one of: {', '.join(adapter_names())}, or package.module:factory"
        )
    return plugins.load_entry_point(entry)


def build_adapter(name: str, **kwargs: Any) -> ModelAdapter:
    """The adapter called ``name`` (``adapter_factory``) built with ``kwargs``; a plug-in must return an object
    with ``predict``, and whatever its factory raises is a PluginError naming it."""
    if name in ADAPTERS:
        return ADAPTERS[name](**kwargs)
    return plugins.check_adapter(plugins.call_factory(adapter_factory(name), name, kwargs), name)


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


__all__ = ["ADAPTERS", "UnknownAdapterError", "adapter_factory", "adapter_names", "build_adapter", "parse_device"]
