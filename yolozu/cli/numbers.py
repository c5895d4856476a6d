"""Numeric flags refused at parse time when no run could use them: a float that is not finite, an integer too
large for any counter or seed.

``float("nan")`` and ``float("inf")`` parse, and a NaN compares false with every bound, so a range check written
as ``value < 0`` lets it through: ``--bn-prior nan`` would run to the end and predict nothing at all. An integer
such as ``--seed 18446744073709551616`` parses too, then overflows deep inside torch with a message that names no
flag. ``bound_numbers`` wraps the type of every float and integer flag of a parser, so that argparse itself
reports such a value as a usage error naming the flag (``argument --bn-prior: ...``, exit 2).
"""

from __future__ import annotations

import argparse
import functools
import math
from typing import Any, Callable

INT_LIMIT = 2**63 - 1
"""The largest integer a flag takes (a signed 64-bit value: what torch's seeds and counters hold)."""


def _kind(parse: Any) -> str | None:
    """``"float"`` or ``"int"`` for an argparse type that parses one (the builtins, or a wrapper named after one,
    such as the optional settings' parsers of ``yolozu.tta.flags``); None otherwise."""
    if parse is float or parse is int:
        return parse.__name__
    name = getattr(parse, "__name__", None)
    return name if callable(parse) and name in ("float", "int") else None


def _bounded(parse: Callable[[str], Any], kind: str) -> Callable[[str], Any]:
    @functools.wraps(parse)
    def checked(text: str) -> Any:
        value = parse(text)
        if kind == "float" and isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        if kind == "int" and isinstance(value, int) and abs(value) > INT_LIMIT:
            raise argparse.ArgumentTypeError(f"{text} is out of range (at most {INT_LIMIT} in magnitude)")
        return value

    return checked


def bound_numbers(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``parser`` with every float flag refusing NaN and infinities and every integer flag refusing values beyond
    ``INT_LIMIT`` (in place; returned for chaining)."""
    for action in parser._actions:
        kind = _kind(action.type)
        if kind is not None:
            action.type = _bounded(action.type, kind)
    return parser
