"""``Adaptation``: the stateful shell around one functional method on one module.

It owns the functional state, runs guarded steps (a step a guard stops is rolled back, params and buffers,
simply by not adopting the new state), derives each step's RNG key from the seed, and writes the adapted
tensors into the module only when asked (``write_back``), so an error mid-run leaves the module untouched.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from yolozu.functional import guards, optim, rng
from yolozu.functional.filters import select
from yolozu.functional.mim import make_mim_step
from yolozu.functional.readout import DEFAULT_READOUT, Readout
from yolozu.functional.state import count
from yolozu.functional.step import TTTState, init_state
from yolozu.functional.tent import make_tent_step
from yolozu.tta.config import TTTConfig
from yolozu.tta.report import TTTReport

ROW_KEYS = ("loss", "grad_norm", "update_norm", "total_update_norm")
METHOD_KEYS = {"tent": (), "mim": ("mask_ratio",)}


def write_into(module: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy tensors into the module's parameters and buffers of the same names, bitwise."""
    targets = dict(module.named_parameters())
    targets.update(module.named_buffers())
    with torch.no_grad():
        for name, value in tensors.items():
            targets[name].copy_(value)


def guard_limits(config: TTTConfig) -> guards.GuardLimits:
    """The guard thresholds a config sets."""
    return guards.GuardLimits(
        max_update_norm=config.max_update_norm,
        max_total_update_norm=config.max_total_update_norm,
        max_loss_ratio=config.max_loss_ratio,
        max_loss_increase=config.max_loss_increase,
        stop_on_non_finite=config.stop_on_non_finite,
    )


def build_step(
    model: nn.Module,
    config: TTTConfig,
    readout: Readout,
    optimizer: optim.GradientTransformation,
    *,
    differentiate: str = "autograd",
    keep_output: bool = False,
) -> Callable[[TTTState, Any, Any], tuple[TTTState, dict]]:
    """The pure step of ``config.method`` over ``model``."""
    common = {"readout": readout, "bn": config.bn_mode, "differentiate": differentiate}
    if config.method == "tent":
        return make_tent_step(model, optimizer, keep_output=keep_output, **common)
    if config.method == "mim":
        return make_mim_step(
            model,
            optimizer,
            patch_size=config.patch_size,
            mask_prob=config.mask_prob,
            mask_value=config.mask_value,
            **common,
        )
    raise NotImplementedError(f"TTT method {config.method!r} is not available in this build")


def _device_of(model: nn.Module) -> torch.device:
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


class Adaptation:
    """Guarded steps of one TTT method over a module, from its current weights (the source)."""

    def __init__(
        self,
        model: nn.Module,
        config: TTTConfig,
        readout: Readout = DEFAULT_READOUT,
        *,
        keep_output: bool = False,
    ) -> None:
        self.model = model
        self.config = config
        self.names = select(model, config.update_filter, include=config.include, exclude=config.exclude)
        self.optimizer = optim.build(
            config.optimizer, config.lr, momentum=config.momentum, max_grad_norm=config.max_grad_norm
        )
        self.limits = guard_limits(config)
        self._step = build_step(model, config, readout, self.optimizer, keep_output=keep_output)
        self._method_keys = METHOD_KEYS.get(config.method, ())
        self.device = _device_of(model)
        self.source = init_state(model, self.names, self.optimizer)
        self.state = self.source
        self.root_key = rng.key(config.seed)
        self.attempts = 0
        self.rows: list[dict] = []
        self.losses: list[float] = []
        self.mask_ratios: list[float] = []
        self.stop_reason: str | None = None
        self.last_output: Any = None

    @property
    def updated_param_count(self) -> int:
        """Numel of the parameters the update filter selected."""
        return count(self.source.trainable)

    @property
    def stopped(self) -> bool:
        """True once a guard has stopped this run (until ``restart``)."""
        return self.stop_reason is not None

    def step(self, batch: torch.Tensor) -> dict:
        """One guarded step on ``batch``; returns its ``step_metrics`` row."""
        key = rng.fold_in(self.root_key, self.attempts)
        self.attempts += 1
        new_state, metrics = self._step(self.state, batch.to(self.device), key)
        code = int(guards.verdict(metrics, self.limits))
        keys = ROW_KEYS + self._method_keys
        values = torch.stack([metrics[k].detach().float().cpu() for k in keys]).tolist()
        row = {"step": self.attempts, **dict(zip(keys, values))}
        reason = guards.reason(code)
        rolled_back = reason is not None and self.config.rollback_on_stop
        if not rolled_back:
            self.state = new_state
            self.losses.append(row["loss"])
            if "mask_ratio" in row:
                self.mask_ratios.append(row["mask_ratio"])
        row["rolled_back"] = rolled_back
        row["stop_reason"] = reason
        if reason is not None:
            self.stop_reason = reason
        self.last_output = metrics.get("output")
        self.rows.append(row)
        return row

    def restart(self) -> None:
        """Back to the source weights, buffers and optimiser state (episodic reset); the log is kept."""
        self.state = self.source
        self.stop_reason = None

    def write_back(self) -> None:
        """Copy the adapted parameters and buffers into the module."""
        write_into(self.model, {**self.state.trainable, **self.state.buffers})

    def report(self, *, seconds: float, steps_requested: int, batches_used: int, warnings=()) -> TTTReport:
        """The run's ``TTTReport``."""
        mask_ratio = sum(self.mask_ratios) / len(self.mask_ratios) if self.mask_ratios else None
        return TTTReport(
            enabled=True,
            method=self.config.method,
            reset=self.config.reset,
            steps_requested=steps_requested,
            steps_run=len(self.losses),
            batches_used=batches_used,
            seconds=seconds,
            losses=list(self.losses),
            mask_ratio=mask_ratio,
            updated_param_count=self.updated_param_count,
            stopped_early=self.stopped,
            stop_reason=self.stop_reason,
            step_metrics=list(self.rows),
            warnings=list(warnings),
        )
