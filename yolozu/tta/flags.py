"""The ``--ttt-*`` command-line flags, generated from ``TTTConfig``'s fields (their help, type, range and
choices), and the config and ``meta.ttt`` they give: every setting is declared once, where it lives."""

from __future__ import annotations

import argparse
import re
from typing import Any

import attrs

from yolozu.functional.settings import Number
from yolozu.tta.config import TTTConfig
from yolozu.tta.methods import METHODS

NOT_FLAGS = ("enabled", "preset")
"""``TTTConfig`` fields with a flag of their own shape (``--ttt``, ``--ttt-preset``)."""


class ExplicitNone:
    """The value of an optional setting's flag given as ``none`` (e.g. ``--ttt-max-batches none``: no cap), as
    opposed to an absent flag (the preset's or the default value)."""

    def __repr__(self) -> str:
        return "none"


EXPLICIT_NONE = ExplicitNone()


def optional(kind: type):
    """argparse type of an optional setting: ``none`` (any case) or a value of ``kind``.

    Args:
      kind: the value's type (``int``, ``float``, ``str``).
    Returns:
      The parse function."""

    def parse(text: str):
        return EXPLICIT_NONE if text.lower() == "none" else kind(text)

    parse.__name__ = kind.__name__
    return parse


def flag_of(field: attrs.Attribute) -> str:
    """The command-line flag of a ``TTTConfig`` field: the one its method's registry entry gives it, else
    ``--ttt-`` + its name with dashes.

    Args:
      field: a ``TTTConfig`` field.
    Returns:
      The flag, e.g. ``--ttt-eata-conf-min``."""
    return field.metadata.get("flag") or "--ttt-" + field.name.replace("_", "-")


def dest_of(field: attrs.Attribute) -> str:
    """The parsed-arguments attribute of a ``TTTConfig`` field's flag: the flag without its dashes, in
    underscores, as argparse derives it (``--ttt-mask-prob`` -> ``ttt_mask_prob``, YOLOZU's name).

    Args:
      field: a ``TTTConfig`` field.
    Returns:
      The attribute name, e.g. ``ttt_eata_conf_min``."""
    return flag_of(field).lstrip("-").replace("-", "_")


def flag_kwargs(field: attrs.Attribute) -> dict[str, Any]:
    """argparse keyword arguments of a ``TTTConfig`` field, from its type, validator and help. Every default is
    None, so that an explicit value can be told from an absent one (an explicit value wins over its preset).

    Args:
      field: a ``TTTConfig`` field.
    Returns:
      Keyword arguments of ``ArgumentParser.add_argument``."""
    default = field.default
    shown = " ".join(default) if isinstance(default, tuple) else default
    shown = "none" if shown is None or shown == "" else str(shown).lower() if isinstance(shown, bool) else shown
    expected = getattr(field.validator, "expected", None) if isinstance(field.validator, Number) else None
    text = field.metadata["help"] + (f": {expected}" if expected else "")
    kwargs: dict[str, Any] = {"default": None, "help": f"{text} (default {shown})"}
    validator = getattr(field.validator, "validator", field.validator)  # an optional(...) validator's inner one
    choices = getattr(validator, "choices", None)
    kind = field.metadata["kind"]
    if kind is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif kind is tuple:
        kwargs.update(action="extend", nargs="+", metavar="VALUE" if choices is None else None)
    else:
        kwargs["type"] = optional(kind) if getattr(field.validator, "optional", False) else kind
        kwargs["metavar"] = {int: "N", float: "X"}.get(kind, "TEXT") if choices is None else None
    if choices is not None:
        kwargs["choices"] = choices
    return {k: v for k, v in kwargs.items() if v is not None or k == "default"}


def ttt_fields() -> list[attrs.Attribute]:
    """The ``TTTConfig`` fields that are ``--ttt-*`` flags.

    Returns:
      The fields, in ``TTTConfig``'s order."""
    return [f for f in attrs.fields(TTTConfig) if f.name not in NOT_FLAGS]


def ttt_config(args: argparse.Namespace) -> TTTConfig:
    """The TTT config the flags ask for: preset values, then every explicitly given flag.

    Args:
      args: parsed arguments holding ``ttt``, ``ttt_preset``, ``seed`` and a ``ttt_*`` value per field (an absent
        one reads as its default).
    Returns:
      The validated ``TTTConfig``."""
    given = {f.name: getattr(args, dest_of(f), None) for f in ttt_fields()}
    explicit = {name: None if value is EXPLICIT_NONE else value for name, value in given.items() if value is not None}
    explicit.setdefault("seed", getattr(args, "seed", None))
    if not getattr(args, "ttt", False):
        return TTTConfig(**explicit)
    return TTTConfig.from_preset(getattr(args, "ttt_preset", None), **{"enabled": True, **explicit})


def given_flags(args: argparse.Namespace) -> list[attrs.Attribute]:
    """The ``TTTConfig`` fields whose ``--ttt-*`` flag was given on the command line.

    Args:
      args: the parsed command line.
    Returns:
      Those fields, in ``TTTConfig``'s order."""
    return [f for f in ttt_fields() if getattr(args, dest_of(f), None) is not None]


def misplaced_flag(args: argparse.Namespace, method: str) -> str | None:
    """Why a given ``--ttt-*`` flag would be ignored, if one would: a flag without ``--ttt``, or a setting of
    another method than ``method`` (such a flag would change nothing, yet be recorded in ``meta``).

    Args:
      args: the parsed command line.
      method: the method the run uses (after presets).
    Returns:
      The usage error's text, or None when every given flag takes effect."""
    given = given_flags(args)
    if not args.ttt:
        shown = [flag_of(f) for f in given if f.name != "seed"]
        return f"{shown[0]} applies to --ttt only; add --ttt or drop it" if shown else None
    for name, method_entry in METHODS.items():
        if name == method or not method_entry.prefix:
            continue
        foreign = [f for f in given if f.name.startswith(method_entry.prefix)]
        if foreign:
            return (f"{flag_of(foreign[0])} is a setting of --ttt-method {name}, not of {method}; drop it or choose "
                    f"--ttt-method {name}")
    return None


def as_flags(message: str) -> str:
    """``message`` with every ``TTTConfig.<field>`` named by its flag, as the user typed it (``--ttt-lr``).

    Args:
      message: an error's text.
    Returns:
      The text with flags for field names."""
    flags = {field.name: flag_of(field) for field in ttt_fields()}
    return re.sub(r"TTTConfig\.(\w+)", lambda m: flags.get(m.group(1), m.group(0)), message)


def ttt_meta(config: TTTConfig, report: dict | None) -> dict:
    """``meta.ttt``: the settings as applied (after presets; each method's under its name), the normalisation
    predictions used and the run's report.

    Args:
      config: the run's settings.
      report: the run's report as a dict (None: no run).
    Returns:
      The JSON-ready ``meta.ttt`` dict."""
    return {**config.grouped(), "prediction_bn": config.prediction_bn, "report": report}
