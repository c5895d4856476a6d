"""YOLOZU 4.12's ``yolozu.tta.cli_options``: the ``--ttt*`` flags on any parser, and the config, settings and
argument list they give.

The flags are the ones ``yolozu export`` has: generated from ``TTTConfig``'s fields (``yolozu.tta.flags``), each
setting declared once where it lives. Absent flags parse as None, so that a preset can tell them from explicit
ones (``yolozu.tta.presets.apply_ttt_preset_args``); the builders read None as the field's default.
"""

from __future__ import annotations

import argparse
from typing import Any

import attrs

from yolozu.functional.filters import FILTERS
from yolozu.tta.config import RESETS, SDFT_TASKS, SUPPORTED_TTT_METHODS, TTTConfig
from yolozu.tta.flags import dest_of, flag_kwargs, flag_of, ttt_config, ttt_fields
from yolozu.tta.presets import PRESETS

_CHOICES = {f.name: getattr(f.validator, "choices", None) for f in attrs.fields(TTTConfig)}
TTT_METHOD_CHOICES = SUPPORTED_TTT_METHODS
TTT_RESET_CHOICES = RESETS
TTT_UPDATE_FILTER_CHOICES = FILTERS
TTT_COTTA_AGGREGATION_CHOICES = _CHOICES["cotta_aggregation"]
TTT_PRESET_CHOICES = tuple(PRESETS)
TTT_SDFT_TASK_CHOICES = SDFT_TASKS


def add_ttt_arguments(parser: argparse.ArgumentParser | Any, *, include_enable_flag: bool = True) -> None:
    """Add ``--ttt`` (unless ``include_enable_flag`` is False: a caller that enables TTT its own way),
    ``--ttt-preset`` and one flag per ``TTTConfig`` setting to ``parser`` (a parser or an argument group).

    Args:
      parser: an ``argparse`` parser or argument group.
      include_enable_flag: add ``--ttt`` too.
    """
    if include_enable_flag:
        parser.add_argument("--ttt", action="store_true", help="adapt the model before/while predicting")
    parser.add_argument(
        "--ttt-preset",
        choices=sorted(PRESETS),
        help="tested core settings (method, steps, batch size, lr, filter, batches) and guards; it sets the core "
        "settings and fills the unset guards (a plain --ttt picks one: see docs/ttt.md)",
    )
    for field in ttt_fields():
        parser.add_argument(flag_of(field), dest=dest_of(field), **flag_kwargs(field))


def build_ttt_config_from_args(args: Any) -> TTTConfig:
    """The enabled ``TTTConfig`` of parsed ``--ttt*`` arguments (after any ``apply_ttt_preset_args``).

    Raises:
      ValueError: a value out of its field's range.

    Args:
      args: parsed arguments (an absent ``ttt_*`` reads as its default).
    Returns:
      The ``TTTConfig``, enabled.
    """
    enabled = argparse.Namespace(**{**vars(args), "ttt": True})
    enabled.seed = getattr(args, "seed", None)
    return ttt_config(enabled)


def _settings_of(config: TTTConfig) -> dict[str, Any]:
    settings = config.grouped()
    tent = settings.pop("tent", {})
    settings["aux"] = {
        **{f"{task}_weight": tent.get(f"aux_{task}_weight") for task in ("pose", "keypoints", "depth", "seg")},
        "temperature": settings.pop("aux_temperature"),
    }
    settings["detector_response"] = {
        "enabled": tent.get("detector_response", False),
        "confidence_min": tent.get("response_conf_min"),
        **{name: tent.get(f"response_{name}") for name in ("topk", "min_selected")},
        **{f"{name}_weight": tent.get(f"response_{name}_weight") for name in ("class", "bbox", "entropy")},
    }
    return settings


def build_ttt_settings_from_args(args: Any) -> dict[str, Any]:
    """The settings as a JSON-ready dict in YOLOZU's shape: the shared settings flat, each method's under its
    name, ``aux`` and ``detector_response`` groups; ``enabled`` says whether ``--ttt`` was given.

    Args:
      args: parsed arguments.
    Returns:
      The settings dict.
    """
    settings = _settings_of(build_ttt_config_from_args(args))
    settings.update(enabled=bool(getattr(args, "ttt", False)), preset=getattr(args, "ttt_preset", None))
    return settings


def build_ttt_cli_args(args: Any, *, include_enable_flag: bool = True) -> list[str]:
    """The ``--ttt*`` argument list that gives the same settings (every setting, None ones left out); [] when
    ``--ttt`` is off. For handing the settings to a child process.

    Args:
      args: parsed arguments.
      include_enable_flag: start with ``--ttt``.
    Returns:
      The argument list.
    """
    if not getattr(args, "ttt", False):
        return []
    config = build_ttt_config_from_args(args)
    cmd = ["--ttt"] if include_enable_flag else []
    if getattr(args, "ttt_preset", None):
        cmd += ["--ttt-preset", str(args.ttt_preset)]
    for field in ttt_fields():
        value, flag = getattr(config, field.name), flag_of(field)
        if isinstance(value, bool):
            cmd.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, tuple):
            cmd += [flag, *map(str, value)]
        elif value is not None:
            cmd += [flag, str(value)]
    return cmd


__all__ = [
    "add_ttt_arguments", "build_ttt_config_from_args", "build_ttt_settings_from_args", "build_ttt_cli_args",
    "TTT_METHOD_CHOICES", "TTT_RESET_CHOICES", "TTT_UPDATE_FILTER_CHOICES", "TTT_COTTA_AGGREGATION_CHOICES",
    "TTT_PRESET_CHOICES", "TTT_SDFT_TASK_CHOICES",
]  # fmt: skip
