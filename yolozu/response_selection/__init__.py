"""YOLOZU 4.12's ``yolozu.response_selection``: foreground selection and the detector-response loss on query logits.

The math lives in ``yolozu.functional.response`` (Tent's ``detector_response`` uses it inside its step); this is
its eager face with YOLOZU's signatures: output dicts in, float metrics out.
"""

from __future__ import annotations

from typing import Any, Mapping

from torch import Tensor

from yolozu.functional.response import ForegroundSelection, response_terms, select_foreground_queries


def detector_response_loss(
    student_outputs: Mapping[str, Any],
    teacher_outputs: Mapping[str, Any],
    *,
    confidence_min: float,
    topk: int,
    min_selected: int = 1,
    class_weight: float,
    bbox_weight: float,
    entropy_weight: float,
) -> tuple[Tensor, dict[str, float]]:
    """The response consistency of ``student_outputs`` towards ``teacher_outputs`` on the teacher's foreground
    queries (``yolozu.functional.response``; the last class is no-object, RT-DETR's).

    Args:
      student_outputs, teacher_outputs: dicts with ``logits`` (B, Q, C) and optionally ``bbox`` (B, Q, 4).
    Returns:
      (loss, 0 when abstaining; float metrics incl. ``response_selected_queries``, ``response_abstained`` and
      ``response_min_selected``).
    Raises:
      ValueError: missing or mismatched logits or boxes, a negative weight, ``min_selected`` < 1, or
        0 < ``topk`` < ``min_selected``.
    """
    student, teacher = student_outputs.get("logits"), teacher_outputs.get("logits")
    if not isinstance(student, Tensor) or not isinstance(teacher, Tensor):
        raise ValueError("detector response loss requires logits outputs (a 'logits' tensor in both dicts)")
    student_box, teacher_box = student_outputs.get("bbox"), teacher_outputs.get("bbox")
    boxes = isinstance(student_box, Tensor) and isinstance(teacher_box, Tensor)
    loss, metrics = response_terms(
        student,
        teacher,
        student_box if boxes else None,
        teacher_box if boxes else None,
        confidence_min=confidence_min,
        topk=topk,
        min_selected=min_selected,
        class_weight=class_weight,
        bbox_weight=bbox_weight,
        entropy_weight=entropy_weight,
    )
    out = {name: float(value) for name, value in metrics.items()}
    out["response_min_selected"] = float(min_selected)
    return loss, out


__all__ = ["ForegroundSelection", "select_foreground_queries", "detector_response_loss"]
