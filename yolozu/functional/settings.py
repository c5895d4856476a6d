"""Declared settings: an attrs field that carries its help text and a validator that knows its range or choices.

A setting is declared once, where its meaning lives (a method's settings beside the method, the guard limits
beside the guards); the shell's ``TTTConfig``, the command-line flags, ``--help``, validation messages and
``meta.ttt`` are all generated from these declarations.

    class MIMSettings:
        mask_prob: float = setting(0.6, "probability that a mask cell is masked", number(0, 1))
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable

import attrs


def _fail(instance: Any, attribute: attrs.Attribute, expected: str, value: Any) -> None:
    raise ValueError(f"{type(instance).__name__}.{attribute.name} must be {expected}, got {value!r}")


@attrs.frozen
class OneOf:
    """Validator: the value (every element, when ``many``) is one of ``choices``; ``many`` also asks for a
    non-empty sequence; ``optional`` also accepts None."""

    choices: tuple[str, ...]
    many: bool = False
    optional: bool = False

    @property
    def expected(self) -> str:
        """What a valid value is, in words (the error message's ending)."""
        listed = ", ".join(self.choices)
        text = f"a non-empty list drawn from {listed}" if self.many else f"one of {listed}"
        return text + (" or None" if self.optional else "")

    def __call__(self, instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        if value is None and self.optional:
            return
        values = value if self.many else (value,)
        if (self.many and not values) or any(v not in self.choices for v in values):
            _fail(instance, attribute, self.expected, list(value) if self.many else value)


@attrs.frozen
class Number:
    """Validator: a finite number (an int when ``integer``) in [low, high] (``(low, high]`` when ``low_open``);
    None allowed when ``optional``."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    integer: bool = False
    optional: bool = False

    @property
    def expected(self) -> str:
        """What a valid value is, in words (the error message's ending)."""
        bounds = []
        if self.low is not None:
            bounds.append(f"{'>' if self.low_open else '>='} {self.low}")
        if self.high is not None:
            bounds.append(f"<= {self.high}")
        kind = "an integer" if self.integer else "a finite number"
        return kind + (" " + " and ".join(bounds) if bounds else "") + (" or None" if self.optional else "")

    def accepts(self, value: Any) -> bool:
        """Whether ``value`` is valid: a finite int or float (not a bool) within the bounds, or None when
        optional.

        Args:
          value: the candidate.
        Returns:
          True if valid."""
        if value is None:
            return self.optional
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if (self.integer and not isinstance(value, int)) or not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or value <= self.high

    def __call__(self, instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        if not self.accepts(value):
            _fail(instance, attribute, self.expected, value)


def plain_number(value: Any) -> Any:
    """Converter: a numpy (or other ``numbers``) integer or real scalar -> the Python int or float of the same
    value, so that ``np.float32(1e-3)`` is accepted where ``1e-3`` is and the setting stays JSON-ready; anything
    else (bools included) unchanged, for the validator to judge.

    Args:
      value: the value given.
    Returns:
      The plain Python value."""
    if type(value) in (int, float) or isinstance(value, bool) or not isinstance(value, numbers.Real):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    return float(value)


def one_of(*choices: str) -> OneOf:
    """The value is one of ``choices``.

    Args:
      choices: the allowed strings.
    Returns:
      The validator."""
    return OneOf(tuple(choices))


def many_of(*choices: str) -> OneOf:
    """A non-empty tuple whose every element is one of ``choices``.

    Args:
      choices: the allowed strings.
    Returns:
      The validator."""
    return OneOf(tuple(choices), many=True)


def number(
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    integer: bool = False,
    optional: bool = False,
) -> Number:
    """A validator: a finite number in [low, high] (see ``Number``).

    Args:
      low: the lower bound (None: none).
      high: the upper bound (None: none).
      low_open: the lower bound is excluded.
      integer: the value must be an int.
      optional: None is allowed.
    Returns:
      The ``Number`` validator."""
    return Number(low, high, low_open, integer, optional)


def is_bool(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    """Validator: True or False (not 0 or 1).

    Args:
      instance: the settings object being built.
      attribute: the field.
      value: the value given.
    Raises:
      ValueError: naming the setting and the value."""
    if not isinstance(value, bool):
        _fail(instance, attribute, "True or False", value)


def optional_split(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    """Validator: None or a non-empty string (the name of a data split a method calibrates on).

    Args:
      instance: the settings object being built.
      attribute: the field.
      value: the value given.
    Raises:
      ValueError: naming the setting and the value.
    """
    if value is not None and not (isinstance(value, str) and value):
        raise ValueError(f"{type(instance).__name__}.{attribute.name} must be a split name or None, got {value!r}")


def str_tuple(value: Any) -> tuple[str, ...] | None:
    """Converter: None stays None, a string -> (string,), any other iterable -> a tuple.

    Args:
      value: the value given.
    Returns:
      None or a tuple of strings."""
    if value is None:
        return None
    if isinstance(value, str):
        return (value,)
    return tuple(value)


def setting(
    default: Any,
    help: str,
    validator: Callable[..., None] | None = None,
    *,
    type: type | None = None,
    converter: Callable[[Any], Any] | None = None,
    yolozu: bool = False,
) -> Any:
    """An attrs field with its ``help`` text and ``kind`` in the metadata: ``type``, the value's Python type (what
    a command line parses a flag with), inferred from the default when not given. ``yolozu`` marks a method
    setting that YOLOZU's ``TTTConfig`` has too (it comes in YOLOZU's positional order).

    Args:
      default: the default value.
      help: the one-line help a command line shows.
      validator: an attrs validator (None: none).
      type: the value's Python type (None: the default's).
      converter: an attrs converter (None: ``plain_number`` for a ``Number`` validator, else none).
      yolozu: the setting is also one of YOLOZU's ``TTTConfig``.
    Returns:
      An ``attrs.field``."""
    kind = type if type is not None else (default.__class__ if default is not None else float)
    if validator is None and kind is bool:
        validator = is_bool
    if converter is None and isinstance(validator, Number):
        converter = plain_number
    metadata = {"help": help, "kind": kind, **({"yolozu": True} if yolozu else {})}
    return attrs.field(default=default, validator=validator, converter=converter, metadata=metadata)


def copy_field(field: attrs.Attribute, *, default: Any = attrs.NOTHING, **metadata: Any) -> Any:
    """A new attrs field declared like ``field`` (default, validator, converter, type, metadata), with another
    ``default`` if given and extra ``metadata``: how a composite settings class takes a part's fields over
    without re-declaring them.

    Args:
      field: the field copied.
      default: the new default (by default the field's).
      metadata: metadata added to the field's.
    Returns:
      An ``attrs.field``."""
    return attrs.field(
        default=field.default if default is attrs.NOTHING else default,
        validator=field.validator,
        converter=field.converter,
        type=field.type,
        metadata={**field.metadata, **metadata},
    )
