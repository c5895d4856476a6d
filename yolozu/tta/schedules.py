"""Adapt-and-predict schedules of the export flow (DESIGN.md):

- ``pre`` (the YOLOZU spec's flow): adapt on the first ``max_batches`` batches, write the weights into the
  model, then predict every image;
- ``online`` (the Tent protocol): adapt on batch t, then predict batch t with the adapted weights, for every
  batch (adaptation stops after ``max_batches`` batches when that is set, or when a guard stops it);
  ``online_predict="adapt_forward"`` reuses the adaptation's own forward pass for the batch's predictions,
  as Tent's reference code does (one forward per batch instead of two);
- reset ``sample`` (episodic): every image adapts from the source weights and buffers, then is predicted;
  the model is left as it was; ``streams=K`` adapts K images at once with ``vmap`` (the same predictions).

Predictions use the normalisation the adaptation used: test-batch BatchNorm statistics unless ``bn_mode`` is
``eval``.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

from yolozu.adapter import Prediction, Record
from yolozu.flip_tta import FlipTTAConfig
from yolozu.functional.readout import readout_of
from yolozu.predict import Predictor, chunks
from yolozu.tta.config import TTTConfig
from yolozu.tta.engine import Adaptation
from yolozu.tta.integration import require_ttt_hooks, run_ttt
from yolozu.tta.report import TTTReport


def _check(config: TTTConfig, tta: FlipTTAConfig | None) -> None:
    if config.online_predict == "adapt_forward":
        if tta is not None:
            raise ValueError(
                "online_predict='adapt_forward' reuses the adaptation's forward pass, which has no "
                "flipped branch; drop flip TTA or use online_predict='after_update'"
            )
        if config.schedule != "online" or config.reset != "stream":
            raise ValueError("online_predict='adapt_forward' needs schedule='online' and reset='stream'")
        if config.method != "tent":
            raise ValueError(
                f"online_predict='adapt_forward' reuses Tent's forward pass on the clean batch; method "
                f"{config.method!r} adapts on a different forward, use online_predict='after_update'"
            )


def _predict_online(adapter, records, config, predictor, progress) -> tuple[list[Prediction], Adaptation, int]:
    reuse = config.online_predict == "adapt_forward"
    adaptation = Adaptation(adapter.get_model(), config, readout_of(adapter), keep_output=reuse)
    predictions: list[Prediction] = []
    adapted = 0
    for index, chunk in enumerate(chunks(records, config.batch_size)):
        x = adapter.load_batch(chunk)
        if not adaptation.stopped and (config.max_batches is None or index < config.max_batches):
            adapted += 1
            adaptation.adapt(x, batch=index, steps=config.steps)
            if reuse and not adaptation.rows[-1]["rolled_back"]:
                predictions.extend(adapter.decode(adaptation.last_output, chunk))
                progress.update(len(chunk))
                continue
        state = adaptation.state
        predictions.extend(
            predictor.predict_batch(x, chunk, adaptation.prediction_params(), state.buffers, config.prediction_bn)
        )
        progress.update(len(chunk))
    adaptation.write_back()
    return predictions, adaptation, adapted


def _predict_episodic(adapter, records, config, predictor, progress) -> tuple[list[Prediction], Adaptation, int]:
    adaptation = Adaptation(adapter.get_model(), config, readout_of(adapter))
    limit = len(records) if config.max_batches is None else min(config.max_batches, len(records))
    predictions: list[Prediction] = []
    for start in range(0, len(records), config.streams):
        chunk = records[start : start + config.streams]
        x = adapter.load_batch(chunk)
        indices = list(range(start, start + len(chunk)))
        if config.streams > 1 and indices[-1] < limit:
            states = adaptation.adapt_streams(x.unsqueeze(1), indices, config.steps)
            predictions.extend(
                predictor.predict_streams(
                    x.unsqueeze(1),
                    chunk,
                    adaptation.predicting(states),
                    states.frozen,
                    states.buffers,
                    config.prediction_bn,
                )
            )
        else:
            for index, record, image in zip(indices, chunk, x):
                adaptation.restart()
                if index < limit:
                    adaptation.adapt(image[None], batch=index, steps=config.steps)
                predictions.extend(
                    predictor.predict_batch(
                        image[None],
                        [record],
                        adaptation.prediction_params(),
                        adaptation.state.buffers,
                        config.prediction_bn,
                    )
                )
        progress.update(len(chunk))
    adaptation.restart()
    return predictions, adaptation, limit


class _NoProgress:
    def update(self, n: int) -> None:
        del n

    def close(self) -> None:
        pass


def no_bars(desc: str, total: int) -> _NoProgress:
    """A progress-bar factory that shows nothing."""
    del desc, total
    return _NoProgress()


def adapt_and_predict(
    adapter: object,
    records: Sequence[Record],
    config: TTTConfig,
    *,
    tta: FlipTTAConfig | None = None,
    batch_size: int = 32,
    progress: Callable[[str, int], Any] = no_bars,
) -> tuple[list[Prediction], TTTReport]:
    """Predictions for ``records`` under test-time training ``config``, and the run's report.

    ``batch_size`` is the prediction batch of the ``pre`` schedule; ``online`` and ``sample`` predict the
    batches they adapt on. ``progress(desc, total)`` makes a progress bar (e.g. ``tqdm``) counting images: one
    for adaptation and one for prediction in ``pre``, one for both in the other schedules.
    """
    require_ttt_hooks(adapter)
    _check(config, tta)
    predictor = Predictor(adapter, tta=tta)
    records = list(records)
    if config.reset == "stream" and config.schedule == "pre":
        limit = len(records) if config.max_batches is None else config.max_batches * config.batch_size
        bar = progress("adapt", min(limit, len(records)))
        try:
            report = run_ttt(adapter, records, config, progress=bar)
        finally:
            bar.close()
        params, buffers = predictor.module_tensors()
        bar = progress("predict", len(records))
        try:
            predictions = predictor.predict(
                records, params=params, buffers=buffers, bn=config.prediction_bn, batch_size=batch_size, progress=bar
            )
        finally:
            bar.close()
        return predictions, report
    start = time.perf_counter()
    run = _predict_online if config.reset == "stream" else _predict_episodic
    bar = progress("adapt+predict", len(records))
    try:
        predictions, adaptation, adapted = run(adapter, records, config, predictor, bar)
    finally:
        bar.close()
    report = adaptation.report(
        seconds=time.perf_counter() - start, steps_requested=config.steps * adapted, batches_used=adapted
    )
    return predictions, report
