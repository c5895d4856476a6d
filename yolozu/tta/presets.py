"""Named TTT presets: tested settings for a method, a filter and its guards.

Every preset runs one step on one batch of one image at lr 1e-4 (``steps``, ``batch_size``, ``lr``,
``max_batches``) unless an explicit value says otherwise; the guards cap the gradient norm (by clipping),
each update's norm, the total drift from the source weights, and the loss ratio to the first step.
"""

from __future__ import annotations

from typing import Any

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
PAPERS: dict[str, dict[str, Any]] = {
    # EATA as Niu et al. (ICML 2022) run it on ImageNet-C: SGD at lr 0.00025 with momentum 0.9 on batches of 64,
    # the BatchNorm affine parameters adapted with test-batch statistics, online over every batch, each batch
    # predicted by the forward it adapts on; E0 = 0.4 ln C, d_margin 0.05, alpha 2000 with Fisher data
    # (--ttt-eata-fisher-data; the paper's 2,000 in-distribution images), no step without a kept sample, and
    # none of YOLOZU's floors, stops, L2 anchor or guards
    "eata_paper": {
        "method": "eata", "update_filter": "norm_only", "bn_mode": "batch", "optimizer": "sgd", "lr": 0.00025,
        "momentum": 0.9, "batch_size": 64, "schedule": "online", "max_batches": None, "online_predict": "adapt_forward",
        "eata_conf_min": 0.0, "eata_entropy_min": 0.0, "eata_max_skip_streak": None, "eata_selected_ratio_min": 0.0,
        "eata_min_valid_dets": 1, "eata_anchor_lambda": 0.0, "eata_e_margin": None, "eata_d_margin": 0.05,
        "eata_fisher_alpha": 2000.0,
    },
    # CoTTA as Wang et al. (CVPR 2022) run it on CIFAR10-C: Adam at lr 1e-3 on batches of 200, every parameter
    # adapted with test-batch statistics, online over every batch; the teacher's logits averaged over 32 random
    # strong views for the whole batch when its mean source confidence is below the threshold (0.92, or derived
    # from --ttt-cotta-threshold-data), predictions with the teacher before the update
    "cotta_paper": {
        "method": "cotta", "update_filter": "all", "bn_mode": "batch", "optimizer": "adam", "lr": 1e-3,
        "batch_size": 200, "schedule": "online", "max_batches": None, "cotta_views": "random",
        "cotta_random_views": 32, "cotta_aggregation": "logit_mean", "cotta_threshold_scope": "batch",
        "cotta_predict_with": "teacher_before_update", "cotta_ema_momentum": 0.999, "cotta_restore_prob": 0.01,
        "cotta_confidence_threshold": 0.92,
    },
}  # fmt: skip
"""The papers' methods as their reference code runs them (docs/ttt.md lists what still differs)."""
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
