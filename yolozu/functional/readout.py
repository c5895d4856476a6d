"""Readout: how test-time training reads a model's outputs.

A classifier returns logits; a detector returns a dict of dense maps. The update functions do not care:
they call the readout, which each adapter supplies (``adapter.ttt_readout()``) and which defaults to
"the output is class logits over dim 1".
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import attrs
from torch import Tensor

from yolozu.functional.losses import softmax_entropy


def _identity(output: Any) -> Tensor:
    return output


def mean_softmax_entropy(output: Any) -> Tensor:
    """Tent's loss for a classifier: mean over samples (and positions) of softmax entropy over dim 1."""
    return softmax_entropy(output, dim=1).mean()


@attrs.frozen
class Readout:
    """Pure functions from a model's forward output to what each TTT method needs.

    Attributes:
      tent_loss: output -> scalar entropy loss (Tent).
      recon_kwargs: keyword arguments for the forward pass that makes the model reconstruct its input (MIM).
      recon: output of that forward -> reconstruction, shaped like the input.
      scores: output -> class logits ``(B, C, ...)`` (CoTTA's pseudo-labels).
      score_kind: ``"softmax"`` (one class per sample/position) or ``"sigmoid"`` (independent class scores).
      spatial: True when ``scores`` are dense maps ``(B, C, H, W)`` aligned with the image, so a
        horizontal flip of the input flips them along W.
    """

    tent_loss: Callable[[Any], Tensor] = mean_softmax_entropy
    recon_kwargs: Mapping[str, Any] = attrs.field(factory=dict)
    recon: Callable[[Any], Tensor] = _identity
    scores: Callable[[Any], Tensor] = _identity
    score_kind: str = attrs.field(default="softmax", validator=attrs.validators.in_(("softmax", "sigmoid")))
    spatial: bool = False


DEFAULT_READOUT = Readout()


def readout_of(adapter: object) -> Readout:
    """The adapter's readout when it defines ``ttt_readout()``, else the classifier default."""
    hook = getattr(adapter, "ttt_readout", None)
    return hook() if callable(hook) else DEFAULT_READOUT


__all__ = ["Readout", "DEFAULT_READOUT", "readout_of", "mean_softmax_entropy"]
