"""Adapt-and-predict schedules of the export flow:

- ``pre`` (the YOLOZU spec's flow): adapt on the first ``max_batches`` batches, then predict every image with
  the adapted tensors;
- ``online`` (the Tent protocol): adapt on batch t, then predict batch t with the adapted weights, for every
  batch (adaptation stops after ``max_batches`` batches when that is set, or when a guard stops it);
  ``online_predict="adapt_forward"`` reuses the adaptation's own forward pass for the batch's predictions,
  as Tent's reference code does (one forward per batch instead of two; methods whose loss is a plain forward
  of the batch only);
- reset ``sample`` (episodic): every image adapts from the source weights and buffers, then is predicted;
  ``streams=K`` adapts K images at once with ``vmap`` (the same predictions).

Every schedule reads its batches through ``adapter.build_loader`` and adapts through the one driver; none
writes into the module but ``adapt_in_place``, YOLOZU's ``pre`` flow (``integration.run_ttt``, and the export
for an adapter that predicts only with its own ``predict``). Predictions use the normalisation the adaptation
used: test-batch BatchNorm statistics unless ``bn_mode`` is ``eval``.

The flow reads top-down: the export (``cli.export``) and ``integration.run_ttt`` call a schedule here, a
schedule builds and drives an ``engine.Adaptation``, the engine steps through ``functional.driver``. Nothing
here calls back up (``tests/test_layers.py`` checks the direction).
"""

from __future__ import annotations

import itertools
import time
from typing import Any, Callable, Iterator, Sequence

from yolozu.adapter import Prediction, Record, loader_of, require_ttt_hooks
from yolozu.inference.flip import FlipTTAConfig
from yolozu.inference.predictor import Predictor, chunks, missing_predict_hooks, non_finite_warning
from yolozu.tta.config import TTTConfig
from yolozu.tta.engine import Adaptation, adaptation_for
from yolozu.tta.memory import _memory_finish, _memory_start
from yolozu.tta.part import WHOLE, Part
from yolozu.tta.report import TTTReport, disabled_report, sample_mode


def _check(config: TTTConfig, tta: FlipTTAConfig | None) -> None:
    if config.online_predict != "adapt_forward":
        return
    if tta is not None:
        raise ValueError(
            "online_predict='adapt_forward' reuses the adaptation's forward pass, which has no "
            "flipped branch; drop flip TTA or use online_predict='after_update'"
        )
    if config.schedule != "online" or config.reset != "stream":
        raise ValueError("online_predict='adapt_forward' needs schedule='online' and reset='stream'")


def _check_reuse(config: TTTConfig, adaptation: Adaptation) -> None:
    if config.online_predict == "adapt_forward" and not adaptation.method.clean_forward:
        raise ValueError(
            f"online_predict='adapt_forward' reuses the forward pass of the adaptation on the clean batch; method "
            f"{config.method!r} adapts on a different forward, use online_predict='after_update'"
        )


def _batches(
    adapter: Any, records: Sequence[Record], size: int, part: Part = WHOLE
) -> Iterator[tuple[Sequence[Record], Any, bool]]:
    """(records, input batch, padding) of consecutive slices of ``records``, read through ``build_loader`` (or as
    the ``part`` says: a rank of a shared model also steps on padding batches)."""
    if part.batches is not None:
        return part.batches(adapter, records, size)
    return ((chunk, x, False) for chunk, x in zip(chunks(records, size), loader_of(adapter, records, size)))


def _predict_online(adapter, records, config, predictor, progress, calibration, part) -> tuple[list, Adaptation, int]:
    reuse = config.online_predict == "adapt_forward"
    adaptation = adaptation_for(adapter, config, calibration=calibration, keep_output=reuse, shared=part.shared)
    _check_reuse(config, adaptation)
    # a padding batch's predictions normalise with the padding hooks too: every rank takes part in each collective
    padded = predictor.using(part.shared.padded().batch_stats()) if part.shared is not None else predictor
    predictions: list[Prediction] = []
    adapted = 0
    for index, (chunk, x, padding) in enumerate(_batches(adapter, records, config.batch_size, part)):
        if not adaptation.stopped and (config.max_batches is None or index < config.max_batches):
            adapted += 1
            rows = adaptation.adapt(x, part.offset + index, config.steps, padding=padding)
            if reuse and not rows[-1]["rolled_back"]:
                predictions.extend(predictor.decode(adaptation.last_output, chunk))
                progress.update(len(chunk))
                continue
        params, buffers = adaptation.prediction_tensors()
        predicting = padded if padding else predictor
        predictions.extend(predicting.predict_batch(x, chunk, params, buffers, config.prediction_bn))
        progress.update(len(chunk))
    return predictions, adaptation, adapted


def _predict_episodic(adapter, records, config, predictor, progress, calibration, part) -> tuple[list, Adaptation, int]:
    adaptation = adaptation_for(adapter, config, calibration=calibration)
    cap = len(records) if config.max_batches is None else max(0, config.max_batches - part.offset)
    limit = min(cap, len(records))  # the images below max_batches in the whole run
    bn = config.prediction_bn
    predictions: list[Prediction] = []
    episodes = _batches(adapter, records[:limit], config.streams)
    for first, (chunk, x, _) in zip(range(0, limit, config.streams), episodes):
        first += part.offset
        carry = adaptation.adapt_episodes(x.unsqueeze(1), range(first, first + len(chunk)), config.steps)
        if len(chunk) == 1:
            predictions.extend(predictor.predict_batch(x, chunk, *adaptation.prediction_tensors(carry), bn))
        else:
            state = carry.state
            trainable = adaptation.method.predict_params(state)
            xs = x.unsqueeze(1)
            predictions.extend(predictor.predict_streams(xs, chunk, trainable, state.frozen, state.buffers, bn))
        progress.update(len(chunk))
    adaptation.restart()
    source = adaptation.prediction_tensors()
    for chunk, x, _ in _batches(adapter, records[limit:], 1):  # past max_batches: each image from the source
        predictions.extend(predictor.predict_batch(x, chunk, *source, bn))
        progress.update(len(chunk))
    return predictions, adaptation, limit


def _adapt_bar(progress: Callable[[str, int], Any], config: TTTConfig, records: Sequence[Record]) -> Any:
    """The progress bar of a ``pre`` adaptation: the images of ``steps`` steps."""
    return progress("adapt", config.steps * min(config.batch_size, len(records)))


def adapt_stream(
    adapter: object,
    records: Sequence[Record],
    config: TTTConfig,
    *,
    progress=None,
    calibration: Sequence[Record] | None = None,
    offset: int = 0,
) -> tuple[Adaptation, int]:
    """The ``pre`` schedule's adaptation: one stream for ``steps`` steps in all, cycling over the first
    ``max_batches`` batches of ``adapter.build_loader(records, ...)`` (YOLOZU's flow: step i adapts on batch
    i mod n), until a guard stops it; the module is not written. ``progress`` (e.g. a tqdm bar) is advanced by
    each step's images. Batch i's random keys and log rows use index ``offset + i`` (a stream that starts at
    batch ``offset`` of a longer run).

    Args:
      adapter: a YOLOZU adapter.
      records: the records adapted on.
      config: the settings.
      progress: a progress bar with ``update(n)``, or None.
      calibration: in-distribution records, or None.
      offset: the stream's first batch index in the whole run.
    Returns:
      ``(adaptation, batches_used)``."""
    adaptation = adaptation_for(adapter, config, calibration=calibration)
    loader = itertools.islice(loader_of(adapter, list(records), config.batch_size), config.max_batches)
    seen: list = []  # the batches read so far, kept for the next pass over them
    for step in range(config.steps):
        if step == len(seen):
            batch = next(loader, None)
            if batch is None and not seen:
                break
            if batch is not None:
                seen.append(batch)
        index = step % len(seen)
        adaptation.adapt(seen[index], offset + index, 1, first_step=step // len(seen))
        if progress is not None:
            progress.update(len(seen[index]))
        if adaptation.stopped:
            break
    return adaptation, len(seen)


def adapt_pre(
    adapter: object,
    records: Sequence[Record],
    config: TTTConfig,
    *,
    progress=None,
    calibration: Sequence[Record] | None = None,
    offset: int = 0,
    write_back: bool = False,
) -> tuple[Adaptation, TTTReport]:
    """The ``pre`` schedule's adaptation (``adapt_stream``), timed and its peak memory measured; with
    ``write_back`` the adapted tensors are then written into the module (YOLOZU's flow, whose own ``predict``
    uses them), else the module is left as it was (the export predicts from ``prediction_tensors``).

    Args:
      adapter: a YOLOZU adapter with the TTT hooks.
      records: the records adapted on.
      config: the settings.
      progress: a progress bar with ``update(n)``, or None.
      calibration: in-distribution records, or None.
      offset: the stream's first batch index in the whole run.
      write_back: whether to write the adapted tensors into the module.
    Returns:
      ``(adaptation, report)``: the report with the run's ``seconds`` and ``memory``."""
    measured = _measure(adapter)
    adaptation, batches_used = adapt_stream(
        adapter, records, config, progress=progress, calibration=calibration, offset=offset
    )
    if write_back:
        adaptation.write_back()
    return adaptation, measured(adaptation, config.steps, batches_used)


def _measure(adapter: object) -> Callable[[Adaptation, int, int], TTTReport]:
    """Start a run's clock and memory record (``tta.memory``) on ``adapter``'s model; the function returned makes
    the adaptation's report with the run's ``seconds`` and ``memory`` once it is over."""
    start, memory = time.perf_counter(), _memory_start(adapter.get_model())

    def measured(adaptation: Adaptation, steps_requested: int, batches_used: int) -> TTTReport:
        report = adaptation.report(
            seconds=time.perf_counter() - start, steps_requested=steps_requested, batches_used=batches_used
        )
        report.memory = _memory_finish(memory)
        return report

    return measured


NO_BATCH = "the loader yielded no batch; nothing was adapted"
"""The warning of an in-place adaptation whose loader gave nothing to adapt on."""


def adapt_in_place(
    adapter: object,
    records: Sequence[Record],
    config: TTTConfig,
    *,
    progress=None,
    calibration: Sequence[Record] | None = None,
) -> TTTReport:
    """YOLOZU's ``pre`` flow: adapt ``adapter.get_model()`` on ``records`` (``adapt_pre``) and write the adapted
    tensors into it, once, at the end; an error on the way leaves the module exactly as it was. TTT off: nothing
    happens. The body of ``integration.run_ttt``.

    Args:
      adapter: a YOLOZU adapter with ``get_model`` and ``build_loader``.
      records: the records adapted on.
      config: the settings.
      progress: a progress bar with ``update(n)``, or None.
      calibration: in-distribution records (``engine.adaptation_for``), or None.
    Returns:
      The run's ``TTTReport`` (``NO_BATCH`` first of its warnings when nothing was adapted).
    Raises:
      RuntimeError: the adapter lacks a TTT hook."""
    if not config.enabled:
        return disabled_report(config)
    require_ttt_hooks(adapter)
    _, report = adapt_pre(adapter, records, config, progress=progress, calibration=calibration, write_back=True)
    if not report.batches_used:
        report.warnings.insert(0, NO_BATCH)
    return report


def _predict_pre(adapter, records, config, predictor, progress, calibration, batch_size, part) -> tuple[list, Any]:
    bar = _adapt_bar(progress, config, records)
    try:
        adaptation, report = adapt_pre(adapter, records, config, progress=bar, calibration=calibration,
                                       offset=part.offset)  # fmt: skip
    finally:
        bar.close()
    params, buffers = adaptation.prediction_tensors()
    bar = progress("predict", len(records))
    try:
        predictions = predictor.predict(
            records, params=params, buffers=buffers, bn=config.prediction_bn, batch_size=batch_size, progress=bar
        )
    finally:
        bar.close()
    return predictions, report


def _predict_with_own_predict(adapter, records, config, progress, calibration, tta) -> tuple[list, TTTReport]:
    """YOLOZU's flow for an adapter with only ``predict``, ``get_model`` and ``build_loader``: adapt
    (``adapt_in_place``, which writes the module), then the adapter's own ``predict``. The module stays adapted."""
    missing = ", ".join(f"{hook}()" for hook in missing_predict_hooks(adapter))
    if config.schedule != "pre" or config.reset != "stream" or tta is not None:
        raise ValueError(
            f"adapter {type(adapter).__name__} has no {missing}: it supports the pre schedule (adapt, then its own "
            f"predict), not schedule={config.schedule!r}, reset={config.reset!r} or flip TTA; implement {missing}"
        )
    bar = _adapt_bar(progress, config, records)
    try:
        report = adapt_in_place(adapter, records, config, progress=bar, calibration=calibration)
    finally:
        bar.close()
    return adapter.predict(records), report


class _NoProgress:
    def update(self, n: int) -> None:
        del n

    def close(self) -> None:
        pass


def no_bars(desc: str, total: int) -> _NoProgress:
    """A progress-bar factory that shows nothing.

    Args:
      desc: the bar's label (unused).
      total: its total (unused).
    Returns:
      A bar with ``update`` and ``close`` that do nothing."""
    del desc, total
    return _NoProgress()


def _adapt_while_predicting(adapter, records, config, predictor, progress, calibration, part) -> tuple[list, TTTReport]:
    """The ``online`` and reset ``sample`` schedules, with one progress bar."""
    measured = _measure(adapter)
    run = _predict_online if config.reset == "stream" else _predict_episodic
    bar = progress("adapt+predict", len(records))
    try:
        predictions, adaptation, adapted = run(adapter, records, config, predictor, bar, calibration, part)
    finally:
        bar.close()
    report = measured(adaptation, config.steps * adapted, adapted)
    if config.reset == "sample":
        sample_mode(report, [str(r.get("image")) if isinstance(r, dict) else str(i) for i, r in enumerate(records)])
    return predictions, report


def adapt_and_predict(
    adapter: object,
    records: Sequence[Record],
    config: TTTConfig,
    *,
    tta: FlipTTAConfig | None = None,
    batch_size: int = 32,
    progress: Callable[[str, int], Any] = no_bars,
    calibration: Sequence[Record] | None = None,
    part: Part = WHOLE,
) -> tuple[list[Prediction], TTTReport]:
    """Predictions for ``records`` under test-time training ``config``, and the run's report. The adapter's
    module is left as it was, unless the adapter lacks ``load_batch``/``decode`` and predicts with its own
    ``predict`` after a ``pre`` adaptation written into the module (YOLOZU's flow).

    Images predicted from non-finite outputs (weights that diverged) are named in a warning of the report
    (``predict.NON_FINITE``).

    Args:
      adapter: a YOLOZU adapter with the TTT hooks.
      records: the records to predict, in order.
      config: the settings; ``config.schedule`` and ``config.reset`` pick the schedule.
      tta: flip TTA's settings, or None.
      batch_size: the prediction batch of the ``pre`` schedule (``online`` and ``sample`` predict the batches
        they adapt on).
      progress: ``progress(desc, total)`` makes a progress bar (e.g. ``tqdm``) counting images: one for
        adaptation and one for prediction in ``pre``, one for both in the other schedules.
      calibration: in-distribution records for a method that asks for them (``engine.adaptation_for``).
      part: this process's share of a run spread over several (``tta.part``; default: the whole run).
    Returns:
      ``(predictions, report)``: one ``Prediction`` per record, in order, and the ``TTTReport``."""
    require_ttt_hooks(adapter)
    _check(config, tta)
    records = list(records)
    if missing_predict_hooks(adapter):
        return _predict_with_own_predict(adapter, records, config, progress, calibration, tta)
    stats = part.shared.batch_stats() if part.shared is not None else None
    predictor = Predictor(adapter, tta=tta, batch_stats=stats, bn_prior=config.bn_prior, bn_shrink=config.bn_shrink)
    if config.reset == "stream" and config.schedule == "pre":
        predictions, report = _predict_pre(adapter, records, config, predictor, progress, calibration, batch_size, part)
    else:
        predictions, report = _adapt_while_predicting(adapter, records, config, predictor, progress, calibration, part)
    if predictor.non_finite:
        report.warnings.append(non_finite_warning(predictor.non_finite, len(records)))
    return predictions, report
