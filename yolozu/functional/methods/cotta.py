"""CoTTA: continual test-time adaptation (Wang, Fink, Van Gool & Dai, CVPR 2022), as pure functions.

A student is trained on the test stream towards a mean teacher's pseudo-labels:

- the teacher is an exponential moving average of the student, theta_t <- m theta_t + (1 - m) theta_s, and is
  never optimised;
- its pseudo-labels average its class scores over augmentation views (mapped back to the original frame)
  where the source model is not confident (confidence < threshold), else use its plain prediction;
- after every ``restore_interval`` steps each element of the adapted parameters returns to its source value
  with probability ``restore_prob`` (stochastic restoration), which bounds forgetting on long streams.

Two rules for the pseudo-labels, chosen by settings:

- YOLOZU's (the defaults): the fixed views ``augmentations`` (identity and a horizontal flip), their
  probabilities averaged weighted by each view's confidence, the threshold 0.92 applied per sample (and
  position), predictions with the teacher after the update;
- the reference code's (``views="random"``, ``aggregation="logit_mean"``, ``threshold_scope="batch"``,
  ``threshold_data``, ``predict_with="teacher_before_update"``): the teacher's logits averaged over N = 32 random
  strong augmentations (``yolozu.functional.augment``; never the clean view), used for the whole batch when
  the batch's mean source confidence is below p_th = q_0.05 - 0.05, q_0.05 the 5% quantile of the source
  model's confidence on in-distribution data (the paper's supplementary), and predictions with the teacher
  before the update. The ``cotta_paper`` preset sets them; docs/ttt.md lists what still differs.

Randomness enters as explicit inputs: an update takes the restore draws as a tensor dict, with random views a
``CoTTANoise`` holding them and the views' parameters (so ``vmap`` can batch K streams, each with its own
draws); ``step.make_step`` draws them from a key.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor

from yolozu.functional import optim
from yolozu.functional.augment import Views, augment, draw_views
from yolozu.functional.mean_teacher import (
    AGGREGATIONS,
    TEACHER_OR_STUDENT,
    aggregate,
    confidence,
    consistency_loss,
    ema,
    probabilities,
    restore_draws,
    source_quantile_threshold,
    stochastic_restore,
    teacher_targets,
)
from yolozu.functional.readout import DEFAULT_READOUT, Readout
from yolozu.functional.rng import Key, split
from yolozu.functional.settings import many_of, number, one_of, optional_split, setting, str_tuple
from yolozu.functional.state import Params, combine
from yolozu.functional.step import Apply, LossOutput, Method, TTTState, view_bn_mode

AUGMENTATIONS = ("identity", "hflip")
PREDICT_WITH = (*TEACHER_OR_STUDENT, "teacher_before_update")
VIEWS = ("fixed", "random")
THRESHOLD_SCOPES = ("sample", "batch")
__all__ = [
    "AGGREGATIONS", "AUGMENTATIONS", "PREDICT_WITH", "THRESHOLD_SCOPES", "VIEWS", "CoTTANoise", "CoTTASettings",
    "CoTTAState", "cotta_method", "source_threshold", "teacher_finish", "teacher_prepare",
    # the mean-teacher pieces, in functional.mean_teacher, under CoTTA's name too
    "aggregate", "consistency_loss", "ema", "restore_draws", "stochastic_restore", "teacher_targets",
]  # fmt: skip


def _hflip(x: Tensor) -> Tensor:
    return torch.flip(x, dims=(-1,))


class CoTTAState(NamedTuple):
    """CoTTA's own state.

    Attributes:
      teacher: the mean teacher's adapted parameters.
      previous: the teacher before the last step (``predict_with="teacher_before_update"``; else empty).
      threshold: the confidence threshold, 0-d: ``confidence_threshold``, or derived from the source model on
        in-distribution data by ``calibrate`` (``threshold_data``).
    """

    teacher: Params
    previous: Params = {}
    threshold: Any = ()


class CoTTANoise(NamedTuple):
    """One step's randomness with random views: the restore draws and the views' parameters."""

    restore: Params
    views: Views


def _restore_part(noise: Any) -> Params:
    """The restore draws of a step's noise (a plain dict with fixed views, a ``CoTTANoise`` with random ones)."""
    return noise.restore if isinstance(noise, CoTTANoise) else noise


@attrs.frozen(kw_only=True)
class CoTTASettings:
    """CoTTA's settings; defaults from the paper's CIFAR setting, and YOLOZU's pseudo-label rule (the module
    docstring has the reference's)."""

    ema_momentum: float = setting(0.999, "CoTTA: teacher EMA momentum m", number(0, 1), yolozu=True)
    augmentations: tuple[str, ...] = setting(
        AUGMENTATIONS, "CoTTA: teacher branches", many_of(*AUGMENTATIONS), type=tuple, converter=str_tuple, yolozu=True
    )
    aggregation: str = setting(
        "confidence_weighted_mean", "CoTTA: branch averaging (logit_mean: the reference's)", one_of(*AGGREGATIONS),
        yolozu=True,
    )
    restore_prob: float = setting(0.01, "CoTTA: stochastic restore probability", number(0, 1), yolozu=True)
    restore_interval: int = setting(1, "CoTTA: restore every N steps", number(1, integer=True), yolozu=True)
    confidence_threshold: float = setting(
        0.92, "CoTTA: average the branches where the source confidence is below this", number(0, 1)
    )
    predict_with: str = setting(
        "teacher",
        "CoTTA: predict with the teacher, the student, or the teacher before the last update (the reference's)",
        one_of(*PREDICT_WITH),
    )
    views: str = setting(
        "fixed", "CoTTA: teacher views: fixed (the augmentations) or random strong ones (the reference's)",
        one_of(*VIEWS),
    )
    random_views: int = setting(32, "CoTTA: number of random views (views random)", number(1, integer=True))
    threshold_scope: str = setting(
        "sample",
        "CoTTA: apply the threshold per sample, or once per batch on its mean source confidence (the reference's)",
        one_of(*THRESHOLD_SCOPES),
    )
    threshold_data: str | None = setting(
        None,
        "CoTTA: split of in-distribution data the threshold is derived from (5th percentile of the source "
        "confidence - 0.05, the reference's); none: confidence_threshold",
        optional_split,
        type=str,
    )


def _views_in_frame(apply: Apply, readout: Readout, settings: CoTTASettings, view_bn: str):
    """``views(params, buffers, x, noise) -> (view scores, plain scores)``: the teacher's scores of each view,
    in the original frame, and of the plain batch."""

    def plain(params: Params, buffers: Params, x: Tensor) -> Tensor:
        return readout.scores(apply(params, buffers, x, bn_mode=view_bn)[0])

    def fixed(params: Params, buffers: Params, x: Tensor, noise: Any) -> tuple[list[Tensor], Tensor]:
        del noise
        views = {}
        for name in settings.augmentations:
            if name == "identity":
                views[name] = plain(params, buffers, x)
            else:
                views[name] = readout.flipped_scores(apply(params, buffers, _hflip(x), bn_mode=view_bn)[0])
        identity = views.get("identity")
        # the branches hold no plain view: confident samples still take it
        return list(views.values()), identity if identity is not None else plain(params, buffers, x)

    def random(params: Params, buffers: Params, x: Tensor, noise: CoTTANoise) -> tuple[list[Tensor], Tensor]:
        scores = []
        for i in range(settings.random_views):
            output = apply(params, buffers, augment(x, noise.views, i), bn_mode=view_bn)[0]
            flipped = noise.views.flip[i]
            scores.append(torch.where(flipped, readout.flipped_scores(output), readout.scores(output)))
        return scores, plain(params, buffers, x)

    return fixed if settings.views == "fixed" else random


def _consistency_metrics(loss: Tensor, scores: Tensor, targets: Tensor, kind: str) -> dict[str, Tensor]:
    """The step's ``consistency_loss`` and ``consistency_mse``: the student's probabilities against the targets
    (YOLOZU's key)."""
    probs = torch.sigmoid(scores) if kind == "sigmoid" else F.softmax(scores, dim=1)
    return {"consistency_loss": loss.detach(), "consistency_mse": (probs.detach() - targets).square().mean()}


def _teacher_forwards(settings: CoTTASettings) -> int:
    """The teacher's forward passes per step: each fixed view and the plain one when no identity branch holds
    it, or each random view and the plain one."""
    if settings.views == "fixed":
        return len(settings.augmentations) + ("identity" not in settings.augmentations)
    return settings.random_views + 1


def teacher_prepare(apply: Apply, readout: Readout, settings: CoTTASettings, bn: str):
    """CoTTA's ``prepare``: the teacher's soft targets for a batch (no gradient). The teacher and source views
    normalise like the student but leave the running statistics alone.

    Args:
      apply: the model as a pure function (``bridge.make_apply``).
      readout: how scores are read from an output.
      settings: CoTTA's settings (views, aggregation, threshold scope).
      bn: the adaptation's BatchNorm mode.
    Returns:
      ``prepare(state, batch, noise) -> targets``, target probabilities shaped like the scores ``(B, C, ...)``.
    """
    view_bn = view_bn_mode(bn)
    views_of = _views_in_frame(apply, readout, settings, view_bn)

    def prepare(state: TTTState, batch: Tensor, noise: Any) -> Tensor:
        teacher = combine(state.frozen, state.method_state.teacher)
        with torch.no_grad():
            views, plain = views_of(teacher, state.buffers, batch, noise)
            source_output = apply(combine(state.frozen, state.source), state.buffers, batch, bn_mode=view_bn)[0]
            return teacher_targets(
                views,
                readout.scores(source_output),
                score_kind=readout.score_kind,
                aggregation=settings.aggregation,
                threshold=state.method_state.threshold,
                plain_logits=plain,
                scope=settings.threshold_scope,
            )

    return prepare


def teacher_finish(settings: CoTTASettings):
    """CoTTA's ``finish``: the teacher follows the student (EMA), then the due stochastic restore.

    Args:
      settings: CoTTA's settings (momentum, restore probability and interval, what predictions use).
    Returns:
      ``finish(old, new, metrics, noise) -> (new_state, metrics)``; metrics add ``ema_momentum`` and
      ``restored_count``.
    """

    def finish(old: TTTState, new: TTTState, metrics: dict, noise: Any) -> tuple[TTTState, dict]:
        teacher = ema(old.method_state.teacher, new.trainable, settings.ema_momentum)
        due = (new.step % settings.restore_interval) == 0
        draws = _restore_part(noise)
        restored, count = stochastic_restore(new.trainable, old.source, settings.restore_prob, draws, due)
        metrics = {
            **metrics,
            "ema_momentum": torch.full_like(metrics["loss"], settings.ema_momentum),
            "restored_count": count,
        }
        previous = old.method_state.teacher if settings.predict_with == "teacher_before_update" else {}
        state = old.method_state._replace(teacher=teacher, previous=previous)
        return new._replace(trainable=restored, method_state=state), metrics

    return finish


def source_threshold(apply: Apply, readout: Readout, state: TTTState, batches: Any, bn: str) -> Tensor:
    """CoTTA's threshold derived from the source model (``mean_teacher.source_quantile_threshold``) on
    in-distribution ``batches``, the source normalised as the teacher's views are.

    Args:
      apply: the model as a pure function.
      readout: how scores are read from an output.
      state: a fresh state (its ``source`` and ``frozen`` parameters and buffers are the source model).
      batches: an iterable of input batches ``(B, C, H, W)``.
      bn: the adaptation's BatchNorm mode.
    Returns:
      p_th, a 0-d tensor.
    Raises:
      ValueError: ``batches`` is empty.
    """
    params = combine(state.frozen, state.source)
    per_image = []
    with torch.no_grad():
        for x in batches:
            scores = readout.scores(apply(params, state.buffers, x, bn_mode=view_bn_mode(bn))[0])
            per_image.append(confidence(probabilities(scores, readout.score_kind)).flatten(1).mean(dim=1))
    if not per_image:
        raise ValueError("CoTTA's threshold from the source model needs at least one batch of in-distribution data")
    return source_quantile_threshold(torch.cat(per_image))


def cotta_method(
    apply: Apply,
    optimizer: optim.GradientTransformation,
    settings: CoTTASettings = CoTTASettings(),
    *,
    readout: Readout = DEFAULT_READOUT,
    bn: str = "running",
) -> Method:
    """CoTTA as a ``Method``: ``prepare`` makes the teacher's targets (``teacher_prepare``), the loss is the
    student's consistency with them, ``finish`` moves the teacher and restores (``teacher_finish``); the
    randomness is one uniform draw per adapted element (``restore_draws``), and with random views the views'
    parameters (``CoTTANoise``). Its state is a ``CoTTAState``; ``calibrate`` derives the threshold from the
    source model (``source_threshold``). Predictions use the teacher unless ``settings.predict_with`` says
    otherwise.

    Metrics add ``consistency_loss`` (= ``loss``), ``consistency_mse`` (the student's probabilities against the
    targets: YOLOZU's key), ``ema_momentum`` and ``restored_count``.

    Args:
      apply: the model as a pure function (``bridge.make_apply``).
      optimizer: the student's optimiser.
      settings: CoTTA's settings.
      readout: how scores are read from an output.
      bn: the adaptation's BatchNorm mode.
    Returns:
      The ``Method``.
    """

    def student_loss(params, buffers, batch, targets):
        output, new_buffers = apply(params, buffers, batch, bn_mode=bn)
        scores = readout.scores(output)
        loss = consistency_loss(scores, targets, readout.score_kind)
        return loss, LossOutput(new_buffers, _consistency_metrics(loss, scores, targets, readout.score_kind), output)

    def draw(k: Key, source: Params, batch: Tensor) -> Any:
        if settings.views == "fixed":
            return restore_draws(source, k)
        restore_key, views_key = split(k)
        views = draw_views(views_key, settings.random_views, tuple(batch.shape[1:]), batch.device)
        return CoTTANoise(restore_draws(source, restore_key), views)

    def init(trainable: Params) -> CoTTAState:
        device = next(iter(trainable.values())).device
        threshold = torch.full((), settings.confidence_threshold, device=device)
        previous = dict(trainable) if settings.predict_with == "teacher_before_update" else {}
        return CoTTAState(dict(trainable), previous, threshold)

    def calibrate(state: TTTState, batches: Any) -> TTTState:
        threshold = source_threshold(apply, readout, state, batches, bn).to(state.step.device)
        return state._replace(method_state=state.method_state._replace(threshold=threshold))

    def predict_params(state: TTTState) -> Params:
        if settings.predict_with == "student":
            return state.trainable
        if settings.predict_with == "teacher_before_update":
            return state.method_state.previous
        return state.method_state.teacher

    views = list(settings.augmentations) if settings.views == "fixed" else [f"random x{settings.random_views}"]
    aug = {"augmentations": views, "aggregation": settings.aggregation, "branches": len(views)}
    return Method(
        student_loss,
        optimizer,
        prepare=teacher_prepare(apply, readout, settings, bn),
        finish=teacher_finish(settings),
        draw=draw,
        init=init,
        calibrate=calibrate,
        predict_params=predict_params,
        metric_names=("consistency_loss", "consistency_mse", "restored_count"),
        calls=(_teacher_forwards(settings) + 2, 1),  # the teacher's, then the source's and the student's
        row_fields={
            "ema_momentum": settings.ema_momentum,
            "restore_prob": settings.restore_prob,
            "restore_interval": settings.restore_interval,
            "aug": aug,
        },
    )
