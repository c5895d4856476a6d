"""``TentRunner``: YOLOZU's stateful Tent API over the functional ``tent_step``.

runner = TentRunner(model, config=TentConfig(lr=1e-3))
for batch in loader:
    metrics = runner.adapt_step(batch)     # the model holds the adapted weights afterwards
runner.maybe_log()                          # {"updated_param_count", ...}
runner.reset()                              # source weights, buffers and optimiser state again
"""

from __future__ import annotations

import logging

import attrs
import torch
from torch import nn

from yolozu.functional.readout import DEFAULT_READOUT, Readout
from yolozu.tta.config import TTTConfig
from yolozu.tta.engine import Adaptation

log = logging.getLogger(__name__)


@attrs.frozen(kw_only=True)
class TentConfig:
    """Tent settings; defaults follow the Tent paper: BatchNorm affine params, batch statistics, Adam."""

    lr: float = 1e-3
    optimizer: str = "adam"
    update_filter: str = "norm_only"
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    bn_mode: str = "running"
    max_grad_norm: float | None = None
    max_update_norm: float | None = None
    max_total_update_norm: float | None = None
    max_loss_ratio: float | None = None
    max_loss_increase: float | None = None
    stop_on_non_finite: bool = True
    rollback_on_stop: bool = True
    log_every: int = 0

    def __attrs_post_init__(self) -> None:
        self.to_ttt_config()  # validates every field now, with TTTConfig's messages

    def to_ttt_config(self) -> TTTConfig:
        """The equivalent (validated) ``TTTConfig``."""
        fields = attrs.asdict(self)
        fields.pop("log_every")
        return TTTConfig(enabled=True, method="tent", **fields)


class TentRunner:
    """Tent on a module, one ``adapt_step(batch)`` at a time; the module holds the adapted weights after each."""

    def __init__(self, model: nn.Module, config: TentConfig = TentConfig(), *, readout: Readout = DEFAULT_READOUT):
        self.model = model
        self.config = config
        self._adaptation = Adaptation(model, config.to_ttt_config(), readout)

    @property
    def updated_param_count(self) -> int:
        return self._adaptation.updated_param_count

    def adapt_step(self, batch: torch.Tensor) -> dict:
        """One guarded entropy step; returns ``loss_entropy``, ``grad_norm``, ``update_norm``, ... of the step.

        A step a guard stops is rolled back and later calls do nothing until ``reset()``.
        """
        if self._adaptation.stopped:
            return {"skipped": True, "stop_reason": self._adaptation.stop_reason}
        row = self._adaptation.step(batch)
        self._adaptation.write_back()
        metrics = {"loss_entropy": row["loss"], **row}
        every = self.config.log_every
        if every and self._adaptation.attempts % every == 0:
            log.info("tent step %d: %s", self._adaptation.attempts, self.maybe_log())
        return metrics

    def maybe_log(self) -> dict:
        """Counters for logging: ``updated_param_count``, ``steps``, ``last_loss``, ``stopped``, ``stop_reason``."""
        losses = self._adaptation.losses
        return {
            "updated_param_count": self.updated_param_count,
            "steps": len(losses),
            "last_loss": losses[-1] if losses else None,
            "stopped": self._adaptation.stopped,
            "stop_reason": self._adaptation.stop_reason,
        }

    def reset(self) -> None:
        """Restore the source weights, buffers and optimiser state into the module."""
        self._adaptation.restart()
        self._adaptation.write_back()
