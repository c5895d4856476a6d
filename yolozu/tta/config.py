"""``TTTConfig``: every test-time training setting, declared once and validated on construction.

The settings every method shares are declared here; the guards' beside the guards
(``yolozu.functional.guards.GuardLimits``) and each method's beside the method (its settings class in the
method registry, ``yolozu.tta.methods``), taken over as fields named ``prefix + name``. Each field
carries its help text and its validator's range or choices, from which the command-line flags, ``--help``,
validation messages and ``meta.ttt`` are generated. A bad value is a ``ValueError`` naming the field and what
it accepts. Defaults keep TTT off; presets (``yolozu.tta.presets``) bundle tested settings, and an explicitly
given value wins over its preset.
"""

from __future__ import annotations

from typing import Any, Mapping

import attrs

from yolozu.bridge import BN_PRIOR, BN_SHRINK
from yolozu.functional.filters import FILTERS
from yolozu.functional.guards import GuardLimits
from yolozu.functional.methods import MethodEntry
from yolozu.functional.optim import OPTIMIZERS
from yolozu.functional.settings import OneOf, copy_field, number, one_of, setting, str_tuple
from yolozu.functional.step import BN_MODES
from yolozu.tta.methods import METHODS, entry
from yolozu.tta.preset_table import PRESETS, preset_values

SUPPORTED_TTT_METHODS = tuple(METHODS)
"""The registered methods (YOLOZU's five, then the project's and any plug-in's): the choices of ``method``."""
RESETS = ("stream", "sample")
SDFT_TASKS = ("pose", "keypoints", "depth", "seg", "full")
SCHEDULES = ("pre", "online")
ONLINE_PREDICT = ("after_update", "adapt_forward")

COMMON = {
    "enabled": setting(False, "adapt the model before/while predicting"),
    "method": None,  # its choices come from the method registry (``_fields``)
    "reset": setting(
        "stream",
        "stream: one adapted model for the whole run; sample: every image adapts from the source weights",
        one_of(*RESETS),
    ),
    "steps": setting(
        1,
        "optimiser steps: in all, cycling over the max_batches batches (pre schedule); per batch (online); "
        "per image (reset sample)",
        number(1, integer=True),
    ),
    "batch_size": setting(1, "images per adaptation batch", number(1, integer=True)),
    "lr": setting(1e-4, "learning rate", number(0, low_open=True)),
    "rollback_on_stop": setting(True, "undo the step a guard stops"),
    "max_grad_norm": setting(None, "clip gradients to this global norm", number(0, optional=True), type=float),
    "update_filter": setting("all", "the parameters to adapt", one_of(*FILTERS)),
    "include": setting(None, "only parameters whose name contains one of these", type=tuple, converter=str_tuple),
    "exclude": setting(None, "no parameter whose name contains one of these", type=tuple, converter=str_tuple),
    "max_batches": setting(
        1, "adapt on at most this many batches (none: every one)", number(1, integer=True, optional=True), type=int
    ),
    "seed": setting(
        None,
        "seed of the TTT random keys (none: drawn from torch's global generator)",
        number(0, integer=True, optional=True),
        type=int,
    ),
    "log_out": setting(None, "write a JSON log of the run here", type=str, converter=attrs.converters.optional(str)),
    # YOLOZU 4.12's multi-task fields (the aux_*_weight ones are Tent's settings: yolozu.functional.methods.tent)
    "aux_temperature": setting(
        1.0,
        "temperature of auxiliary self-distillation (recorded: YOLOZU's Tent consistency does not use it either)",
        number(0, low_open=True),
    ),
    "sdft_task": setting(
        None,
        "task hint: picks a task preset for a plain --ttt (pose, keypoints, depth, seg) and is recorded",
        OneOf(SDFT_TASKS, optional=True),
        type=str,
    ),
    # our additions, after YOLOZU's fields
    "preset": setting(
        None, "tested settings; explicit values win", attrs.validators.optional(one_of(*PRESETS)), type=str
    ),
    "schedule": setting(
        "pre", "pre: adapt, then predict all; online: adapt on batch t, then predict batch t", one_of(*SCHEDULES)
    ),
    "optimizer": setting("adam", "the optimiser", one_of(*OPTIMIZERS)),
    "momentum": setting(0.9, "SGD momentum", number(0, 1)),
    "source_pull": setting(
        0.0,
        "each update also moves the adapted parameters this fraction of the way back to the source ones (0: "
        "off): bounds their drift on a long stream",
        number(0, 1),
    ),
    "bn_mode": setting(
        "running",
        "BatchNorm while adapting: running (batch statistics, running stats updated), batch (batch statistics "
        "only), eval (stored stats), mix (stored stats as a prior of bn_prior images mixed with the batch's), "
        "shrink (the batch's deviation from the stored stats soft-thresholded at bn_shrink standard errors)",
        one_of(*BN_MODES),
    ),
    "bn_prior": setting(
        BN_PRIOR, "bn_mode mix: the stored statistics' strength in images (Schneider et al. 2020's N)", number(0)
    ),
    "bn_shrink": setting(
        BN_SHRINK, "bn_mode shrink: the threshold in standard errors (Gong et al. 2022's instance-aware BN)", number(0)
    ),
    "streams": setting(1, "sample reset: images adapted at once, vmapped", number(1, integer=True)),
    "online_predict": setting(
        "after_update",
        "online: predict after the update, or reuse the adaptation's forward pass (Tent's reference code)",
        one_of(*ONLINE_PREDICT),
    ),
    "capture": setting(
        False,
        "record each update as a CUDA graph per batch shape and replay it (fewer kernel launches; CPU: no effect)",
    ),
}
POSITIONAL = (
    "enabled", "method", "reset", "steps", "batch_size", "lr", "stop_on_non_finite", "rollback_on_stop",
    "max_grad_norm", "max_update_norm", "max_total_update_norm", "max_loss_ratio", "max_loss_increase",
    "update_filter", "include", "exclude", "max_batches", "seed", "log_out",
)  # fmt: skip
"""YOLOZU's order of the fields every method shares (positional use); each method's YOLOZU fields follow."""
POSITIONAL_TAIL = (
    "aux_pose_weight", "aux_keypoints_weight", "aux_depth_weight", "aux_seg_weight", "aux_temperature",
    "sdft_task", "detector_response", "response_conf_min", "response_topk", "response_min_selected",
    "response_class_weight", "response_bbox_weight", "response_entropy_weight",
)  # fmt: skip
"""YOLOZU 4.12's fields after the methods' (the aux weights and the detector response are Tent's settings), before
the project's."""


def _fields(methods: Mapping[str, MethodEntry]) -> dict[str, Any]:
    """Every field, in YOLOZU's positional order first: the shared ones (``POSITIONAL``), the methods' YOLOZU
    fields (``yolozu`` in their metadata), then the rest. A method's fields are named ``prefix + name`` and
    grouped under the method's name in ``grouped()``; each field's flag is in its metadata."""
    shared = {**COMMON, **{f.name: copy_field(f) for f in attrs.fields(GuardLimits)}}
    shared["method"] = setting("tent", "the test-time training method", one_of(*methods))
    per_method = {}
    for name, method in methods.items():
        flag_prefix = method.prefix if method.flag_prefix is None else method.flag_prefix
        for field in attrs.fields(method.settings):
            flag = "--ttt-" + (flag_prefix + field.name).replace("_", "-")
            per_method[method.prefix + field.name] = copy_field(field, group=name, prefix=method.prefix, flag=flag)
    methods_first = (n for n, f in per_method.items() if f.metadata.get("yolozu") and n not in POSITIONAL_TAIL)
    first = [*POSITIONAL, *methods_first, *POSITIONAL_TAIL]
    fields = {**shared, **per_method}
    return {**{n: fields[n] for n in first}, **{n: f for n, f in fields.items() if n not in first}}


class _Config:
    """What a config does with its fields; ``config_class`` generates the fields themselves."""

    @property
    def prediction_bn(self) -> str:
        """The BatchNorm normalisation predictions use: the adaptation's (``batch`` for ``running``: predictions
        update no running statistics)."""
        return "batch" if self.bn_mode == "running" else self.bn_mode

    @classmethod
    def from_preset(cls, preset: str | None, **explicit: Any) -> "TTTConfig":
        """A config from a preset's values overridden by the ``explicit`` ones (an explicit value wins)."""
        values = preset_values(preset) if preset else {}
        values.update(explicit)
        return cls(preset=preset, **values)

    def replace(self, **changes: Any) -> "TTTConfig":
        """A copy with ``changes`` applied (validated)."""
        return attrs.evolve(self, **changes)

    def method_settings(self) -> Any:
        """The settings object of ``method`` (its class from the method registry) built from this config."""
        method = entry(self.method)
        return method.settings(**{f.name: getattr(self, method.prefix + f.name) for f in attrs.fields(method.settings)})

    def calibration_split(self) -> str | None:
        """The split of in-distribution data ``method`` calibrates on (EATA's Fisher data), if it asks for one."""
        method = entry(self.method)
        return getattr(self, method.prefix + method.calibration) if method.calibration else None

    def guard_limits(self) -> GuardLimits:
        """The guard thresholds this config sets."""
        return GuardLimits(**{f.name: getattr(self, f.name) for f in attrs.fields(GuardLimits)})

    def to_dict(self) -> dict:
        """Plain JSON-ready values of every field."""
        return attrs.asdict(
            self, value_serializer=lambda inst, field, value: list(value) if isinstance(value, tuple) else value
        )

    def grouped(self) -> dict:
        """``to_dict()`` with each method's settings in a dict under its name, keyed without their prefix (the
        shape of ``meta.ttt``)."""
        flat = self.to_dict()
        out: dict[str, Any] = {}
        for field in attrs.fields(type(self)):
            group = field.metadata.get("group")
            if group is None:
                out[field.name] = flat[field.name]
            else:
                out.setdefault(group, {})[field.name[len(field.metadata["prefix"]) :]] = flat[field.name]
        return out


def config_class(methods: Mapping[str, MethodEntry] = METHODS) -> type:
    """The config class of a method registry: the common, guard and method fields as a frozen attrs class.

    Args:
      methods: the method registry (name -> ``MethodEntry``), by default built-in methods and plug-ins.
    Returns:
      The ``TTTConfig`` class."""
    namespace = {"__doc__": _DOC, "__module__": __name__, "__qualname__": "TTTConfig"}
    return attrs.frozen(type("TTTConfig", (_Config,), namespace), these=_fields(methods))


_DOC = """Test-time training settings (field names follow the ``--ttt-*`` CLI flags; ``attrs.fields(TTTConfig)`` lists
them with their help). ``steps`` is the total of the ``pre`` flow (per batch online, per image episodic);
``max_batches`` caps the adapted batches (default 1, YOLOZU's; None: every batch the loader yields)."""

TTTConfig = config_class()
