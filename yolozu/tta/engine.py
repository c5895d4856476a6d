"""``Adaptation``: the stateful shell around one method on one module.

It builds the method its config names (through the method registry, never by asking which method it is),
keeps the driver's carry between calls, turns the driver's step records into YOLOZU's ``step_metrics`` rows,
and writes the adapted tensors into the module only when asked (``write_back``), so an error mid-run leaves
the module untouched. Every step of every entry point runs through ``functional.driver``. ``adaptation_for``
builds one over an adapter's hooks: what the export's schedules (``tta.schedules``) drive.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Iterable, Protocol, Sequence

import torch
from torch import nn

from yolozu.adapter import Record
from yolozu.bridge import BatchStats, make_apply, write_into
from yolozu.functional import guards, optim, rng, streams
from yolozu.functional.driver import ROW_METRICS, Carry, StepRecord, make_driver, start
from yolozu.functional.filters import select
from yolozu.functional.readout import DEFAULT_READOUT, Readout, readout_of
from yolozu.functional.state import Params, count
from yolozu.functional.step import Method
from yolozu.io.feature_stats import load_tensors
from yolozu.tta.config import TTTConfig
from yolozu.tta.method_profiles import TTT_METHOD_PROFILES, get_ttt_method_profile
from yolozu.tta.methods import entry
from yolozu.tta.report import TTTReport


class ModelSharing(Protocol):
    """What ``build_method`` needs of a model shared by the ranks of a process group (the shell above this one
    makes it: ``yolozu.parallel.collectives.SharedModel``)."""

    def batch_stats(self) -> BatchStats:
        """The BatchNorm statistics hook over every rank's batch (``bridge.BatchStats``).

        Returns:
          The hook.
        """

    def gradients(self) -> optim.GradientTransformation:
        """The gradient transformation that averages gradients over the ranks, chained first.

        Returns:
          The transformation.
        """

    def method(self, method: Method) -> Method:
        """``method`` with its loss the global batch's mean.

        Args:
          method: the method built over the shared hooks.
        Returns:
          The shared method.
        """

    def padded(self) -> "ModelSharing":
        """The same model's hooks for a padding batch (this rank holds no image of the global batch).

        Returns:
          Hooks whose statistics and loss count nothing of this rank's batch.
        """


def build_method(
    model: nn.Module,
    config: TTTConfig,
    readout: Readout = DEFAULT_READOUT,
    *,
    optimizer: optim.GradientTransformation | None = None,
    forward: Callable[..., Any] | None = None,
    shared: ModelSharing | None = None,
    **method_options: Any,
) -> tuple[Method, list[str]]:
    """The ``Method`` ``config`` names over ``model`` and the names of the parameters it adapts. ``optimizer``
    replaces the one the config names, ``forward`` the module's own forward (``bridge.make_apply``), and
    ``method_options`` go to the method's constructor (e.g. MIM's ``loss``). ``shared``
    (``parallel.collectives.SharedModel``) makes the ranks of a process group adapt one model: gradients averaged
    before the optimiser, BatchNorm statistics over every rank's batch, the loss the global batch's mean.

    Args:
      model: the module adapted (its tensors are read, never written).
      config: the settings.
      readout: how the method reads its signals from an output.
      optimizer: replaces the optimiser ``config`` names.
      forward: ``forward(model, x, **kwargs)`` in place of ``model(x, ...)``.
      shared: the hooks of a model shared by the ranks (None: this process adapts alone).
      method_options: keyword arguments of the method's constructor.
    Returns:
      ``(method, names)``."""
    names = select(model, config.update_filter, include=config.include, exclude=config.exclude)
    if optimizer is None:
        clip = config.max_grad_norm
        optimizer = optim.build(
            config.optimizer, config.lr, momentum=config.momentum, max_grad_norm=clip, source_pull=config.source_pull
        )
    chosen = entry(config.method)
    settings = config.method_settings()
    given = {name: getattr(settings, name) for name in chosen.files if getattr(settings, name) is not None}
    flag = "--ttt-" + (chosen.flag_prefix if chosen.flag_prefix is not None else chosen.prefix).replace("_", "-")
    files = {name: load_tensors(path, f"{flag}{name.replace('_', '-')}", "check the path")
             for name, path in given.items()}
    stats = shared.batch_stats() if shared is not None else None
    apply = make_apply(model, forward, batch_stats=stats, bn_prior=config.bn_prior, bn_shrink=config.bn_shrink)
    if shared is not None:
        optimizer = optim.chain(shared.gradients(), optimizer)
    if chosen.files:
        method_options = {"files": files, **method_options}
    method = chosen.build(apply, optimizer, settings, readout=readout, bn=config.bn_mode, **method_options)
    return (shared.method(method) if shared is not None else method), names


def _device_of(model: nn.Module) -> torch.device:
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


class Adaptation:
    """Guarded steps of one TTT method over a module, from its current weights (the source).

    ``adapt`` moves the one stream this object carries (``pre``/``online`` schedules, ``run_ttt``,
    ``TentRunner``, ``run_ttt_mim``); ``adapt_episodes`` adapts K images at once, each from the source
    (episodic reset). Both log every step taken in ``rows``.
    """

    def __init__(
        self,
        model: nn.Module,
        config: TTTConfig,
        readout: Readout = DEFAULT_READOUT,
        *,
        keep_output: bool = False,
        calibration: Iterable[torch.Tensor] | None = None,
        **build_options: Any,
    ) -> None:
        self.model = model
        self.config = config
        self._build = functools.partial(build_method, model, config, readout, **build_options)
        self.method, names = self._build()
        self.device = _device_of(model)
        self.source = self.method.init_state(model, names)
        if calibration is not None:  # in-distribution batches the method looks at once (EATA's Fisher)
            self.source = self.method.calibrate(self.source, (x.to(self.device) for x in calibration))
        self.carry = start(self.source)
        # unseeded (None), the keys follow torch's global generator, as YOLOZU's unseeded runs do
        self.root = rng.key(config.seed if config.seed is not None else int(torch.randint(0, 2**62, (1,))))
        self._driver = functools.partial(
            make_driver, limits=config.guard_limits(), rollback=config.rollback_on_stop, keep_output=keep_output,
            capture=config.capture,
        )
        self._drives = {False: self._driver(self.method)}  # padding -> driver; a padding one built when needed
        self._metric_names = ROW_METRICS + self.method.metric_names
        self._clip = config.max_grad_norm
        self.rows: list[dict] = []
        self.losses: list[float] = []
        self.stops: list[str] = []
        self.last_output: Any = None

    @property
    def updated_param_count(self) -> int:
        """Numel of the parameters the update filter selected."""
        return count(self.source.trainable)

    @property
    def stop_reason(self) -> str | None:
        """Why a guard stopped the carried stream (None while it runs)."""
        return guards.reason(int(self.carry.stop_code[0]), self.method.stop_reasons)

    @property
    def stopped(self) -> bool:
        """True once a guard has stopped the carried stream (until ``restart``)."""
        return self.stop_reason is not None

    def adapt(
        self, x: torch.Tensor, batch: int, steps: int, first_step: int = 0, *, padding: bool = False
    ) -> list[dict]:
        """Up to ``steps`` guarded steps of the carried stream on the batch ``x`` (batch index ``batch``; with the
        step on that batch, from ``first_step``, it picks the random key); returns the rows it logged.

        Args:
          x: the input batch ``(B, ...)``.
          batch: the batch's index in the whole run.
          steps: the most guarded steps taken on it.
          first_step: the index, on this batch, of the first of them.
          padding: ``x`` is a padding batch of a model shared by the ranks (this rank holds no image of the
            global batch): the steps take part in the ranks' collectives and count nothing of ``x``.
        Returns:
          The ``step_metrics`` rows logged."""
        self.carry, rows = self._run(self.carry, x[None], [batch], steps, first_step, padding)
        return rows

    def adapt_episodes(self, xs: torch.Tensor, batches: Sequence[int], steps: int) -> Carry:
        """Episodic adaptation of K images at once: ``xs`` is ``(K, B, C, H, W)``, stream k adapts image
        ``batches[k]`` from the source for ``steps`` guarded steps. Returns the K streams' carry.

        Equal, stream by stream, to ``restart()`` then ``adapt(xs[k], batches[k], steps)``: each stream gets the
        same keys, and a stream a guard stops keeps its last good state.

        Args:
          xs: K one-image batches ``(K, B, C, H, W)``.
          batches: their K indices in the whole run.
          steps: the guarded steps per stream.
        Returns:
          The ``Carry`` of K streams."""
        carry, _ = self._run(start(self.source, len(batches)), xs, batches, steps)
        return carry

    def _drive(self, padding: bool) -> Callable:
        """The driver of a batch of this rank's own images or, ``padding``, of a padding batch (the method built
        over the shared model's padding hooks, once)."""
        if padding not in self._drives:
            shared = self._build.keywords.get("shared")
            if shared is None:
                raise ValueError("a padding batch belongs to a model shared by the ranks; this adaptation has none")
            self._drives[padding] = self._driver(self._build(shared=shared.padded())[0])
        return self._drives[padding]

    def _run(
        self,
        carry: Carry,
        xs: torch.Tensor,
        batches: Sequence[int],
        steps: int,
        first_step: int = 0,
        padding: bool = False,
    ) -> tuple[Carry, list[dict]]:
        carry, records = self._drive(padding)(carry, xs.to(self.device), batches, steps, self.root, first_step)
        if records and "output" in records[-1].metrics:
            self.last_output = records[-1].metrics["output"]
        return carry, [row for record in records for row in self._log(record, batches)]

    def _log(self, record: StepRecord, batches: Sequence[int]) -> list[dict]:
        """The ``step_metrics`` rows of one step, one per stream that took it; records kept losses and stops."""
        names = self._metric_names
        table = torch.stack([record.metrics[k].detach().double().cpu().reshape(-1) for k in names], dim=1).tolist()
        rows = []
        for batch, values, code, taken, kept in zip(
            batches, table, record.verdict.tolist(), record.taken.tolist(), record.kept.tolist()
        ):
            if not taken:
                continue
            reason = guards.reason(code, self.method.stop_reasons)
            row = {"step": len(self.rows), "batch": batch, **dict(zip(names, values)), **self.method.row_fields}
            unset = {k: None for k in self.method.optional_metrics if not math.isfinite(row[k])}
            row.update(
                grad_norm_clipped=min(row["grad_norm"], self._clip) if self._clip is not None else row["grad_norm"],
                non_finite_fields=[k for k in names if k not in unset and not math.isfinite(row[k])],
                rolled_back=not kept,
                stop_reason=reason,
                **unset,
            )
            yolozu = self.method.yolozu_row(row)
            skipped = bool(yolozu.pop("update_skipped", False))
            row.update(yolozu, forward_calls=self.method.calls[0], backward_calls=int(row.pop("backward_passes")),
                       optimizer_step=kept and not skipped)
            if kept:
                self.losses.append(row["loss"])
            if reason is not None:
                self.stops.append(reason)
            self.rows.append(row)
            rows.append(row)
        return rows

    def restart(self) -> None:
        """Back to the source weights, buffers and optimiser state (episodic reset); the log is kept."""
        self.carry = start(self.source)

    def prediction_tensors(self, carry: Carry | None = None) -> tuple[Params, Params]:
        """Every parameter predictions use (the method's ``predict_params`` and the frozen ones) and the buffers,
        of the carried stream (default) or of a one-stream ``carry``.

        Args:
          carry: a one-stream ``Carry`` (None: the carried stream).
        Returns:
          ``(params, buffers)``, dicts of name -> tensor."""
        (state,) = streams.unstack_states((carry or self.carry).state, 1)
        return {**state.frozen, **self.method.predict_params(state)}, state.buffers

    def write_back(self) -> None:
        """Copy the carried stream's ``prediction_tensors`` into the module."""
        params, buffers = self.prediction_tensors()
        write_into(self.model, {**params, **buffers})

    def report(self, *, seconds: float, steps_requested: int, batches_used: int, warnings=()) -> TTTReport:
        """The run's ``TTTReport``.

        Args:
          seconds: the run's wall time.
          steps_requested: the steps the run asked for.
          batches_used: the batches adapted on.
          warnings: warnings to put first.
        Returns:
          The ``TTTReport``."""
        ratios = [row["mask_ratio"] for row in self.rows if "mask_ratio" in row and not row["rolled_back"]]
        optimizer_steps = sum(row["optimizer_step"] for row in self.rows)
        abstained = sum(row.get("update_abstained") == 1.0 for row in self.rows)
        profile = TTT_METHOD_PROFILES.get(self.config.method) and get_ttt_method_profile(
            self.config.method, detector_response=self.config.detector_response
        )
        return TTTReport(
            enabled=True,
            method=self.config.method,
            reset=self.config.reset,
            steps_requested=steps_requested,
            steps_run=len(self.losses),
            batches_used=batches_used,
            seconds=seconds,
            losses=list(self.losses),
            mask_ratio=sum(ratios) / len(ratios) if ratios else None,
            updated_param_count=self.updated_param_count,
            stopped_early=bool(self.stops),
            stop_reason=self.stops[0] if self.stops else None,
            step_metrics=list(self.rows),
            warnings=[*warnings, *self.stops],
            method_profile=profile,
            forward_calls=sum(row["forward_calls"] for row in self.rows),
            backward_calls=sum(row["backward_calls"] for row in self.rows),
            optimizer_steps=optimizer_steps,
            update_ratio=optimizer_steps / max(1, steps_requested),
            abstained_steps=abstained,
            abstention_ratio=abstained / max(1, len(self.rows)),
        )


def adaptation_for(
    adapter: object,
    config: TTTConfig,
    *,
    calibration: Sequence[Record] | None = None,
    keep_output: bool = False,
    shared: ModelSharing | None = None,
) -> Adaptation:
    """The adaptation of ``adapter``'s model under ``config``. ``calibration``: in-distribution records the method
    looks at once before adapting when it asks for them (EATA's Fisher information), read through
    ``build_loader`` in batches of ``config.batch_size``. ``shared``: see ``build_method``.

    Args:
      adapter: a YOLOZU adapter with ``get_model`` and ``build_loader`` (and, optionally, ``ttt_readout``).
      config: the settings.
      calibration: in-distribution records, or None.
      keep_output: whether each step keeps its forward output (``online_predict="adapt_forward"``).
      shared: the hooks of a model shared by the ranks, or None.
    Returns:
      The ``Adaptation``."""
    batches = None if calibration is None else adapter.build_loader(list(calibration), batch_size=config.batch_size)
    model = adapter.get_model()
    readout = readout_of(adapter, model)
    return Adaptation(model, config, readout, keep_output=keep_output, calibration=batches, shared=shared)
