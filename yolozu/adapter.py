"""Adapters: the bridge between a model and the export flow.

Every adapter predicts. Test-time training needs two optional hooks on top (the YOLOZU contract):

- ``get_model() -> torch.nn.Module``: the module whose tensors TTT adapts;
- ``build_loader(records, *, batch_size) -> Iterable[Tensor]``: preprocessed input batches.

and may say how TTT reads the model's outputs with ``ttt_readout() -> Readout`` (default: the output is
class logits over dim 1, and a reconstruction when MIM asks for one). An adapter with a ``num_classes``
attribute has the dataset's label class ids checked against it by the export. Adapters without the two hooks do
not support TTT; ``require_ttt_hooks`` names the missing one, and ``loader_of`` checks what ``build_loader``
returns.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

Record = Mapping[str, Any]
"""A dataset record: ``{"image": path, "labels": [{"class_id", "cx", "cy", "w", "h"}, ...]}``."""

Prediction = dict
"""``{"image": str, "detections": [{"class_id": int, "score": float, "bbox": {"cx", "cy", "w", "h"}}]}``."""

TTT_HOOKS = ("get_model", "build_loader")


def missing_ttt_hooks(adapter: object) -> list[str]:
    """Names of the TTT hooks ``adapter`` does not implement, in contract order: a hook that is absent, the base
    class's ``build_loader``, or a ``get_model()`` that returns None."""
    missing = []
    for name in TTT_HOOKS:
        hook = getattr(adapter, name, None)
        inherited = getattr(type(adapter), name, None) is getattr(ModelAdapter, name)
        if not callable(hook) or (name == "build_loader" and inherited):
            missing.append(name)
        elif name == "get_model" and hook() is None:
            missing.append(name)
    return missing


def require_ttt_hooks(adapter: object) -> None:
    """Raise ``RuntimeError`` naming the first TTT hook (``get_model``, ``build_loader``) the adapter lacks.

    Args:
      adapter: a YOLOZU adapter.
    Raises:
      RuntimeError: naming the missing hook and what to do."""
    missing = missing_ttt_hooks(adapter)
    if missing:
        raise RuntimeError(
            f"adapter {type(adapter).__name__} has no {missing[0]}(), so it does not support test-time "
            f"training (it needs get_model() and build_loader(records, *, batch_size)); use an adapter that "
            f"implements them, e.g. --adapter detector, or run without --ttt"
        )


def loader_of(adapter: object, records: Sequence[Record], batch_size: int) -> Iterable[Any]:
    """``adapter.build_loader(records, batch_size=batch_size)``, checked: anything that is not an iterable of
    batches (e.g. None, from a hook that forgot to return) is a RuntimeError naming the adapter.

    Args:
      adapter: a YOLOZU adapter.
      records: the records to batch.
      batch_size: images per batch.
    Returns:
      The adapter's loader.
    Raises:
      RuntimeError: the hook returned something else than an iterable."""
    loader = adapter.build_loader(records, batch_size=batch_size)
    if not isinstance(loader, Iterable):
        raise RuntimeError(
            f"adapter {type(adapter).__name__}'s build_loader(records, batch_size={batch_size}) returned "
            f"{type(loader).__name__}, not an iterable of input batches; it must return (or yield) the batches"
        )
    return loader


class ModelAdapter:
    """Base class: ``predict(records)`` returns one prediction per record, in order. ``get_model()`` (default
    None) and ``build_loader(records, *, batch_size)`` (default: an error) are the TTT hooks to override."""

    name = "base"

    def predict(self, records: Sequence[Record]) -> list[Prediction]:
        raise NotImplementedError(f"{type(self).__name__} must implement predict(records)")

    def get_model(self) -> Any:
        """The ``torch.nn.Module`` test-time training adapts; None: this adapter does not support TTT."""
        return None

    def build_loader(self, records: Sequence[Record], *, batch_size: int) -> Any:
        """Preprocessed input batches of ``records``, in order, ``batch_size`` images each."""
        raise NotImplementedError(
            f"{type(self).__name__} has no build_loader(records, *, batch_size): implement it to support TTT"
        )

    def supports_ttt(self) -> bool:
        """True when the adapter implements both ``get_model()`` (not None) and ``build_loader()``."""
        return not missing_ttt_hooks(self)


class DummyAdapter(ModelAdapter):
    """Predicts no detections for every image; has no model, so it does not support TTT."""

    name = "dummy"

    def predict(self, records: Sequence[Record]) -> list[Prediction]:
        return [{"image": str(record["image"]), "detections": []} for record in records]
