"""Adapters: the bridge between a model and the export flow.

Every adapter predicts. Test-time training needs two optional hooks on top (the YOLOZU contract):

- ``get_model() -> torch.nn.Module``: the module whose tensors TTT adapts;
- ``build_loader(records, *, batch_size) -> Iterable[Tensor]``: preprocessed input batches.

and may say how TTT reads the model's outputs with ``ttt_readout() -> Readout`` (default: the output is
class logits over dim 1, and a reconstruction when MIM asks for one). An adapter with a ``num_classes``
attribute has the dataset's label class ids checked against it by the export. Adapters without the two hooks do
not support TTT; ``run_ttt`` says which hook is missing.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

Record = Mapping[str, Any]
"""A dataset record: ``{"image": path, "labels": [{"class_id", "cx", "cy", "w", "h"}, ...]}``."""

Prediction = dict
"""``{"image": str, "detections": [{"class_id": int, "score": float, "bbox": {"cx", "cy", "w", "h"}}]}``."""

TTT_HOOKS = ("get_model", "build_loader")


def missing_ttt_hooks(adapter: object) -> list[str]:
    """Names of the TTT hooks ``adapter`` does not implement, in contract order."""
    return [name for name in TTT_HOOKS if not callable(getattr(adapter, name, None))]


class ModelAdapter:
    """Base class: ``predict(records)`` returns one prediction per record, in order."""

    name = "base"

    def predict(self, records: Sequence[Record]) -> list[Prediction]:
        raise NotImplementedError(f"{type(self).__name__} must implement predict(records)")

    def supports_ttt(self) -> bool:
        """True when the adapter implements both ``get_model()`` and ``build_loader()``."""
        return not missing_ttt_hooks(self)


class DummyAdapter(ModelAdapter):
    """Predicts no detections for every image; has no model, so it does not support TTT."""

    name = "dummy"

    def predict(self, records: Sequence[Record]) -> list[Prediction]:
        return [{"image": str(record["image"]), "detections": []} for record in records]
