"""Guards: pure verdicts on a step's metrics that say whether the step must be stopped.

Stop reasons carry YOLOZU's names. The verdict is a 0-d int64 tensor: 0 when the step is fine, else 1 + the index in
``STOP_REASONS`` of the first check that tripped. It is computed with tensor selects, not Python branches on tensor
values, so a vmapped step gets one verdict per stream; the shell decides what to do (roll back params and buffers).
The loss guards compare a step's loss with the first step's loss measured before its update."""

from __future__ import annotations

from typing import Mapping, Sequence

import attrs
import torch
from torch import Tensor

from yolozu.functional.settings import number, setting

STOP_REASONS = (
    "non_finite_metrics",
    "max_update_norm_exceeded",
    "max_total_update_norm_exceeded",
    "max_loss_ratio_exceeded",
    "max_loss_increase_exceeded",
)


@attrs.frozen(kw_only=True)
class GuardLimits:
    """Thresholds of the guards; None disables a guard, and a cap of 0 stops every step that moves."""

    max_update_norm: float | None = setting(
        None, "stop if one update's norm exceeds this", number(0, optional=True)
    )
    max_total_update_norm: float | None = setting(
        None, "stop if the drift from the source weights exceeds this", number(0, optional=True)
    )
    max_loss_ratio: float | None = setting(
        None, "stop if the loss exceeds the first step's loss times this", number(0, optional=True)
    )
    max_loss_increase: float | None = setting(
        None, "stop if the loss exceeds the first step's loss plus this", number(0, optional=True)
    )
    stop_on_non_finite: bool = setting(True, "stop on a non-finite loss, gradient or update")


def trips(
    metrics: Mapping[str, Tensor], limits: GuardLimits, method_reasons: Sequence[str] = ()
) -> list[tuple[int, Tensor]]:
    """(reason index, tripped) for every enabled guard, in ``STOP_REASONS`` order, then a method's own stop
    reasons (``Method.stop_reasons``: bool metrics of those names) with indices after ``STOP_REASONS``.

    Args:
      metrics: a step's metrics (0-d tensors, or ``(K,)`` for K streams): ``loss``, ``initial_loss``, ``finite``,
        ``update_norm``, ``total_update_norm`` and the method's stop reasons.
      limits: the thresholds (a None limit adds no check).
      method_reasons: the method's own stop reasons.
    Returns:
      ``(index, tripped)`` pairs, ``tripped`` a bool tensor shaped like the loss."""
    loss, initial = metrics["loss"], metrics["initial_loss"]
    checks: list[tuple[int, Tensor]] = []
    if limits.stop_on_non_finite:
        checks.append((0, ~metrics["finite"]))
    if limits.max_update_norm is not None:
        checks.append((1, metrics["update_norm"] > limits.max_update_norm))
    if limits.max_total_update_norm is not None:
        checks.append((2, metrics["total_update_norm"] > limits.max_total_update_norm))
    if limits.max_loss_ratio is not None:
        checks.append((3, loss > initial * limits.max_loss_ratio))
    if limits.max_loss_increase is not None:
        checks.append((4, loss > initial + limits.max_loss_increase))
    checks += [(len(STOP_REASONS) + i, metrics[name]) for i, name in enumerate(method_reasons)]
    return checks


def verdict(metrics: Mapping[str, Tensor], limits: GuardLimits, method_reasons: Sequence[str] = ()) -> Tensor:
    """0 if no guard trips, else 1 + the index of the first tripped reason: a tensor verdict, so K vmapped
    streams each get their own without a Python branch.

    Args:
      metrics: a step's metrics (see ``trips``).
      limits: the guard thresholds.
      method_reasons: the method's own stop reasons.
    Returns:
      An int64 tensor shaped like ``metrics["loss"]`` (``()`` or ``(K,)``)."""
    code = torch.zeros_like(metrics["loss"], dtype=torch.int64)
    for index, tripped in reversed(trips(metrics, limits, method_reasons)):
        code = torch.where(tripped, torch.full_like(code, index + 1), code)
    return code


def reason(code: int, method_reasons: Sequence[str] = ()) -> str | None:
    """The stop reason of a verdict code (``STOP_REASONS``, then the method's own), or None for 0.

    Args:
      code: a verdict code (``verdict``'s value for one stream).
      method_reasons: the method's own stop reasons.
    Returns:
      The reason's name, or None."""
    return None if code == 0 else (*STOP_REASONS, *method_reasons)[code - 1]
