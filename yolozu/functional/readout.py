"""Readout: how test-time training reads a model's outputs as class distributions and reconstructions.

A classifier returns logits ``(B, C)``: each row is one class distribution; a set predictor (DETR) returns ``(B, Q,
C)`` or a dict with ``logits``/``pred_logits``/``pred`` (YOLOZU's convention: classes on the last dim). A dense
detector returns maps ``(B, C, H, W)`` that are mostly confident background; the objects' class distributions sit at
the heatmap's peaks, which ``peak_class_logits`` gathers. The methods never look inside an output: they call the
readout, which each adapter supplies (``adapter.ttt_readout()``) and which defaults to YOLOZU's reading
(``output_logits``, ``output_reconstruction``)."""

from __future__ import annotations

from typing import Any, Callable, Mapping

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor

from yolozu.functional.settings import one_of

SCORE_KINDS = ("softmax", "sigmoid")


LOGIT_KEYS = ("logits", "pred_logits", "pred")
RECON_KEYS = ("recon", "reconstruction")


def _first(output: Mapping[str, Any], keys: tuple[str, ...], what: str) -> Tensor:
    for key in keys:
        if key in output:
            return output[key]
    raise KeyError(f"the model's output has none of the {what} keys {', '.join(keys)}; got {', '.join(output)}")


def output_logits(output: Any) -> Tensor:
    """YOLOZU's reading of a model's output as class logits, classes moved to dim 1: a tensor with classes on
    its last dim, or a dict holding one under ``logits``, ``pred_logits`` or ``pred``.

    Args:
      output: a model's forward output.
    Returns:
      Class logits ``(B, C, ...)``."""
    logits = _first(output, LOGIT_KEYS, "class-logit") if isinstance(output, Mapping) else output
    return logits.movedim(-1, 1) if logits.dim() > 2 else logits


def output_reconstruction(output: Any) -> Tensor:
    """A reconstruction: the output itself, or its ``recon``/``reconstruction`` entry.

    Args:
      output: the output of MIM's reconstructing forward.
    Returns:
      The reconstruction, shaped like the input ``(B, C, H, W)``."""
    return _first(output, RECON_KEYS, "reconstruction") if isinstance(output, Mapping) else output


@attrs.frozen
class Readout:
    """Pure functions from a model's forward output to what each TTT method needs.

    Attributes:
      scores: output -> class logits ``(B, C, ...)``, classes on dim 1 (CoTTA's pseudo-labels); the default
        reads YOLOZU's outputs (``output_logits``).
      score_kind: ``"softmax"`` (one class per sample/position) or ``"sigmoid"`` (independent class scores).
      spatial: True when ``scores`` are dense maps ``(B, C, H, W)`` aligned with the image, so a horizontal
        flip of the input flips them along W.
      samples: output -> the class logits ``(N, C, ...)`` whose entropy Tent minimises; None: ``scores``.
      sample_kind: how ``samples`` become probabilities; None: ``score_kind``.
      recon_kwargs: keyword arguments of the forward pass that makes the model reconstruct its input (MIM).
      recon: output of that forward -> reconstruction, shaped like the input.
      flip_back: output of the horizontally flipped input -> its ``scores`` in the original image's frame (e.g.
        anchors of several feature levels, permuted); None: ``scores`` flipped along W when ``spatial``, else as
        they are.
      no_object: the index of softmax scores' no-object (background) class: RT-DETR's last (-1, YOLOZU's
        default), torchvision Faster R-CNN's and SSD's first (0); unused for sigmoid scores.
      layers: names of the model's layers (``named_modules()`` names) whose outputs feature alignment matches
        with the source's (``methods.align``); empty: the model names none.
      source_stats: the source statistics of those layers (``yolozu.functional.feature_stats``; the adapter
        reads the file saved beside its checkpoint), or None when there are none.
      structured_mim: the model reconstructs its own features (YOLOZU's structured MIM hook, a model with
        ``enable_mim``): MIM calls ``forward(x, geom_input=, feature_mask=, return_mim=True)`` and reads
        ``output["mim"]`` (``methods.mim.structured_mim_method``) instead of masking the image.
    """

    scores: Callable[[Any], Tensor] = output_logits
    score_kind: str = attrs.field(default="softmax", validator=one_of(*SCORE_KINDS))
    spatial: bool = False
    samples: Callable[[Any], Tensor] | None = None
    sample_kind: str | None = attrs.field(default=None, validator=attrs.validators.optional(one_of(*SCORE_KINDS)))
    recon_kwargs: Mapping[str, Any] = attrs.field(factory=dict)
    recon: Callable[[Any], Tensor] = output_reconstruction
    flip_back: Callable[[Any], Tensor] | None = None
    no_object: int = -1
    layers: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    source_stats: Any = None
    structured_mim: bool = False

    def candidates(self, output: Any, index: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """The detector's candidates as ``(B, Q, C)`` class logits (classes last) and the flat positions they
        were read at: a dense map's top-k peaks (at ``index`` when given, e.g. a teacher's), every other
        position of ``scores`` as it is (queries, anchors; a classifier's row is one candidate).

        Args:
          output: a forward output.
          index: flat positions (B, k) to read a dense map at (a teacher's peaks), or None: its own top-k.
        Returns:
          ((B, Q, C) class logits, the positions read or None).
        """
        scores = self.scores(output)
        if self.spatial and scores.ndim == 4:
            index = peak_indices(scores, 100) if index is None else index
            scores = gather_positions(scores, index)
        if scores.ndim == 2:
            scores = scores.unsqueeze(-1)
        return scores.flatten(2).movedim(1, -1), index

    def class_samples(self, output: Any) -> tuple[Tensor, str]:
        """The class logits Tent reads from ``output`` and how they become probabilities.

        Args:
          output: a model's forward output.
        Returns:
          ``(logits, kind)``: class logits ``(N, C, ...)`` and ``softmax`` or ``sigmoid``."""
        logits = (self.samples or self.scores)(output)
        return logits, self.sample_kind or self.score_kind

    def class_rows(self, output: Any) -> Tensor:
        """Tent's class samples as rows ``(N, C)`` of softmax logits, one class distribution per sample (a
        classifier's image, a detector's peak or anchor): what EATA and SAR select and weigh sample by sample.
        Independent sigmoid scores p_c become the distribution p_c / sum p ("which class is this object"), whose
        softmax logits are log p_c = logsigmoid(z_c).

        Args:
          output: a model's forward output.
        Returns:
          Softmax logits ``(N, C)``."""
        logits, kind = self.class_samples(output)
        rows = logits.movedim(1, -1).reshape(-1, logits.shape[1])
        return rows if kind == "softmax" else F.logsigmoid(rows)

    def flipped_scores(self, output: Any) -> Tensor:
        """The ``scores`` of an output of the horizontally flipped input, mapped to the original frame.

        Args:
          output: the forward output of the horizontally flipped batch.
        Returns:
          Class logits ``(B, C, ...)``, aligned with the unflipped input's ``scores``."""
        if self.flip_back is not None:
            return self.flip_back(output)
        scores = self.scores(output)
        return torch.flip(scores, dims=(-1,)) if self.spatial else scores


DEFAULT_READOUT = Readout()


def readout_of(adapter: object, model: Any = None) -> Readout:
    """The adapter's readout when it defines ``ttt_readout()``, else the classifier default (with
    ``structured_mim`` when the adapter's model sets ``enable_mim``, as YOLOZU reads it).

    Args:
      adapter: a YOLOZU adapter.
      model: the adapter's model when the caller holds it already; None: ``adapter.get_model()`` when needed.
    Returns:
      The ``Readout``."""
    hook = getattr(adapter, "ttt_readout", None)
    if callable(hook):
        return hook()
    if model is None and callable(getattr(adapter, "get_model", None)):
        model = adapter.get_model()
    return Readout(structured_mim=True) if getattr(model, "enable_mim", False) else DEFAULT_READOUT


def peak_indices(logits: Tensor, k: int) -> Tensor:
    """Flat positions ``(B, k)`` of the k highest 3x3-local maxima of the max-over-classes heatmap.

    Computed on detached logits: choosing where to look is not differentiated, only what is read there.

    Args:
      logits: a dense class heatmap ``(B, C, H, W)``.
      k: the peaks per image (fewer positions than k: all of them).
    Returns:
      int64 flat positions ``(B, min(k, H*W))``, highest first."""
    score = logits.detach().amax(dim=1, keepdim=True)
    pooled = F.max_pool2d(score, 3, stride=1, padding=1)
    is_peak = pooled == score
    # Non-peaks drop below every peak but keep their order, so top-k is well defined even with < k peaks.
    ranked = torch.where(is_peak, score, score - 1e4).flatten(1)
    return torch.topk(ranked, min(k, ranked.shape[1]), dim=1).indices


def gather_positions(logits: Tensor, index: Tensor) -> Tensor:
    """Class logits ``(B, C, k)`` at flat positions ``index`` (B, k) of ``logits`` (B, C, H, W), with grad.

    Args:
      logits: a dense class heatmap ``(B, C, H, W)``.
      index: int64 flat positions ``(B, k)``.
    Returns:
      Class logits ``(B, C, k)``."""
    flat = logits.flatten(2)
    return torch.gather(flat, 2, index.unsqueeze(1).expand(-1, flat.shape[1], -1))


def peak_class_logits(logits: Tensor, k: int) -> Tensor:
    """The class logits ``(B, C, k)`` of a dense heatmap ``(B, C, H, W)`` at each image's top-k peaks: one class
    distribution per likely object ("which class is this object"), where a corruption makes the detector unsure.

    Args:
      logits: a dense class heatmap ``(B, C, H, W)``.
      k: the peaks per image.
    Returns:
      Class logits ``(B, C, k)``."""
    return gather_positions(logits, peak_indices(logits, k))


__all__ = ["Readout", "DEFAULT_READOUT", "readout_of", "peak_class_logits", "peak_indices", "gather_positions"]
