"""``TentRunner``: YOLOZU's stateful Tent API over the functional core.

runner = TentRunner(model, config=TentConfig(lr=1e-3, update_filter="norm_only"))
for batch in loader:
    metrics = runner.adapt_step(batch)     # the model holds the adapted weights afterwards
runner.maybe_log()                          # {"updated_param_count", ...}, logged every log_every steps
runner.reset()                              # source weights, buffers and optimiser state again
"""

from __future__ import annotations

import logging

import attrs
import torch
from torch import nn

from yolozu.functional.optim import GradientTransformation
from yolozu.functional.readout import DEFAULT_READOUT, Readout
from yolozu.functional.response import weak_photometric_view
from yolozu.functional.settings import copy_field, number, one_of, setting
from yolozu.tta.config import TTTConfig
from yolozu.tta.engine import Adaptation

log = logging.getLogger(__name__)
_deterministic_weak_photometric_view = weak_photometric_view  # YOLOZU's name of the response variant's view
_FIELDS = attrs.fields_dict(TTTConfig)


@attrs.frozen(kw_only=True)
class TentConfig(TTTConfig):
    """A ``TTTConfig`` for Tent with YOLOZU's ``TentConfig`` defaults (every parameter, lr 1e-4; the Tent paper
    adapts BatchNorm's affine parameters: ``update_filter="norm_only"``) and ``log_every`` (``maybe_log`` logs
    every that many steps; 0: never)."""

    enabled: bool = copy_field(_FIELDS["enabled"], default=True)
    method: str = attrs.field(default="tent", validator=one_of("tent"))
    log_every: int = setting(0, "log the counters every this many steps (0: never)", number(0, integer=True))


class TentRunner:
    """Tent on a module, one ``adapt_step(batch)`` at a time; the module holds the adapted weights after each."""

    def __init__(self, model: nn.Module, config: TentConfig = TentConfig(), *, readout: Readout = DEFAULT_READOUT):
        self.model = model
        self.config = config
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

    def adapt_step(self, batch: torch.Tensor) -> dict:
        """One guarded entropy step; returns ``loss_entropy``, ``grad_norm``, ``update_norm``, ... of the step.

        A step a guard stops is rolled back and later calls do nothing until ``reset()``.

        Args:
          batch: the input batch ``(B, C, H, W)``.
        Returns:
          The step's row (``step_metrics`` fields and ``loss_entropy``), or ``skipped`` and ``stop_reason`` once
          stopped."""
        if self._adaptation.stopped:
            return {"skipped": True, "stop_reason": self._adaptation.stop_reason}
        (row,) = self._adaptation.adapt(batch, len(self._adaptation.rows), steps=1)
        self._adaptation.write_back()
        self.maybe_log()
        return {"loss_entropy": row["loss"], **row}

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

    def reset(self) -> None:
        """Restore the source weights, buffers and optimiser state into the module."""
        self._adaptation.restart()
        self._adaptation.write_back()
