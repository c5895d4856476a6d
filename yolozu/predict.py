"""``Predictor``: an adapter's predictions from explicit tensors, with a chosen BatchNorm normalisation and
optional flip TTA.

Test-time training keeps the adapted weights as plain tensors; predicting with them (and with the
normalisation the adaptation used) needs the adapter's pieces: ``get_model()``, ``load_batch(records)`` and
``decode(output, records)``.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor
from torch.func import vmap

from yolozu.adapter import Prediction, Record
from yolozu.bridge import make_apply
from yolozu.flip_tta import FlipTTAConfig, merge_flip
from yolozu.functional.state import Params, combine, extract, tree_map

PREDICT_HOOKS = ("get_model", "load_batch", "decode")


def missing_predict_hooks(adapter: object) -> list[str]:
    """The hooks of ``PREDICT_HOOKS`` the adapter lacks."""
    return [name for name in PREDICT_HOOKS if not callable(getattr(adapter, name, None))]


def chunks(records: Sequence[Record], size: int) -> Iterator[Sequence[Record]]:
    """Consecutive slices of ``records`` of at most ``size``."""
    for start in range(0, len(records), size):
        yield records[start : start + size]


class Predictor:
    """Decoded predictions of ``adapter`` for given params and buffers (default: the model's own), normalised
    with BatchNorm mode ``bn``: ``eval``, the stored running statistics, or ``batch``, the statistics of the test
    batch (nothing updated)."""

    def __init__(self, adapter: object, *, tta: FlipTTAConfig | None = None) -> None:
        missing = missing_predict_hooks(adapter)
        if missing:
            raise RuntimeError(
                f"adapter {type(adapter).__name__} has no {missing[0]}(); predicting with adapted weights or "
                f"flip TTA needs {', '.join(h + '()' for h in PREDICT_HOOKS)}"
            )
        self.adapter = adapter
        self.model = adapter.get_model()
        self.tta = tta
        self._apply = make_apply(self.model)

    def module_tensors(self) -> tuple[Params, Params]:
        """Copies of the model's current parameters and buffers."""
        return extract(self.model)

    def _decoded(self, forward: Callable[[Tensor], Any], x: Tensor, records: Sequence[Record]) -> list[Prediction]:
        with torch.no_grad():
            preds = self.adapter.decode(forward(x), records)
            if self.tta is None:
                return preds
            flipped = self.adapter.decode(forward(torch.flip(x, dims=(-1,))), records)
        return [
            {"image": p["image"], "detections": merge_flip(p["detections"], f["detections"], self.tta)}
            for p, f in zip(preds, flipped)
        ]

    def predict_batch(
        self, x: Tensor, records: Sequence[Record], params: Params, buffers: Params, bn: str = "eval"
    ) -> list[Prediction]:
        """Predictions for one preprocessed batch ``x`` of ``records``."""
        apply = self._apply
        return self._decoded(lambda inputs: apply(params, buffers, inputs, bn_mode=bn)[0], x, records)

    def predict_streams(
        self,
        xs: Tensor,
        records: Sequence[Record],
        trainable: Params,
        frozen: Params,
        buffers: Params,
        bn: str = "eval",
    ) -> list[Prediction]:
        """Predictions of K adapted streams in one vmapped forward: ``xs`` is ``(K, 1, C, H, W)`` (one image per
        stream), ``trainable`` and ``buffers`` are stacked per stream, ``frozen`` is shared."""
        apply = self._apply

        def one(tr: Params, buf: Params, x: Tensor) -> Any:
            return apply(combine(frozen, tr), buf, x, bn_mode=bn)[0]

        def forward(inputs: Tensor) -> Any:
            return tree_map(lambda t: t.flatten(0, 1), vmap(one)(trainable, buffers, inputs))

        return self._decoded(forward, xs, records)

    def predict(
        self,
        records: Sequence[Record],
        *,
        params: Params | None = None,
        buffers: Params | None = None,
        bn: str = "eval",
        batch_size: int = 32,
        progress=None,
    ) -> list[Prediction]:
        """Predictions for every record, in order, ``batch_size`` images per forward pass."""
        if params is None or buffers is None:
            params, buffers = self.module_tensors()
        out: list[Prediction] = []
        for chunk in chunks(records, batch_size):
            out.extend(self.predict_batch(self.adapter.load_batch(chunk), chunk, params, buffers, bn))
            if progress is not None:
                progress.update(len(chunk))
        return out
