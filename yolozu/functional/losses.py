"""Unsupervised test-time losses: entropies of class scores and masked reconstruction error."""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor


def softmax_entropy(logits: Tensor, dim: int = 1) -> Tensor:
    """Shannon entropy of softmax(logits) along ``dim``: H = -sum_c p_c log p_c (Tent, Wang et al. 2021).

    Returns the per-element entropy (``dim`` reduced); callers choose the reduction.
    """
    log_p = F.log_softmax(logits, dim=dim)
    return -(log_p.exp() * log_p).sum(dim=dim)


def entropy_margin(e_margin: float | None, classes: int) -> float:
    """The entropy threshold E0 below which a sample counts as reliable: ``e_margin``, else 0.4 ln C (EATA, Niu
    et al. 2022; SAR, Niu et al. 2023)."""
    return e_margin if e_margin is not None else 0.4 * math.log(classes)


def binary_entropy(logits: Tensor) -> Tensor:
    """Entropy of independent Bernoulli scores sigmoid(logits), element-wise.

    H = -p log p - (1 - p) log(1 - p), written with log-sigmoids so it stays finite for large |logits|:
    log p = logsigmoid(z), log(1 - p) = logsigmoid(-z).
    """
    log_p = F.logsigmoid(logits)
    log_q = F.logsigmoid(-logits)
    return -(log_p.exp() * log_p + log_q.exp() * log_q)


def masked_reconstruction_loss(pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean squared error over the masked pixels (all channels), as in masked-image modelling (MAE, He et al. 2022).

    ``mask`` is boolean, broadcastable to ``pred`` (e.g. ``(B, 1, H, W)``); None means every pixel.
    With an empty mask the loss is 0 (not NaN), so a step on such a batch is a no-op.
    """
    err = (pred - target).square()
    if mask is None:
        return err.mean()
    weight = mask.to(err.dtype).expand_as(err)
    return (err * weight).sum() / weight.sum().clamp_min(1.0)
