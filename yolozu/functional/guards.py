"""Guards: pure verdicts on a step's metrics that say whether the step must be stopped.

The verdict is a 0-d int64 tensor: 0 when the step is fine, else 1 + the index in ``STOP_REASONS`` of the
first check that tripped. It is computed with tensor selects, not Python branches on tensor values, so a
vmapped step gets one verdict per stream; the shell decides what to do (roll back params and buffers).
The loss guards compare a step's loss with the first step's loss measured before its update.
"""

from __future__ import annotations

from typing import Mapping

import attrs
import torch
from torch import Tensor

STOP_REASONS = (
    "non_finite",
    "max_update_norm_exceeded",
    "max_total_update_norm_exceeded",
    "max_loss_ratio_exceeded",
    "max_loss_increase_exceeded",
)


def _positive_or_none(instance, attribute, value) -> None:
    if value is not None and not value > 0:
        raise ValueError(f"{attribute.name} must be > 0 or None, got {value}")


def _non_negative_or_none(instance, attribute, value) -> None:
    if value is not None and not value >= 0:
        raise ValueError(f"{attribute.name} must be >= 0 or None, got {value}")


@attrs.frozen
class GuardLimits:
    """Thresholds of the guards; None disables a guard."""

    max_update_norm: float | None = attrs.field(default=None, validator=_positive_or_none)
    max_total_update_norm: float | None = attrs.field(default=None, validator=_positive_or_none)
    max_loss_ratio: float | None = attrs.field(default=None, validator=_positive_or_none)
    max_loss_increase: float | None = attrs.field(default=None, validator=_non_negative_or_none)
    stop_on_non_finite: bool = True


def trips(metrics: Mapping[str, Tensor], limits: GuardLimits) -> list[tuple[int, Tensor]]:
    """(reason index, tripped) for every enabled guard, in ``STOP_REASONS`` order."""
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
    return checks


def verdict(metrics: Mapping[str, Tensor], limits: GuardLimits) -> Tensor:
    """0 if no guard trips, else 1 + the index of the first tripped reason (an int64 tensor)."""
    code = torch.zeros_like(metrics["loss"], dtype=torch.int64)
    for index, tripped in reversed(trips(metrics, limits)):
        code = torch.where(tripped, torch.full_like(code, index + 1), code)
    return code


def reason(code: int) -> str | None:
    """The stop reason of a verdict code, or None for 0."""
    return None if code == 0 else STOP_REASONS[code - 1]
