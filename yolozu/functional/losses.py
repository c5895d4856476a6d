"""Losses of the core: entropies of class scores, masked reconstruction error and the heatmap focal loss that
detection self-training shares with the detector's own training."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def softmax_entropy(logits: Tensor, dim: int = 1) -> Tensor:
    """Shannon entropy of softmax(logits) along ``dim``: H = -sum_c p_c log p_c (Tent, Wang et al. 2021).

    Args:
      logits: class logits, classes along ``dim`` (e.g. ``(B, C)`` or ``(B, C, H, W)``).
      dim: the class dimension.
    Returns:
      The per-element entropy, ``logits``'s shape with ``dim`` removed; callers choose the reduction."""
    log_p = F.log_softmax(logits, dim=dim)
    return -(log_p.exp() * log_p).sum(dim=dim)


def entropy_margin(e_margin: float | None, classes: int) -> float:
    """The entropy threshold E0 below which a sample counts as reliable: ``e_margin``, else 0.4 ln C (EATA, Niu
    et al. 2022; SAR, Niu et al. 2023).

    Args:
      e_margin: the threshold a setting gives, or None for the papers' rule.
      classes: the number of classes C.
    Returns:
      E0, in nats."""
    return e_margin if e_margin is not None else 0.4 * math.log(classes)


def binary_entropy(logits: Tensor) -> Tensor:
    """Entropy of independent Bernoulli scores sigmoid(logits), element-wise.

    H = -p log p - (1 - p) log(1 - p), written with log-sigmoids so it stays finite for large |logits|:
    log p = logsigmoid(z), log(1 - p) = logsigmoid(-z).

    Args:
      logits: scores of independent sigmoids, any shape.
    Returns:
      The entropy of each score, shaped like ``logits``."""
    log_p = F.logsigmoid(logits)
    log_q = F.logsigmoid(-logits)
    return -(log_p.exp() * log_p + log_q.exp() * log_q)


def masked_reconstruction_loss(pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean squared error over the masked pixels (all channels), as in masked-image modelling (MAE, He et al.
    2022).

    Args:
      pred: the reconstruction ``(B, C, H, W)``.
      target: the input it reconstructs, shaped like ``pred``.
      mask: bool, broadcastable to ``pred`` (e.g. ``(B, 1, H, W)``); None means every pixel.
    Returns:
      A 0-d tensor; with an empty mask 0 (not NaN), so a step on such a batch is a no-op."""
    err = (pred - target).square()
    if mask is None:
        return err.mean()
    weight = mask.to(err.dtype).expand_as(err)
    return (err * weight).sum() / weight.sum().clamp_min(1.0)


def masked_reconstruction_errors(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Each image's mean squared error over its own masked pixels (all channels): the per-image form of
    ``masked_reconstruction_loss``.

    Args:
      pred: the reconstruction ``(B, C, H, W)``.
      target: the input it reconstructs, shaped like ``pred``.
      mask: bool, broadcastable to ``pred`` (e.g. ``(B, 1, H, W)``).
    Returns:
      ``(B,)``; 0 for an image with no masked pixel."""
    err = (pred - target).square()
    weight = mask.to(err.dtype).expand_as(err)
    return (err * weight).flatten(1).sum(dim=1) / weight.flatten(1).sum(dim=1).clamp_min(1.0)


def centernet_focal_loss(
    logits: Tensor, heatmap: Tensor, *, alpha: float = 2.0, beta: float = 4.0, mask: Tensor | None = None
) -> Tensor:
    """Penalty-reduced pixel-wise focal loss of CenterNet (Zhou et al. 2019, eq. 1), normalised by #objects.

    Positives are cells where the target is 1; negatives near a peak are down-weighted by ``(1 - y)^beta``.

    Args:
      logits: class logits ``(B, C, ...)`` (a heatmap ``(B, C, H, W)``), scored by independent sigmoids.
      heatmap: targets in [0, 1], shaped like ``logits``; exactly 1 marks a positive.
      alpha: the focal exponent (CenterNet's 2).
      beta: the penalty-reduction exponent (CenterNet's 4).
      mask: optional bool or 0/1 tensor broadcastable to ``logits``; cells where it is 0 count neither as
        positives nor as negatives (self-training's ignored band).

    Returns:
      the loss, a 0-d tensor: the sum over counted cells over max(1, number of positives)."""
    log_p = F.logsigmoid(logits)
    log_q = F.logsigmoid(-logits)
    p = log_p.exp()
    counted = torch.ones_like(logits) if mask is None else mask.to(logits.dtype).expand_as(logits)
    positive = heatmap.eq(1.0).to(logits.dtype) * counted
    pos_loss = -((1 - p) ** alpha) * log_p * positive
    neg_loss = -((1 - heatmap) ** beta) * (p**alpha) * log_q * (counted - positive)
    num_pos = positive.sum().clamp(min=1.0)
    return (pos_loss.sum() + neg_loss.sum()) / num_pos
