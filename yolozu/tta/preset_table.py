"""The table of named TTT presets (YOLOZU 4.12's twelve): tested core settings of a method, a filter and its guards.

``yolozu.tta.presets`` applies them to command-line arguments (the rules below); this module is only the table,
so that ``TTTConfig`` can name the presets without importing the rules that read ``TTTConfig``.

A preset is a ``TTTPreset``: the core knobs (``method``, ``steps``, ``batch_size``, ``lr``, ``update_filter``,
``max_batches``, ``detector_response``) and the guard limits it fills when they are unset. On the command line
(``apply_ttt_preset_args``, YOLOZU's rules):

- ``--ttt-preset NAME`` sets the core knobs to the preset's and fills every guard left unset;
- a plain ``--ttt`` picks a preset (``auto_preset``: the ``--ttt-sdft-task`` task, then the method, then an
  ``adapter_only`` filter, else ``safe``); with the core knobs at their defaults it is applied whole and recorded
  as the run's preset, otherwise only its guards fill the unset ones (``--ttt --ttt-steps 5`` still runs guarded).

In the library, ``TTTConfig.from_preset(name, **explicit)`` takes the preset's values and lets every explicit one
win.
"""

from __future__ import annotations

from typing import Any, Mapping

import attrs

from yolozu.tta.paper_presets import PAPERS

CORE = ("method", "steps", "batch_size", "lr", "update_filter", "max_batches", "detector_response")
"""The knobs a preset sets whatever was given (``--ttt-preset``), and that decide whether a plain ``--ttt`` is
at its defaults."""
GUARDS = ("max_grad_norm", "max_update_norm", "max_total_update_norm", "max_loss_ratio", "max_loss_increase")
"""The guard limits a preset fills where unset; of the loss limits only one (ratio first) is filled, and none
when either was given."""


@attrs.frozen(kw_only=True)
class TTTPreset:
    """One preset: its core knobs and the guard limits it fills (None: leaves that guard as it is)."""

    method: str
    steps: int
    batch_size: int
    lr: float
    update_filter: str
    max_batches: int | None
    max_grad_norm: float | None = None
    max_update_norm: float | None = None
    max_total_update_norm: float | None = None
    max_loss_ratio: float | None = None
    max_loss_increase: float | None = None
    detector_response: bool = False
    settings: Mapping[str, Any] = attrs.field(factory=dict)
    """Other ``TTTConfig`` field values (a paper preset's optimiser, BatchNorm mode, schedule, method settings);
    an explicitly given value wins over them."""

    @classmethod
    def of(cls, values: Mapping[str, Any]) -> "TTTPreset":
        """A preset from ``TTTConfig`` field values: its core knobs (one image, one step at lr 1e-4 unless
        given), its guards, the rest as ``settings``.

        Args:
          values: ``TTTConfig`` field values (a paper preset's).
        Returns:
          The ``TTTPreset``.
        """
        core = {"steps": 1, "batch_size": 1, "lr": 1e-4, "max_batches": 1, **values}
        named = {f.name for f in attrs.fields(cls)} - {"settings"}
        return cls(**{k: v for k, v in core.items() if k in named},
                   settings={k: v for k, v in values.items() if k not in named})  # fmt: skip

    def values(self) -> dict[str, Any]:
        """The ``TTTConfig`` field values of this preset (set guards only), with ``enabled``.

        Returns:
          Field name -> value.
        """
        out = {"enabled": True, **self.settings, **{name: getattr(self, name) for name in CORE}}
        out.update({name: getattr(self, name) for name in GUARDS if getattr(self, name) is not None})
        return out


def _preset(method: str, update_filter: str, norm_cap: float, *, steps=1, lr=1e-4, total=None, **extra):
    """A preset of one batch of one image; ``norm_cap`` caps the gradient, each update and (unless ``total``)
    the total drift; the loss may reach 3x the first step's."""
    return TTTPreset(
        method=method,
        steps=steps,
        batch_size=1,
        lr=lr,
        update_filter=update_filter,
        max_batches=1,
        max_grad_norm=norm_cap,
        max_update_norm=norm_cap,
        max_total_update_norm=norm_cap if total is None else total,
        max_loss_ratio=3.0,
        **extra,
    )


PRESETS: dict[str, TTTPreset] = {
    "safe": _preset("tent", "norm_only", 1.0),
    "adapter_only": _preset("tent", "adapter_only", 5.0),
    "mim_safe": _preset("mim", "adapter_only", 5.0),
    "cotta_safe": _preset("cotta", "lora_norm_only", 1.0),
    "eata_safe": _preset("eata", "lora_norm_only", 1.0),
    "sar_safe": _preset("sar", "lora_only", 1.0),
    "detector_response_safe": _preset("tent", "norm_only", 1.0, steps=3, lr=5e-5, detector_response=True),
    "pose_safe": _preset("tent", "lora_norm_only", 1.0, steps=3, lr=5e-5, total=2.0),
    "keypoints_safe": _preset("tent", "lora_norm_only", 1.0, steps=2, lr=5e-5, total=2.0),
    "depth_safe": _preset("tent", "norm_only", 1.0, steps=2, lr=5e-5, total=2.0),
    "seg_safe": _preset("tent", "norm_only", 1.0, steps=2, lr=5e-5, total=2.0),
    "pose_mim": _preset("mim", "adapter_only", 5.0, steps=3, lr=5e-5),
    **{name: TTTPreset.of(values) for name, values in PAPERS.items()},  # never picked by a plain --ttt
}

TASK_PRESETS = {("pose", "tent"): "pose_safe", ("keypoints", "tent"): "keypoints_safe",
                ("depth", "tent"): "depth_safe", ("seg", "tent"): "seg_safe", ("pose", "mim"): "pose_mim"}  # fmt: skip
"""The preset a plain ``--ttt`` gets for a ``--ttt-sdft-task`` and method."""
AUTO = {"sar": "sar_safe", "eata": "eata_safe", "cotta": "cotta_safe", "mim": "mim_safe"}
"""The preset a plain ``--ttt`` gets for each method without a task preset (else ``adapter_only`` or ``safe``)."""


def preset_values(name: str) -> dict[str, Any]:
    """The field values of preset ``name`` (a fresh dict).

    Args:
      name: a key of ``PRESETS``.
    Returns:
      Field name -> value.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown TTT preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name].values()


