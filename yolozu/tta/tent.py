"""``TentRunner``: YOLOZU's stateful Tent API over the functional core.

runner = TentRunner(model, config=TentConfig(lr=1e-3, update_filter="norm_only"))
for batch in loader:
    metrics = runner.adapt_step(batch)     # the model holds the adapted weights afterwards
runner.maybe_log()                          # {"updated_param_count", ...}, logged every log_every steps
runner.reset()                              # YOLOZU's: keeps the adapted weights (reset(source=True): the source)
"""

from __future__ import annotations

import logging
from typing import Any

import attrs
import torch
from torch import nn

from yolozu.functional.methods.tent import aux_consistency, aux_key_weights
from yolozu.functional.optim import GradientTransformation
from yolozu.functional.readout import DEFAULT_READOUT, Readout
from yolozu.functional.response import weak_photometric_view
from yolozu.functional.settings import copy_field, number, one_of, setting
from yolozu.tta.base import TTARunner
from yolozu.tta.config import TTTConfig
from yolozu.tta.engine import Adaptation

log = logging.getLogger(__name__)
_deterministic_weak_photometric_view = weak_photometric_view  # YOLOZU's name of the student's view


def _extract_outputs(output: Any) -> dict:
    """YOLOZU's reading of a forward output as a dict: a dict as it is, a tensor as ``{"logits": tensor}``."""
    return output if isinstance(output, dict) else {"logits": output}


def _aux_consistency_loss(
    outputs: dict,
    teacher_outputs: dict | None,
    *,
    pose_weight: float = 0.0,
    keypoints_weight: float = 0.0,
    depth_weight: float = 0.0,
    seg_weight: float = 0.0,
) -> tuple[torch.Tensor | None, dict[str, float]]:
    """YOLOZU's eager face of Tent's auxiliary consistency (``functional.methods.tent.aux_consistency``):
    (the weighted loss or None when no key applies, e.g. without a teacher; each applied key's float term)."""
    if teacher_outputs is None:
        return None, {}
    weights = aux_key_weights(pose_weight, keypoints_weight, depth_weight, seg_weight)
    total, parts = aux_consistency(outputs, teacher_outputs, weights)
    return total, {name: float(value) for name, value in parts.items()}
_FIELDS = attrs.fields_dict(TTTConfig)


@attrs.frozen(kw_only=True)
class TentConfig(TTTConfig):
    """A ``TTTConfig`` for Tent with YOLOZU's ``TentConfig`` defaults (every parameter, lr 1e-4; the Tent paper
    adapts BatchNorm's affine parameters: ``update_filter="norm_only"``) and ``log_every`` (``maybe_log`` logs
    every that many steps; 0: never)."""

    enabled: bool = copy_field(_FIELDS["enabled"], default=True)
    method: str = attrs.field(default="tent", validator=one_of("tent"))
    log_every: int = setting(0, "log the counters every this many steps (0: never)", number(0, integer=True))


_TENT = attrs.fields(TentConfig).method.default


def tent_config(config: object) -> TentConfig:
    """``config`` if it is a ``TentConfig`` (None: the default ``TentConfig()``).

    Args:
      config: what ``TentRunner`` was given as its config.
    Returns:
      ``config``, checked.
    Raises:
      ValueError: a ``TTTConfig`` of another method (MIM, EATA, ...).
      TypeError: anything else, a plain ``TTTConfig`` of Tent included (its ``enabled`` defaults to False and it
        has no ``log_every``: say ``TentConfig(...)`` with the same settings)."""
    if config is None:
        return TentConfig()
    if isinstance(config, TentConfig):
        return config
    if isinstance(config, TTTConfig) and config.method != _TENT:
        raise ValueError(f"TentRunner runs Tent, but the config's method is {config.method!r}; use "
                         "yolozu.tta.run_ttt (or the export's --ttt-method) for other methods")
    raise TypeError(f"TentRunner's config must be a TentConfig, got {type(config).__name__}; write "
                    "TentConfig(lr=..., ...) with the same settings")


class TentRunner(TTARunner):
    """Tent on a module, one ``adapt_step(batch)`` at a time; the module holds the adapted weights after each."""

    def __init__(
        self, model: nn.Module, config: TentConfig | None = None, *, readout: Readout = DEFAULT_READOUT
    ) -> None:
        """Args: ``model``, the module to adapt; ``config``, a ``TentConfig`` (None: the default; ``enabled=False``:
        ``adapt_step`` changes nothing); ``readout``, how the model's outputs are read.

        Raises: TypeError for arguments of the wrong type, ValueError for a config of another method (MIM, EATA,
        ...: ``run_ttt`` runs those); both before any weight is touched."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"TentRunner needs a torch.nn.Module to adapt, got {type(model).__name__}")
        self.model = model
        self.config = config = tent_config(config)
        if not isinstance(readout, Readout):
            raise TypeError(f"TentRunner's readout must be a yolozu.functional.readout.Readout, got "
                            f"{type(readout).__name__}")
        self._adaptation = Adaptation(model, config, readout)

    @property
    def updated_param_count(self) -> int:
        """Numel of the parameters Tent adapts."""
        return self._adaptation.updated_param_count

    @property
    def params(self) -> list[nn.Parameter]:
        """The module's parameters Tent adapts (the update filter's selection)."""
        named = dict(self.model.named_parameters())
        return [named[name] for name in self._adaptation.source.trainable]

    @property
    def optimizer(self) -> GradientTransformation:
        """The optimiser: a pure ``init``/``update`` pair (``yolozu.functional.optim``); its state lives in the
        runner and is reset with the weights."""
        return self._adaptation.method.optimizer

    @property
    def _has_aux(self) -> bool:
        """Whether an auxiliary consistency weight is set (YOLOZU's attribute)."""
        return bool(self.config.method_settings().aux_weights())

    def adapt_step(self, batch: torch.Tensor) -> dict:
        """One guarded step.

        A step a guard stops is rolled back and later calls do nothing until ``reset(source=True)``.

        Args:
          batch: the input batch ``(B, C, H, W)``.
        Returns:
          The step's row with YOLOZU's keys (``loss_total``, ``loss_entropy``, ``loss_aux_consistency``,
          ``aux_target_current_batch``, ``grad_norm``, ``grad_norm_clipped``, ``forward_calls``,
          ``backward_calls``, ``optimizer_steps``, ``update_abstained``) and ours, or ``skipped`` and
          ``stop_reason`` once stopped."""
        if not isinstance(batch, torch.Tensor):
            raise TypeError(f"adapt_step needs a batch tensor, got {type(batch).__name__}")
        if not self.config.enabled:  # TentConfig(enabled=False): the model stays as it is
            return {"skipped": True, "stop_reason": None, "enabled": False}
        if self._adaptation.stopped:
            return {"skipped": True, "stop_reason": self._adaptation.stop_reason}
        (row,) = self._adaptation.adapt(batch, len(self._adaptation.rows), steps=1)
        self._adaptation.write_back()
        self.maybe_log()
        defaults = {"loss_entropy": row["loss"], "loss_aux_consistency": 0.0, "aux_target_current_batch": 0.0,
                    "update_abstained": 0.0}  # fmt: skip
        return {**defaults, **row, "optimizer_steps": float(row["optimizer_step"])}

    def maybe_log(self) -> dict:
        """The counters (``updated_param_count``, ``steps``, ``last_loss``, ``stopped``, ``stop_reason``); they
        are also logged (INFO, logger ``yolozu.tta.tent``) when the steps taken are a multiple of ``log_every``.

        Returns:
          The counters."""
        losses = self._adaptation.losses
        counters = {
            "updated_param_count": self.updated_param_count,
            "steps": len(losses),
            "last_loss": losses[-1] if losses else None,
            "stopped": self._adaptation.stopped,
            "stop_reason": self._adaptation.stop_reason,
        }
        every, taken = self.config.log_every, len(self._adaptation.rows)
        if every and taken and taken % every == 0:
            log.info("tent step %d: %s", taken, counters)
        return counters

    def reset(self, *, source: bool = False) -> None:
        """YOLOZU's reset: the adapted weights and the optimiser's state stay (YOLOZU only puts the learning
        rate back to the configured one, which this runner never changes). ``source=True``: restore the source
        weights, buffers and optimiser state into the module, and clear a guard's stop.

        Args:
          source: restore the source (the project's reset) instead of keeping the adapted weights."""
        if source:
            self._adaptation.restart()
            self._adaptation.write_back()
