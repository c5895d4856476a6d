"""``Predictor``: an adapter's predictions from explicit tensors, with a chosen BatchNorm normalisation and
optional flip TTA.

Test-time training keeps the adapted weights as plain tensors; predicting with them (and with the
normalisation the adaptation used) needs the adapter's pieces: ``get_model()``, ``load_batch(records)`` and
``decode(output, records)``.

A model whose weights went non-finite (an adaptation that diverged) outputs NaN, which decodes to no detection
at all: indistinguishable from an empty image. The predictor therefore checks every output it decodes and keeps
the images whose output was not finite (``non_finite``), so that a caller can say so instead of writing them
as empty.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import Tensor
from torch.func import vmap

from yolozu.adapter import Prediction, Record, missing_ttt_hooks
from yolozu.bridge import BN_PRIOR, BN_SHRINK, BatchStats, make_apply
from yolozu.functional.state import Params, combine, extract, tree_map
from yolozu.inference.flip import FlipTTAConfig, merge_flip

PREDICT_HOOKS = ("get_model", "load_batch", "decode")

NON_FINITE = "non-finite model outputs"
"""How the warning about images whose model output was not finite begins (``non_finite_warning``)."""


def missing_predict_hooks(adapter: object) -> list[str]:
    """The hooks of ``PREDICT_HOOKS`` the adapter lacks."""
    return [name for name in PREDICT_HOOKS if not callable(getattr(adapter, name, None))]


def finite_per_image(output: Any, n: int) -> list[bool]:
    """For each of the ``n`` images of a batch, whether every floating value of ``output`` (a tensor, or dicts and
    sequences of them, batch first) is finite; a tensor without the batch dimension counts for every image."""
    flags = [True] * n
    if n == 0:
        return flags
    if isinstance(output, Tensor):
        if output.is_floating_point():
            per = output.reshape(n, -1) if output.dim() and output.shape[0] == n else output.reshape(1, -1)
            ok = torch.isfinite(per).all(dim=1).tolist()
            flags = ok if len(ok) == n else ok * n
    elif isinstance(output, dict):
        flags = [all(f) for f in zip(flags, *(finite_per_image(v, n) for v in output.values()))]
    elif isinstance(output, (list, tuple)):
        flags = [all(f) for f in zip(flags, *(finite_per_image(v, n) for v in output))]
    return flags


def non_finite_tensors(module: torch.nn.Module) -> list[str]:
    """The names of ``module``'s floating parameters and buffers that hold a NaN or an infinity (a corrupt or
    diverged checkpoint: its outputs would be NaN, which decodes to no detection at all)."""
    tensors = [*module.named_parameters(), *module.named_buffers()]
    return [name for name, t in tensors if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def non_finite_warning(images: Sequence[str], total: int) -> str:
    """The report's warning for the ``images`` (of ``total``) whose model output was not finite."""
    shown = ", ".join(images[:3]) + (" ..." if len(images) > 3 else "")
    return (
        f"{NON_FINITE} on {len(images)} of {total} images ({shown}): the weights they were predicted with are not "
        "finite, so their predictions are empty"
    )


def chunks(records: Sequence[Record], size: int) -> Iterator[Sequence[Record]]:
    """Consecutive slices of ``records`` of at most ``size``."""
    for start in range(0, len(records), size):
        yield records[start : start + size]


class Predictor:
    """Decoded predictions of ``adapter`` for given params and buffers (default: the model's own), normalised
    with BatchNorm mode ``bn``: ``eval``, the stored running statistics, ``batch``, the statistics of the test
    batch (nothing updated; ``batch_stats``, a ``bridge.BatchStats`` hook, gives them: e.g. every rank's batch),
    ``mix``, the stored ones as a prior of ``bn_prior`` images mixed with the batch's, or ``shrink``, the batch's
    soft-thresholded towards the stored ones at ``bn_shrink`` standard errors (``step.BN_MODES``)."""

    def __init__(
        self,
        adapter: object,
        *,
        tta: FlipTTAConfig | None = None,
        batch_stats: BatchStats | None = None,
        bn_prior: float = BN_PRIOR,
        bn_shrink: float = BN_SHRINK,
    ) -> None:
        missing = missing_predict_hooks(adapter)
        if missing:
            raise RuntimeError(
                f"adapter {type(adapter).__name__} has no {missing[0]}(); predicting with adapted weights or "
                f"flip TTA needs {', '.join(h + '()' for h in PREDICT_HOOKS)}"
            )
        self.adapter = adapter
        self.model = adapter.get_model()
        self.tta = tta
        self._norms = {"bn_prior": bn_prior, "bn_shrink": bn_shrink}
        self._apply = make_apply(self.model, batch_stats=batch_stats, **self._norms)
        self.non_finite: list[str] = []
        """Images whose model output had a non-finite value, in prediction order (each once)."""
        self._non_finite_seen: set[str] = set()

    def using(self, batch_stats: BatchStats) -> "Predictor":
        """This predictor with its BatchNorm batch statistics from ``batch_stats`` instead (e.g. a shared model's
        hooks for a padding batch); the images it finds non-finite are noted in this one's list.

        Args:
          batch_stats: the ``bridge.BatchStats`` hook.
        Returns:
          The sibling ``Predictor``.
        """
        sibling = copy.copy(self)
        sibling._apply = make_apply(self.model, batch_stats=batch_stats, **self._norms)
        return sibling

    def module_tensors(self) -> tuple[Params, Params]:
        """Copies of the model's current parameters and buffers."""
        return extract(self.model)

    def decode(self, output: Any, records: Sequence[Record]) -> list[Prediction]:
        """The adapter's decoding of ``output`` for ``records``, noting the images whose output is not finite."""
        for record, ok in zip(records, finite_per_image(output, len(records))):
            image = str(record["image"])
            if not ok and image not in self._non_finite_seen:
                self._non_finite_seen.add(image)
                self.non_finite.append(image)
        return self.adapter.decode(output, records)

    def _decoded(self, forward: Callable[[Tensor], Any], x: Tensor, records: Sequence[Record]) -> list[Prediction]:
        with torch.no_grad():
            preds = self.decode(forward(x), records)
            flips = [self.tta is not None and self.tta.flips(str(record["image"])) for record in records]
            if not any(flips):
                return preds
            # the whole batch is mirrored, so batch statistics are the same whichever images the draw picked
            flipped = self.decode(forward(torch.flip(x, dims=(-1,))), records)
        return [
            {"image": p["image"], "detections": merge_flip(p["detections"], f["detections"], self.tta)} if flip else p
            for p, f, flip in zip(preds, flipped, flips)
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

    def _input_batches(self, records: Sequence[Record], batch_size: int) -> Iterable[Tensor]:
        """The adapter's ``build_loader`` when it has one (its loading processes, e.g. ``--workers``), else
        ``load_batch`` of each chunk."""
        if "build_loader" in missing_ttt_hooks(self.adapter):
            return (self.adapter.load_batch(chunk) for chunk in chunks(records, batch_size))
        return self.adapter.build_loader(records, batch_size=batch_size)

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
        for chunk, x in zip(chunks(records, batch_size), self._input_batches(records, batch_size)):
            out.extend(self.predict_batch(x, chunk, params, buffers, bn))
            if progress is not None:
                progress.update(len(chunk))
        return out
