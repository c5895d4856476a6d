"""A mean teacher's pieces: the teacher as an EMA of the student, its pseudo-labels (its views' scores averaged, a
confidence rule choosing between that average and its plain prediction), the student's consistency with them and
stochastic restoration (CoTTA, Wang, Fink, Van Gool & Dai, CVPR 2022; detection self-training uses the EMA).

Scores are class logits ``(B, C, ...)`` with classes on dim 1, made probabilities by a softmax over the classes or
independent sigmoids (``Readout.score_kind``).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from yolozu.functional.rng import Key, generator
from yolozu.functional.state import Params

AGGREGATIONS = ("confidence_weighted_mean", "mean", "logit_mean")
TEACHER_OR_STUDENT = ("teacher", "student")
"""Which of a mean teacher's two models predictions use."""
SOURCE_QUANTILE = 0.05
SOURCE_MARGIN = 0.05
"""p_th = (the ``SOURCE_QUANTILE`` quantile of the source model's confidence on in-distribution data) -
``SOURCE_MARGIN``: CoTTA's threshold derived from the source model (the paper's supplementary)."""


def ema(teacher: Params, student: Params, momentum: float | Tensor) -> Params:
    """theta_t <- m * theta_t + (1 - m) * theta_s, leaf-wise (the mean teacher of Tarvainen & Valpola 2017).

    Args:
      teacher: the teacher's adapted parameters.
      student: the student's, holding at least the teacher's names.
      momentum: m.
    Returns:
      The new teacher parameters, keyed like ``teacher``.
    """
    return {name: torch.lerp(student[name], t, momentum) for name, t in teacher.items()}


def restore_draws(params: Params, k: Key) -> Params:
    """Uniform draws in [0, 1), one per parameter element, from key ``k`` (CPU, moved to each tensor's device).

    Args:
      params: the tensors whose shapes the draws take.
      k: the step's key.
    Returns:
      Draws keyed and shaped like ``params``.
    """
    gen = generator(k)
    return {name: torch.rand(p.shape, generator=gen).to(p.device) for name, p in params.items()}


def stochastic_restore(
    params: Params, source: Params, prob: float | Tensor, draws: Params, active: Tensor | bool = True
) -> tuple[Params, Tensor]:
    """Each element returns to its source value where its draw is below ``prob`` (and ``active``): CoTTA's
    stochastic restoration. Only the names in ``params`` are touched: restoration applies to the adapted
    parameters, never to frozen ones.

    Args:
      params: the adapted parameters.
      source: their source values (at least ``params``' names).
      prob: the restore probability p.
      draws: uniform draws keyed and shaped like ``params`` (``restore_draws``).
      active: whether this step restores (a bool or a 0-d bool tensor: every ``restore_interval`` steps).
    Returns:
      The new params and the number of elements restored (a 0-d tensor).
    """
    restored = {}
    counts = []
    for name, p in params.items():
        hit = (draws[name] < prob) & active
        restored[name] = torch.where(hit, source[name], p)
        counts.append(hit.sum())
    # an empty selection has no device of its own: its count of zero is a CPU scalar
    total = torch.stack(counts).sum() if counts else torch.zeros((), dtype=torch.int64, device="cpu")
    return restored, total


def probabilities(logits: Tensor, score_kind: str) -> Tensor:
    """Class probabilities of scores: a softmax over the classes, or independent sigmoids.

    Args:
      logits: class logits ``(B, C, ...)``.
      score_kind: ``softmax`` or ``sigmoid``.
    Returns:
      Probabilities shaped like ``logits``."""
    return torch.sigmoid(logits) if score_kind == "sigmoid" else torch.softmax(logits, dim=1)


def confidence(probs: Tensor) -> Tensor:
    """Per sample (and position): the largest class probability, kept as dim 1 for broadcasting.

    Args:
      probs: class probabilities ``(B, C, ...)``.
    Returns:
      ``(B, 1, ...)``."""
    return probs.amax(dim=1, keepdim=True)


def aggregate(branch_probs: Sequence[Tensor], aggregation: str) -> Tensor:
    """Average the views' probabilities: plainly (``mean``), or weighted by each view's confidence per sample
    and position (``confidence_weighted_mean``).

    Args:
      branch_probs: each view's probabilities ``(B, C, ...)``, in the original frame.
      aggregation: ``mean`` or ``confidence_weighted_mean`` (``logit_mean`` averages logits instead:
        ``teacher_targets``).
    Returns:
      The averaged probabilities ``(B, C, ...)``.
    """
    stacked = torch.stack(list(branch_probs))
    if aggregation == "mean":
        return stacked.mean(dim=0)
    weights = confidence(stacked.flatten(0, 1)).unflatten(0, stacked.shape[:2])
    return (stacked * weights).sum(dim=0) / weights.sum(dim=0).clamp_min(1e-12)


def teacher_targets(
    branch_logits: Sequence[Tensor],
    source_logits: Tensor,
    *,
    score_kind: str,
    aggregation: str,
    threshold: float | Tensor,
    plain_logits: Tensor,
    scope: str = "sample",
) -> Tensor:
    """Soft pseudo-labels (CoTTA, Wang et al. 2022): the augmentation average where the source model's
    confidence is below ``threshold``, else the teacher's plain prediction.

    Args:
      branch_logits: the teacher's scores of each augmented view, mapped back to the original frame,
        each ``(B, C, ...)``.
      source_logits: the source model's scores of the plain view, ``(B, C, ...)``.
      score_kind: ``softmax`` or ``sigmoid``: how scores become probabilities.
      aggregation: one of ``AGGREGATIONS``; ``logit_mean`` (the reference's) averages the logits, then takes
        their probabilities.
      threshold: the confidence below which the average is used (a number or a 0-d tensor).
      plain_logits: the teacher's scores of the plain (identity) view, ``(B, C, ...)``, whatever the branches.
      scope: ``sample``: the rule per sample and position; ``batch`` (the reference's): once, on the mean of
        the source's confidence over the batch.

    Returns:
      target probabilities ``(B, C, ...)``.
    """
    if aggregation == "logit_mean":
        averaged = probabilities(torch.stack(list(branch_logits)).mean(dim=0), score_kind)
    else:
        averaged = aggregate([probabilities(b, score_kind) for b in branch_logits], aggregation)
    source = confidence(probabilities(source_logits, score_kind))
    uncertain = (source.mean() if scope == "batch" else source) < threshold
    return torch.where(uncertain, averaged, probabilities(plain_logits, score_kind))


def consistency_loss(student_logits: Tensor, targets: Tensor, score_kind: str) -> Tensor:
    """The student's consistency with soft targets: soft cross-entropy -sum_c y_c log p_c (softmax scores) or
    binary cross-entropy (sigmoid scores), averaged.

    Args:
      student_logits: the student's scores ``(B, C, ...)``.
      targets: target probabilities shaped like them.
      score_kind: ``softmax`` or ``sigmoid``.
    Returns:
      A 0-d tensor.
    """
    if score_kind == "sigmoid":
        return F.binary_cross_entropy_with_logits(student_logits, targets)
    return -(targets * F.log_softmax(student_logits, dim=1)).sum(dim=1).mean()


def source_quantile_threshold(confidences: Tensor) -> Tensor:
    """CoTTA's threshold from the source model's confidences on in-distribution images: p_th = q - 0.05, q their
    5% quantile (``SOURCE_QUANTILE``, ``SOURCE_MARGIN``).

    Args:
      confidences: one confidence per image ``(N,)`` (a classifier's largest class probability; a dense
        output's mean over its positions).
    Returns:
      p_th, a 0-d float tensor on ``confidences``' device.
    """
    return torch.quantile(confidences.float(), SOURCE_QUANTILE) - SOURCE_MARGIN
