"""``TTTReport``: what a test-time training run did, in the fields YOLOZU logs."""

from __future__ import annotations

import math
import statistics
from typing import TYPE_CHECKING, Any

import attrs

if TYPE_CHECKING:
    from yolozu.tta.config import TTTConfig


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


def loss_summary(losses: list[float]) -> dict:
    """count, min, mean, max and last of the step losses (YOLOZU's), and first; with no step, count 0 and the
    rest None (YOLOZU's shape).

    Args:
      losses: the kept steps' losses.
    Returns:
      The summary dict."""
    if not losses:
        return {"count": 0, "min": None, "mean": None, "max": None, "last": None, "first": None}
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
    parameters. ``mask_ratio`` is the mean masked fraction (MIM), else None. YOLOZU 4.12's counters:
    ``method_profile`` (``yolozu.tta.method_profiles``; None for a method without one), ``forward_calls`` and
    ``backward_calls`` (the passes the steps ran, rolled-back and skipped steps included), ``optimizer_steps``
    (kept steps that changed the weights; ``update_ratio`` = that / ``steps_requested``), ``abstained_steps``
    (Tent's detector-response abstentions; ``abstention_ratio`` = that / steps taken) and ``memory`` (peak
    memory of the run: CUDA's allocator or the process's peak RSS). ``samples``: reset ``sample``'s per-image
    summary (``sample_mode``), flattened into ``to_dict``.
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
    method_profile: dict | None = None
    forward_calls: int = 0
    backward_calls: int = 0
    optimizer_steps: int = 0
    update_ratio: float = 0.0
    abstained_steps: int = 0
    abstention_ratio: float = 0.0
    memory: dict | None = None
    samples: dict | None = None

    def to_dict(self) -> dict:
        """JSON-ready fields in YOLOZU's shape: ``loss_summary``, and ``losses`` and ``step_metrics`` capped at
        ``CAPPED`` entries with ``*_total`` and ``*_truncated``; non-finite numbers (a rolled-back NaN step)
        become None.

        Returns:
          The report as a JSON-ready dict."""
        out = attrs.asdict(self)
        out.update(out.pop("samples") or {})
        out["loss_summary"] = loss_summary(self.losses)
        for key in ("losses", "step_metrics"):
            out[f"{key}_total"] = len(out[key])
            out[f"{key}_truncated"] = len(out[key]) > CAPPED
            out[key] = out[key][:CAPPED]
        return json_safe(out)


def disabled_report(config: TTTConfig) -> TTTReport:
    """The report of a run with TTT off.

    Args:
      config: the run's settings (its method and reset are reported).
    Returns:
      A ``TTTReport`` with ``enabled`` False."""
    return TTTReport(enabled=False, method=config.method, reset=config.reset)


SAMPLES_KEPT = 20
"""The per-image summaries a reset ``sample`` report keeps (YOLOZU's)."""


def sample_mode(report: TTTReport, images: list[str]) -> TTTReport:
    """``report`` of a reset ``sample`` run with YOLOZU's sample-mode fields: ``mode``, ``samples_total``,
    ``samples_kept``, ``samples_truncated`` and ``per_sample`` (index, image and each adapted image's steps,
    losses and stop), from the rows (each row's ``batch`` is its image's index).

    Args:
      report: the run's report, changed in place.
      images: every record's image, by index.
    Returns:
      ``report``.
    """
    per_image: dict[int, list[dict]] = {}
    for row in report.step_metrics:
        per_image.setdefault(row["batch"], []).append(row)
    kept = sorted(per_image)[:SAMPLES_KEPT]
    per_sample = []
    for index in kept:
        rows = per_image[index]
        losses = [r["loss"] for r in rows if not r["rolled_back"]]
        stop = next((r["stop_reason"] for r in rows if r["stop_reason"]), None)
        summary = {"steps_run": len(losses), "losses": losses, "stopped_early": stop is not None, "stop_reason": stop}
        per_sample.append({"index": index, "image": images[index] if index < len(images) else None, "report": summary})
    report.samples = {
        "mode": "sample",
        "samples_total": len(images),
        "samples_kept": len(per_sample),
        "samples_truncated": len(images) > SAMPLES_KEPT,
        "per_sample": per_sample,
    }
    return report
