"""Detector-response consistency (YOLOZU 4.12's ``detector_response``): a student's class and box responses pulled
towards a frozen teacher's on the candidates the teacher calls foreground, with abstention when too few are.

For candidate logits ``z`` of shape ``(B, Q, C)`` (classes last; softmax scores with a no-object class, RT-DETR's
last, or independent sigmoid scores without one):

    fg(q) = max_c p_c(q) over the foreground classes,  bg(q) = p_no-object(q)  (sigmoid: 1 - fg(q))
    selected(q) = fg_teacher(q) >= conf_min  and  fg_teacher(q) > bg_teacher(q),  capped at the top-k fg per image
    L = w_cls * mean_sel KL(p_teacher || p_student) + w_box * mean_sel SmoothL1(sigma(b_s), sigma(b_t))
        + w_ent * mean_sel H(p_student)

over the foreground classes (softmax renormalised without the no-object class; sigmoid: Bernoulli KL and
entropy summed over classes). With fewer than ``min_selected`` selected candidates the step abstains: the loss is
0 and the caller makes no update. Pure functions of tensors; nothing here mutates its inputs.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from yolozu.functional.losses import binary_entropy


class ForegroundSelection(NamedTuple):
    """The teacher's foreground candidates: ``mask`` (B, Q) bool and ``confidence`` (B, Q), its fg(q)."""

    mask: Tensor
    confidence: Tensor

    @property
    def selected_count(self) -> int:
        """How many candidates are selected (a host sync)."""
        return int(self.mask.sum().item())


def _check_selection(logits: Tensor, confidence_min: float, topk: int, kind: str) -> None:
    if not isinstance(logits, Tensor) or logits.ndim != 3:
        raise ValueError("detector response selection requires logits shaped [B, Q, C]")
    if kind == "softmax" and logits.shape[-1] < 2:
        raise ValueError("detector response selection requires foreground plus no-object logits")
    if not 0.0 <= float(confidence_min) <= 1.0:
        raise ValueError(f"foreground confidence_min must be between 0 and 1, got {confidence_min}")
    if int(topk) < 0:
        raise ValueError(f"foreground topk must be >= 0, got {topk}")


def _split(logits: Tensor, kind: str, no_object: int) -> tuple[Tensor, Tensor | None]:
    """(foreground logits, no-object logit or None) of softmax logits (classes last); sigmoid: (logits, None)."""
    if kind != "softmax":
        return logits, None
    index = no_object % logits.shape[-1]
    keep = [c for c in range(logits.shape[-1]) if c != index]
    return logits[..., keep], logits[..., index]


def select_foreground_queries(
    teacher_logits: Tensor, *, confidence_min: float, topk: int, kind: str = "softmax", no_object: int = -1
) -> ForegroundSelection:
    """The teacher's candidates whose best foreground probability reaches ``confidence_min`` and beats its
    no-object probability, at most ``topk`` per image (0: no cap).

    Args:
      teacher_logits: (B, Q, C) candidate logits, classes last (detached here).
      confidence_min: the least foreground probability of a selected candidate, in [0, 1].
      topk: at most this many candidates per image (0: no cap).
      kind: ``softmax`` (with a no-object class at index ``no_object``) or ``sigmoid``.
      no_object: the no-object class of softmax logits (RT-DETR's last: -1).
    Returns:
      the selection (mask and fg confidence, both (B, Q)).
    """
    _check_selection(teacher_logits, confidence_min, topk, kind)
    logits = teacher_logits.detach()
    if kind == "softmax":
        probs = F.softmax(logits, dim=-1)
        fg_probs, bg = _split(probs, kind, no_object)
        confidence = fg_probs.amax(dim=-1)
    else:
        confidence = torch.sigmoid(logits).amax(dim=-1)
        bg = 1.0 - confidence
    eligible = (confidence >= float(confidence_min)) & (confidence > bg)
    k = int(topk)
    if 0 < k < eligible.shape[-1]:
        top = torch.topk(confidence.masked_fill(~eligible, -1.0), k=k, dim=-1).indices
        eligible = eligible & torch.zeros_like(eligible).scatter(-1, top, True)
    return ForegroundSelection(eligible, confidence)


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` over ``mask`` (0 when nothing is selected), differentiable and shape-static."""
    weights = mask.to(values.dtype)
    return (values * weights).sum() / weights.sum().clamp_min(1.0)


def _per_candidate(student: Tensor, teacher: Tensor, kind: str, no_object: int) -> tuple[Tensor, Tensor]:
    """Per-candidate (B, Q) class KL(teacher || student) and student entropy over the foreground classes."""
    teacher_fg, _ = _split(teacher, kind, no_object)
    student_fg, _ = _split(student, kind, no_object)
    if kind == "softmax":
        log_q = F.log_softmax(student_fg, dim=-1)
        class_per = F.kl_div(log_q, F.softmax(teacher_fg, dim=-1), reduction="none").sum(dim=-1)
        return class_per, -(log_q.exp() * log_q).sum(dim=-1)
    p = torch.sigmoid(teacher_fg)
    cross = F.binary_cross_entropy_with_logits(student_fg, p, reduction="none").sum(dim=-1)
    return cross - binary_entropy(teacher_fg).sum(dim=-1), binary_entropy(student_fg).sum(dim=-1)


def _check_weights(class_weight: float, bbox_weight: float, entropy_weight: float, topk: int, min_selected: int):
    weights = {"class_weight": class_weight, "bbox_weight": bbox_weight, "entropy_weight": entropy_weight}
    for name, value in weights.items():
        if float(value) < 0.0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if int(min_selected) < 1:
        raise ValueError(f"min_selected must be >= 1, got {min_selected}")
    if 0 < int(topk) < int(min_selected):
        raise ValueError(f"topk must be 0 or >= min_selected, got topk {topk} and min_selected {min_selected}")


def response_terms(
    student_logits: Tensor,
    teacher_logits: Tensor,
    student_bbox: Tensor | None = None,
    teacher_bbox: Tensor | None = None,
    *,
    confidence_min: float,
    topk: int,
    min_selected: int,
    class_weight: float,
    bbox_weight: float,
    entropy_weight: float,
    kind: str = "softmax",
    no_object: int = -1,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The response loss (module docstring) and its tensor metrics; no host sync (usable inside a step).

    Args:
      student_logits: (B, Q, C) candidate logits of the student (differentiated).
      teacher_logits: (B, Q, C) logits of the same candidates from the teacher.
      student_bbox: (B, Q, 4) box logits of the student's candidates, or None (no box term).
      teacher_bbox: (B, Q, 4) box logits of the teacher's, or None.
      confidence_min: the least teacher foreground probability of a selected candidate.
      topk: at most this many selected candidates per image (0: no cap).
      min_selected: abstain below this many selected candidates.
      class_weight: weight of the class KL.
      bbox_weight: weight of the box smooth L1.
      entropy_weight: weight of the student's foreground entropy.
      kind: ``softmax`` or ``sigmoid`` scores.
      no_object: the no-object class of softmax logits.
    Returns:
      (loss: 0-d tensor, 0 when abstaining; metrics: ``loss_response_class``, ``loss_response_bbox``,
      ``loss_response_foreground_entropy``, ``response_selected_queries``, ``response_selected_ratio``,
      ``response_selected_confidence_mean``, ``response_abstained`` as 0-d tensors).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student and teacher detector logits must have matching shapes, got {tuple(student_logits.shape)} "
            f"and {tuple(teacher_logits.shape)}"
        )
    _check_weights(class_weight, bbox_weight, entropy_weight, topk, min_selected)
    selection = select_foreground_queries(
        teacher_logits, confidence_min=confidence_min, topk=topk, kind=kind, no_object=no_object
    )
    mask = selection.mask
    count = mask.sum()
    take = (count >= int(min_selected)).to(student_logits.dtype)
    class_per, entropy_per = _per_candidate(student_logits, teacher_logits.detach(), kind, no_object)
    class_loss = _masked_mean(class_per, mask) * take
    entropy_loss = _masked_mean(entropy_per, mask) * take
    bbox_loss = student_logits.sum() * 0.0
    if student_bbox is not None and teacher_bbox is not None:
        if student_bbox.shape != teacher_bbox.shape or student_bbox.shape[:-1] != mask.shape:
            raise ValueError("student and teacher detector boxes must match the selected query shape [B, Q, 4]")
        per = F.smooth_l1_loss(student_bbox.sigmoid(), teacher_bbox.detach().sigmoid(), reduction="none").mean(-1)
        bbox_loss = _masked_mean(per, mask) * take
    total = float(class_weight) * class_loss + float(bbox_weight) * bbox_loss + float(entropy_weight) * entropy_loss
    metrics = {
        "loss_response_class": class_loss.detach(),
        "loss_response_bbox": bbox_loss.detach(),
        "loss_response_foreground_entropy": entropy_loss.detach(),
        "response_selected_queries": count.to(student_logits.dtype),
        "response_selected_ratio": count.to(student_logits.dtype) / max(1, mask.numel()),
        "response_selected_confidence_mean": _masked_mean(selection.confidence, mask).detach(),
        "response_abstained": 1.0 - take,
    }
    return total, metrics


def weak_photometric_view(batch: Tensor) -> Tensor:
    """The student's input of the response loss: a fixed, shape-preserving weak photometric change (contrast
    x0.9 about each image's mean, then +0.02), so the same candidates correspond across the two views.

    Raises:
      TypeError: a dict or other structured batch, or a non-floating tensor.

    Args:
      batch: images (B, C, H, W) (any floating tensor).
    Returns:
      The view, a new tensor shaped like ``batch``.
    """
    if isinstance(batch, (dict, list, tuple)):
        raise TypeError("the weak photometric view needs one image tensor; structured batches are rejected")
    if not isinstance(batch, Tensor) or not batch.is_floating_point():
        raise TypeError("the weak photometric view needs a floating image tensor")
    dims = tuple(range(1, batch.ndim)) if batch.ndim > 1 else (0,)
    mean = batch.mean(dim=dims, keepdim=True)
    return (batch - mean) * 0.9 + mean + 0.02
