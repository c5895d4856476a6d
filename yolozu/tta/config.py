"""``TTTConfig``: the shared defaults of the CLI and the Python API, validated on construction.

A bad value is a ``ValueError`` naming the field and what it accepts. Defaults keep TTT off; presets
(``yolozu.tta.presets``) bundle tested settings, and an explicitly given value wins over its preset.
"""

from __future__ import annotations

import math
from typing import Any

import attrs

from yolozu.functional.filters import FILTERS
from yolozu.functional.step import BN_MODES

METHODS = ("tent", "mim", "cotta")
RESETS = ("stream", "sample")
SCHEDULES = ("pre", "online")
OPTIMIZERS = ("adam", "sgd")
COTTA_AUGMENTATIONS = ("identity", "hflip")
COTTA_AGGREGATIONS = ("confidence_weighted_mean", "mean")
PREDICT_WITH = ("teacher", "student")
ONLINE_PREDICT = ("after_update", "adapt_forward")


def _fail(attribute: attrs.Attribute, expected: str, value: Any) -> None:
    raise ValueError(f"TTTConfig.{attribute.name} must be {expected}, got {value!r}")


def one_of(choices: tuple[str, ...]):
    """Validator: the value is one of ``choices``."""

    def check(instance, attribute, value):
        if value not in choices:
            _fail(attribute, "one of " + ", ".join(choices), value)

    return check


def number(
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    integer: bool = False,
    optional: bool = False,
):
    """Validator: a finite number (an int when ``integer``) in [low, high] (``(low, high]`` when ``low_open``);
    None allowed when ``optional``."""
    kind = "an integer" if integer else "a finite number"
    bounds = []
    if low is not None:
        bounds.append(f"{'>' if low_open else '>='} {low}")
    if high is not None:
        bounds.append(f"<= {high}")
    expected = kind + (" " + " and ".join(bounds) if bounds else "") + (" or None" if optional else "")

    def check(instance, attribute, value):
        if value is None and optional:
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail(attribute, expected, value)
        if integer and not isinstance(value, int):
            _fail(attribute, expected, value)
        if not math.isfinite(value):
            _fail(attribute, expected, value)
        if low is not None and (value <= low if low_open else value < low):
            _fail(attribute, expected, value)
        if high is not None and value > high:
            _fail(attribute, expected, value)

    return check


def _str_tuple(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(value)


def _augmentations(instance, attribute, value) -> None:
    if not value or any(name not in COTTA_AUGMENTATIONS for name in value):
        _fail(attribute, "a non-empty list drawn from " + ", ".join(COTTA_AUGMENTATIONS), list(value))


@attrs.frozen(kw_only=True)
class TTTConfig:
    """Test-time training settings (field names follow the ``--ttt-*`` CLI flags).

    ``steps`` is the number of optimiser steps per batch; ``max_batches`` caps the adapted batches
    (None: every batch the loader yields).
    """

    enabled: bool = False
    preset: str | None = None
    method: str = attrs.field(default="tent", validator=one_of(METHODS))
    reset: str = attrs.field(default="stream", validator=one_of(RESETS))
    schedule: str = attrs.field(default="pre", validator=one_of(SCHEDULES))
    steps: int = attrs.field(default=1, validator=number(1, integer=True))
    lr: float = attrs.field(default=1e-4, validator=number(0, low_open=True))
    batch_size: int = attrs.field(default=1, validator=number(1, integer=True))
    max_batches: int | None = attrs.field(default=None, validator=number(1, integer=True, optional=True))
    update_filter: str = attrs.field(default="all", validator=one_of(FILTERS))
    include: tuple[str, ...] = attrs.field(default=(), converter=_str_tuple)
    exclude: tuple[str, ...] = attrs.field(default=(), converter=_str_tuple)
    seed: int = attrs.field(default=0, validator=number(0, integer=True))
    optimizer: str = attrs.field(default="adam", validator=one_of(OPTIMIZERS))
    momentum: float = attrs.field(default=0.9, validator=number(0, 1))
    bn_mode: str = attrs.field(default="running", validator=one_of(BN_MODES))
    # MIM
    mask_prob: float = attrs.field(default=0.6, validator=number(0, 1))
    patch_size: int = attrs.field(default=16, validator=number(1, integer=True))
    mask_value: float = attrs.field(default=0.0, validator=number())
    # guards
    max_grad_norm: float | None = attrs.field(default=None, validator=number(0, low_open=True, optional=True))
    max_update_norm: float | None = attrs.field(default=None, validator=number(0, low_open=True, optional=True))
    max_total_update_norm: float | None = attrs.field(default=None, validator=number(0, low_open=True, optional=True))
    max_loss_ratio: float | None = attrs.field(default=None, validator=number(0, low_open=True, optional=True))
    max_loss_increase: float | None = attrs.field(default=None, validator=number(0, optional=True))
    stop_on_non_finite: bool = True
    rollback_on_stop: bool = True
    # CoTTA (Wang et al., CVPR 2022); defaults from the paper's CIFAR setting
    cotta_ema_momentum: float = attrs.field(default=0.999, validator=number(0, 1))
    cotta_augmentations: tuple[str, ...] = attrs.field(
        default=COTTA_AUGMENTATIONS, converter=_str_tuple, validator=_augmentations
    )
    cotta_aggregation: str = attrs.field(default="confidence_weighted_mean", validator=one_of(COTTA_AGGREGATIONS))
    cotta_restore_prob: float = attrs.field(default=0.01, validator=number(0, 1))
    cotta_restore_interval: int = attrs.field(default=1, validator=number(1, integer=True))
    cotta_confidence_threshold: float = attrs.field(default=0.92, validator=number(0, 1))
    cotta_predict_with: str = attrs.field(default="teacher", validator=one_of(PREDICT_WITH))
    # episodic adaptation of K images at once (reset="sample")
    streams: int = attrs.field(default=1, validator=number(1, integer=True))
    # online schedule: predict a batch after adapting on it, or reuse the adaptation's own forward (Tent's code)
    online_predict: str = attrs.field(default="after_update", validator=one_of(ONLINE_PREDICT))

    @property
    def prediction_bn(self) -> str:
        """The BatchNorm normalisation predictions use: the adaptation's (batch statistics unless ``bn_mode``
        is ``eval``)."""
        return "eval" if self.bn_mode == "eval" else "batch"

    @classmethod
    def from_preset(cls, preset: str | None, **explicit: Any) -> "TTTConfig":
        """A config from a preset's values overridden by the ``explicit`` ones (an explicit value wins)."""
        from yolozu.tta.presets import preset_values

        values = preset_values(preset) if preset else {}
        values.update(explicit)
        return cls(preset=preset, **values)

    def replace(self, **changes: Any) -> "TTTConfig":
        """A copy with ``changes`` applied (validated)."""
        return attrs.evolve(self, **changes)

    def to_dict(self) -> dict:
        """Plain JSON-ready values of every field."""
        return attrs.asdict(
            self, value_serializer=lambda inst, field, value: list(value) if isinstance(value, tuple) else value
        )
