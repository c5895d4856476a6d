"""Unsupervised test-time (Tent) losses for the detector's class heatmap; pure functions of the forward output.

Tent (Wang et al. 2021) minimises prediction entropy. A detector's heatmap is mostly confident background,
so two readings are offered:

- :func:`peak_softmax_entropy`: softmax entropy over the class logits at the top-k heatmap peaks, i.e. "which
  digit is this object", where a corruption makes the detector unsure;
- :func:`sigmoid_entropy`: mean binary entropy of every sigmoid score (all classes, all positions).

Both avoid data-dependent Python branching and ``.item()``, so they run under ``torch.func.vmap``/``grad``.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from yolozu.functional.losses import binary_entropy, softmax_entropy

DEFAULT_PEAKS = 4


def _logits(output: Mapping[str, Tensor] | Tensor) -> Tensor:
    return output["logits"] if isinstance(output, Mapping) else output


def peak_indices(logits: Tensor, k: int) -> Tensor:
    """Flat positions ``(B, k)`` of the k highest 3x3-local maxima of the max-over-classes heatmap.

    Computed on detached logits: choosing where to look is not differentiated, only what is read there.
    """
    score = logits.detach().amax(dim=1, keepdim=True)
    pooled = F.max_pool2d(score, 3, stride=1, padding=1)
    is_peak = pooled == score
    # Non-peaks drop below every peak but keep their order, so top-k is well defined even with < k peaks.
    ranked = torch.where(is_peak, score, score - 1e4).flatten(1)
    return torch.topk(ranked, min(k, ranked.shape[1]), dim=1).indices


def gather_positions(logits: Tensor, index: Tensor) -> Tensor:
    """Class logits ``(B, C, k)`` at flat positions ``index`` (B, k) of ``logits`` (B, C, H, W), with grad."""
    flat = logits.flatten(2)
    return torch.gather(flat, 2, index.unsqueeze(1).expand(-1, flat.shape[1], -1))


def peak_softmax_entropy(output: Mapping[str, Tensor] | Tensor, k: int = DEFAULT_PEAKS) -> Tensor:
    """Mean softmax entropy over the class logits at each image's top-k heatmap peaks (scalar)."""
    logits = _logits(output)
    picked = gather_positions(logits, peak_indices(logits, k))
    return softmax_entropy(picked, dim=1).mean()


def sigmoid_entropy(output: Mapping[str, Tensor] | Tensor) -> Tensor:
    """Mean binary entropy of sigmoid(logits) over all classes and positions (scalar)."""
    return binary_entropy(_logits(output)).mean()


TENT_LOSSES = {"peak_softmax": peak_softmax_entropy, "sigmoid": sigmoid_entropy}
"""Tent losses by name (the adapter's ``tent_loss`` argument)."""


def heatmap_logits(output: Mapping[str, Tensor]) -> Tensor:
    """The class heatmap logits ``(B, C, H, W)`` (CoTTA's scores)."""
    return output["logits"]


def reconstruction(output: Mapping[str, Tensor]) -> Tensor:
    """The MIM reconstruction ``(B, 3, S, S)`` (present when the forward ran with ``recon=True``)."""
    return output["recon"]
