"""``Adaptation``: the stateful shell around one functional method on one module.

It owns the functional state, runs guarded steps (a step a guard stops is rolled back, params and buffers,
simply by not adopting the new state), derives each step's RNG key from the seed, and writes the adapted
tensors into the module only when asked (``write_back``), so an error mid-run leaves the module untouched.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from yolozu.functional import cotta, guards, optim, rng, streams
from yolozu.functional.filters import select
from yolozu.functional.mim import mim_method
from yolozu.functional.readout import DEFAULT_READOUT, Readout
from yolozu.functional.state import count, stack
from yolozu.functional.step import Method, TTTState, init_state, make_update
from yolozu.functional.tent import tent_method
from yolozu.tta.config import TTTConfig
from yolozu.tta.report import TTTReport

ROW_KEYS = ("loss", "grad_norm", "update_norm", "total_update_norm")
METHOD_KEYS = {"tent": (), "mim": ("mask_ratio",), "cotta": ("consistency_loss", "ema_momentum", "restored_count")}


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


def build_method(
    model: nn.Module, config: TTTConfig, readout: Readout, optimizer: optim.GradientTransformation
) -> Method:
    """The functional ``Method`` of ``config.method`` over ``model``."""
    common = {"readout": readout, "bn": config.bn_mode}
    if config.method == "tent":
        return tent_method(model, optimizer, **common)
    if config.method == "mim":
        return mim_method(
            model,
            optimizer,
            patch_size=config.patch_size,
            mask_prob=config.mask_prob,
            mask_value=config.mask_value,
            **common,
        )
    if config.method == "cotta":
        return cotta.cotta_method(
            model,
            optimizer,
            augmentations=config.cotta_augmentations,
            aggregation=config.cotta_aggregation,
            confidence_threshold=config.cotta_confidence_threshold,
            ema_momentum=config.cotta_ema_momentum,
            restore_prob=config.cotta_restore_prob,
            restore_interval=config.cotta_restore_interval,
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
        self.method = build_method(model, config, readout, self.optimizer)
        self._update = make_update(self.method, keep_output=keep_output)
        self._keep_output = keep_output
        self._streams_update = None
        self._method_keys = METHOD_KEYS.get(config.method, ())
        self.device = _device_of(model)
        self.source = init_state(model, self.names, self.optimizer)
        if config.method == "cotta":
            self.source = cotta.init_teacher(self.source)
        self.state = self.source
        self.root_key = rng.key(config.seed)
        self.attempts = 0
        self.rows: list[dict] = []
        self.losses: list[float] = []
        self.mask_ratios: list[float] = []
        self.stop_reason: str | None = None
        self.stops: list[str] = []
        self.last_output: Any = None

    @property
    def updated_param_count(self) -> int:
        """Numel of the parameters the update filter selected."""
        return count(self.source.trainable)

    @property
    def stopped(self) -> bool:
        """True once a guard has stopped this run (until ``restart``)."""
        return self.stop_reason is not None

    def key(self, batch: int, step: int) -> rng.Key:
        """The key of step ``step`` on batch ``batch``: the same wherever and however that batch is adapted."""
        return rng.fold_in(rng.fold_in(self.root_key, batch), step)

    def step(self, x: torch.Tensor, *, batch: int | None = None, step: int = 0) -> dict:
        """One guarded step on the batch ``x``; returns its ``step_metrics`` row.

        ``batch`` (the batch or image index, recorded in the row) and ``step`` (the step on that batch) pick
        the step's random key; without ``batch`` each call counts as a new batch.
        """
        index = self.attempts if batch is None else batch
        x = x.to(self.device)
        new_state, metrics = self._update(self.state, x, self.method.draw(self.key(index, step), self.state, x))
        labels = {} if batch is None else {"batch": batch}
        (row,) = self._log(metrics, guards.verdict(metrics, self.limits), labels=[labels])
        if not row["rolled_back"]:
            self.state = new_state
        self.last_output = metrics.get("output")
        return row

    def adapt(self, x: torch.Tensor, *, batch: int, steps: int) -> None:
        """Up to ``steps`` guarded steps on batch ``batch``, ending early when a guard stops the run."""
        for step in range(steps):
            self.step(x, batch=batch, step=step)
            if self.stopped:
                return

    def _log(
        self, metrics: dict, codes: torch.Tensor, *, labels: list[dict], active: torch.Tensor | None = None
    ) -> list[dict]:
        """Verdicts and ``step_metrics`` rows of one step, for one stream or K (metrics with a leading dim K).

        Returns one row per stream that took the step (``active``); records losses and stops of kept steps.
        """
        codes = codes.reshape(-1).tolist()
        keys = ROW_KEYS + self._method_keys
        table = torch.stack([metrics[k].detach().double().cpu().reshape(-1) for k in keys], dim=1).tolist()
        taken = [True] * len(codes) if active is None else active.tolist()
        rows = []
        for code, values, label, took in zip(codes, table, labels, taken):
            if not took:
                continue
            self.attempts += 1
            row = {"step": self.attempts, **label, **dict(zip(keys, values))}
            if self.config.method == "cotta":
                row["ema_momentum"] = self.config.cotta_ema_momentum
                row["aug"] = self.aug_summary
            reason = guards.reason(code)
            row["rolled_back"] = reason is not None and self.config.rollback_on_stop
            row["stop_reason"] = reason
            if not row["rolled_back"]:
                self.losses.append(row["loss"])
                if "mask_ratio" in row:
                    self.mask_ratios.append(row["mask_ratio"])
            if reason is not None:
                self.stop_reason = reason
                self.stops.append(reason)
            self.rows.append(row)
            rows.append(row)
        return rows

    def adapt_streams(self, xs: torch.Tensor, indices: list[int], steps: int) -> TTTState:
        """Episodic adaptation of K images at once: ``xs`` is ``(K, B, C, H, W)``, stream k adapts image
        ``indices[k]`` from the source for ``steps`` guarded steps. Returns the stacked final states.

        Equal, stream by stream, to ``restart()`` then ``steps`` calls of ``step(x, batch=index, step=s)``:
        each stream gets the same keys, and a stream a guard stops keeps its last good state.
        """
        if self._streams_update is None:
            self._streams_update = streams.streams_update(self.method, keep_output=self._keep_output)
        xs = xs.to(self.device)
        state = streams.replicate(self.source, len(indices))
        active = torch.ones(len(indices), dtype=torch.bool)
        for s in range(steps):
            noises = [self.method.draw(self.key(i, s), self.source, x) for i, x in zip(indices, xs)]
            noises = None if noises[0] is None else stack(noises)
            new_state, metrics = self._streams_update(state, xs, noises)
            codes = guards.verdict(metrics, self.limits)
            self._log(metrics, codes, labels=[{"batch": i} for i in indices], active=active)
            ok = codes.reshape(-1).cpu() == 0
            keep = active & (ok | (not self.config.rollback_on_stop))
            state = streams.select(keep.to(self.device), new_state, state)
            active = active & ok
            if not bool(active.any()):
                break
        self.stop_reason = None
        return state

    @property
    def aug_summary(self) -> dict:
        """CoTTA's teacher augmentation settings, as logged in each step row."""
        c = self.config
        return {
            "augmentations": list(c.cotta_augmentations),
            "aggregation": c.cotta_aggregation,
            "branches": len(c.cotta_augmentations),
        }

    def predicting(self, state: TTTState | None = None) -> dict[str, torch.Tensor]:
        """The adapted parameters predictions use (of ``state``, default the current one, stacked or not):
        CoTTA's teacher unless ``cotta_predict_with="student"``, else the trainable ones."""
        state = self.state if state is None else state
        if self.config.method == "cotta" and self.config.cotta_predict_with == "teacher":
            return state.extras[cotta.TEACHER]
        return state.trainable

    def prediction_params(self) -> dict[str, torch.Tensor]:
        """Every parameter of the current state as predictions use them (``predicting`` plus the frozen ones)."""
        return {**self.state.frozen, **self.predicting()}

    def restart(self) -> None:
        """Back to the source weights, buffers and optimiser state (episodic reset); the log is kept."""
        self.state = self.source
        self.stop_reason = None

    def write_back(self) -> None:
        """Copy the parameters predictions use (``prediction_params``) and the buffers into the module."""
        write_into(self.model, {**self.prediction_params(), **self.state.buffers})

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
            stopped_early=bool(self.stops),
            stop_reason=self.stops[0] if self.stops else None,
            step_metrics=list(self.rows),
            warnings=list(warnings),
        )
