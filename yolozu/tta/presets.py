"""YOLOZU 4.12's preset rules on parsed ``--ttt*`` arguments (``apply_ttt_preset_args``) and the cross-option checks
(``validate_ttt_requirements``); the presets themselves are the table in ``yolozu.tta.preset_table``."""

from __future__ import annotations

from typing import Any

import attrs

from yolozu.tta.config import TTTConfig
from yolozu.tta.flags import dest_of
from yolozu.tta.preset_table import AUTO, CORE, GUARDS, PRESETS, TASK_PRESETS, TTTPreset, preset_values

__all__ = [
    "TTTPreset", "PRESETS", "CORE", "GUARDS", "preset_values", "auto_preset", "core_is_default", "fill_guards",
    "apply_ttt_preset_args", "validate_ttt_lora_requirements", "validate_ttt_requirements",
]  # fmt: skip
_DEFAULTS = {f.name: f.default for f in attrs.fields(TTTConfig)}
_DESTS = {f.name: dest_of(f) for f in attrs.fields(TTTConfig)}


def _given(args: Any, name: str) -> Any:
    """The parsed value of ``--ttt-<name>``; None when absent (the project's parser leaves absent flags None)."""
    return getattr(args, _DESTS[name], None)


def auto_preset(args: Any) -> str:
    """The preset a plain ``--ttt`` picks: the task's (``--ttt-sdft-task``, for tent or mim), then the
    method's, then ``adapter_only`` for that filter, else ``safe``.

    Args:
      args: parsed arguments (``ttt_method``, ``ttt_sdft_task``, ``ttt_update_filter``).
    Returns:
      The preset's name.
    """
    method = str(_given(args, "method") or "tent").lower()
    task = str(_given(args, "sdft_task") or "").lower()
    chosen = TASK_PRESETS.get((task, "tent" if method == "all" else method)) or AUTO.get(method)
    if chosen:
        return chosen
    return "adapter_only" if str(_given(args, "update_filter") or "all") == "adapter_only" else "safe"


def core_is_default(args: Any) -> bool:
    """Whether every core knob is absent or at ``TTTConfig``'s default (a plain ``--ttt``).

    Args:
      args: parsed arguments.
    Returns:
      True when a plain ``--ttt`` may apply its preset whole.
    """
    defaults = _DEFAULTS
    for name in CORE:
        value = _given(args, name)
        if name == "method" or value is None:
            continue
        default = defaults[name]
        if isinstance(default, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
            if abs(float(value) - default) > 1e-12:
                return False
        elif value != default:
            return False
    return True


def fill_guards(args: Any, preset: TTTPreset) -> None:
    """Set each guard flag left unset to the preset's limit; the loss limit only when neither loss limit was
    given (ratio preferred).

    Args:
      args: parsed arguments, changed in place.
      preset: the preset whose guards fill them.
    """
    for name in ("max_grad_norm", "max_update_norm", "max_total_update_norm"):
        if _given(args, name) is None and getattr(preset, name) is not None:
            setattr(args, _DESTS[name], float(getattr(preset, name)))
    if _given(args, "max_loss_ratio") is None and _given(args, "max_loss_increase") is None:
        if preset.max_loss_ratio is not None:
            args.ttt_max_loss_ratio = float(preset.max_loss_ratio)
        elif preset.max_loss_increase is not None:
            args.ttt_max_loss_increase = float(preset.max_loss_increase)


def _set_core(args: Any, preset: TTTPreset) -> None:
    for name in CORE:
        setattr(args, _DESTS[name], getattr(preset, name))


def apply_ttt_preset_args(args: Any) -> Any:
    """YOLOZU's preset rules on parsed arguments, in place (see the module docstring). Returns ``args``.

    Raises:
      ValueError: an unknown ``ttt_preset``.

    Args:
      args: parsed arguments (``ttt``, ``ttt_preset`` and the ``ttt_*`` settings), changed in place.
    Returns:
      ``args``.
    """
    name = getattr(args, "ttt_preset", None)
    if name:
        if name not in PRESETS:
            raise ValueError(f"unknown TTT preset {name!r}; choose one of {', '.join(PRESETS)}")
        _set_core(args, PRESETS[name])
        fill_guards(args, PRESETS[name])
        return args
    if not getattr(args, "ttt", False):
        return args
    name = auto_preset(args)
    if core_is_default(args):
        args.ttt_preset = name
        _set_core(args, PRESETS[name])
    fill_guards(args, PRESETS[name])
    return args


def validate_ttt_lora_requirements(args: Any) -> None:
    """Fail before the model is built when ``--ttt`` adapts only LoRA parameters and no LoRA is asked for.

    Raises:
      ValueError: ``lora_only`` with ``--lora-r`` absent or 0.

    Args:
      args: parsed arguments (``ttt``, ``ttt_update_filter``, ``lora_r``).
    """
    if not getattr(args, "ttt", False):
        return
    update_filter = str(_given(args, "update_filter") or "all").lower()
    if update_filter == "lora_only" and int(getattr(args, "lora_r", 0) or 0) <= 0:
        raise ValueError(
            "LoRA-only TTT requires --lora-r > 0 (--ttt-update-filter lora_only adapts only LoRA parameters). "
            "Example: --lora-r 4 --ttt --ttt-preset sar_safe"
        )


def validate_ttt_requirements(args: Any) -> None:
    """Fail before the model is built on TTT options that contradict each other: LoRA-only without LoRA
    (``validate_ttt_lora_requirements``) and a detector-response selection that can never reach its minimum.

    Raises:
      ValueError: naming the options and a working example.

    Args:
      args: parsed arguments.
    """
    validate_ttt_lora_requirements(args)
    if not getattr(args, "ttt", False) or not _given(args, "detector_response"):
        return
    topk = _given(args, "response_topk")
    min_selected = _given(args, "response_min_selected")
    topk = _DEFAULTS["response_topk"] if topk is None else int(topk)
    min_selected = _DEFAULTS["response_min_selected"] if min_selected is None else int(min_selected)
    if min_selected < 1 or 0 < topk < min_selected:
        raise ValueError(
            "Detector-response TTT needs min-selected >= 1 and top-k 0 or >= min-selected "
            f"(got --ttt-response-topk {topk}, --ttt-response-min-selected {min_selected}). "
            "Example: --ttt-response-topk 20 --ttt-response-min-selected 1"
        )


_choose_default_preset_id = auto_preset  # YOLOZU's name
