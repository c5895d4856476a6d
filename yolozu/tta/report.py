"""``TTTReport``: what a test-time training run did, in the fields YOLOZU logs."""

from __future__ import annotations

import math
import statistics
from typing import Any

import attrs


def json_safe(value: Any) -> Any:
    """``value`` with non-finite floats replaced by None (JSON has no NaN), through dicts and lists.

    Args:
      value: a JSON-like value.
    Returns:
      The same structure, non-finite floats as None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


CAPPED = 50
"""``to_dict`` keeps the first this many ``losses`` and ``step_metrics`` (YOLOZU's log size)."""


def loss_summary(losses: list[float]) -> dict | None:
    """count, min, mean, max and last of the step losses (YOLOZU's), and first (None when no step ran).

    Args:
      losses: the kept steps' losses.
    Returns:
      The summary dict, or None."""
    if not losses:
        return None
    return {
        "count": len(losses),
        "min": min(losses),
        "mean": statistics.fmean(losses),
        "max": max(losses),
        "last": losses[-1],
        "first": losses[0],
    }


@attrs.define
class TTTReport:
    """A run's outcome.

    ``losses`` and ``steps_run`` count the kept steps only; a step stopped by a guard and rolled back appears
    in ``step_metrics`` with ``rolled_back: true``. ``updated_param_count`` is the numel of the selected
    parameters. ``mask_ratio`` is the mean masked fraction (MIM), else None.
    """

    enabled: bool
    method: str
    reset: str
    steps_requested: int = 0
    steps_run: int = 0
    batches_used: int = 0
    seconds: float = 0.0
    losses: list[float] = attrs.field(factory=list)
    mask_ratio: float | None = None
    updated_param_count: int = 0
    stopped_early: bool = False
    stop_reason: str | None = None
    step_metrics: list[dict] = attrs.field(factory=list)
    warnings: list[str] = attrs.field(factory=list)

    def to_dict(self) -> dict:
        """JSON-ready fields in YOLOZU's shape: ``loss_summary``, and ``losses`` and ``step_metrics`` capped at
        ``CAPPED`` entries with ``*_total`` and ``*_truncated``; non-finite numbers (a rolled-back NaN step)
        become None.

        Returns:
          The report as a JSON-ready dict."""
        out = attrs.asdict(self)
        out["loss_summary"] = loss_summary(self.losses)
        for key in ("losses", "step_metrics"):
            out[f"{key}_total"] = len(out[key])
            out[f"{key}_truncated"] = len(out[key]) > CAPPED
            out[key] = out[key][:CAPPED]
        return json_safe(out)
