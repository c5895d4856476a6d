"""Named TTT presets: tested settings for a method, a filter and its guards.

Every preset runs one step on one batch of one image at lr 1e-4 (``steps``, ``batch_size``, ``lr``,
``max_batches``) unless an explicit value says otherwise; the guards cap the gradient norm (by clipping),
each update's norm, the total drift from the source weights, and the loss ratio to the first step.
"""

from __future__ import annotations

from typing import Any

from yolozu.tta.paper_presets import PAPERS

_COMMON = {"enabled": True, "steps": 1, "batch_size": 1, "lr": 1e-4, "max_batches": 1}


def _guards(norm_cap: float, loss_ratio: float) -> dict[str, float]:
    return {
        "max_grad_norm": norm_cap,
        "max_update_norm": norm_cap,
        "max_total_update_norm": norm_cap,
        "max_loss_ratio": loss_ratio,
    }


PRESETS: dict[str, dict[str, Any]] = {
    "safe": {"method": "tent", "update_filter": "norm_only", **_guards(1.0, 3.0)},
    "adapter_only": {"method": "tent", "update_filter": "adapter_only", **_guards(5.0, 3.0)},
    "mim_safe": {"method": "mim", "update_filter": "adapter_only", **_guards(5.0, 3.0)},
    "cotta_safe": {"method": "cotta", "update_filter": "lora_norm_only", **_guards(1.0, 3.0)},
    "eata_safe": {"method": "eata", "update_filter": "norm_only", **_guards(1.0, 3.0)},
    "sar_safe": {"method": "sar", "update_filter": "norm_only", **_guards(1.0, 3.0)},
}
PRESETS.update(PAPERS)
AUTO = {values["method"]: name for name, values in PRESETS.items() if name.endswith("safe")}
"""The preset a plain ``--ttt`` gets for each method (YOLOZU's auto-preset): its ``*safe`` preset."""


def preset_values(name: str) -> dict[str, Any]:
    """The field values of preset ``name`` (a fresh dict): the common values, then the preset's own.

    Args:
      name: a key of ``PRESETS``.
    Returns:
      Field name -> value.
    Raises:
      ValueError: ``name`` is no preset.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown TTT preset {name!r}; choose one of {', '.join(PRESETS)}")
    return {**_COMMON, **PRESETS[name]}


def apply_ttt_preset_args(args: Any) -> Any:
    """YOLOZU's auto-preset on parsed export arguments: a plain ``--ttt`` (no ``--ttt-preset``, and none of the
    settings a safe preset sets given explicitly) gets its method's safe preset (``AUTO``).

    Args:
      args: the parsed export arguments (``ttt``, ``ttt_preset``, ``ttt_method`` and the ``ttt_*`` settings).
    Returns:
      ``args``, with ``ttt_preset`` set when the preset applies.
    """
    if not getattr(args, "ttt", False) or getattr(args, "ttt_preset", None):
        return args
    preset_keys = {key for name in AUTO.values() for key in PRESETS[name]} | set(_COMMON)
    explicit = {key for key in preset_keys - {"method", "enabled"} if getattr(args, f"ttt_{key}", None) is not None}
    if not explicit:
        args.ttt_preset = AUTO.get(getattr(args, "ttt_method", None) or "tent")
    return args
