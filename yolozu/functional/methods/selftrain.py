"""Detection self-training: a mean teacher's confident detections train the student with the detector's own loss.

A method of its own for dense detectors (CoTTA keeps the classification form: soft targets everywhere). Each
update:

- the teacher (an exponential moving average of the student, never optimised) scores the batch, its plain and
  its mirrored view averaged in the original frame (flip-consistent scores);
- its confident detections become positives: the local maxima (3x3) of a class map whose score reaches that
  class's threshold. The thresholds adapt (FreeMatch's self-adaptive thresholds, Wang et al. ICLR 2023, on
  detections): a global level, an EMA over batches of the mean top score of the teacher's detections, scaled
  per class by the class's mean score relative to the highest class's, clipped to ``[threshold_min,
  threshold_max]``;
- cells scored below ``negative_below`` are negatives, with the teacher's score as the soft target of
  CenterNet's penalty reduction; cells between it and their class threshold that are not positives form the
  ignored band: uncertain, they are neither positives nor negatives, so objects the corruption made faint are
  not pushed further down;
- the student minimises the detector's training loss for class maps (CenterNet's focal loss,
  ``losses.centernet_focal_loss``) on those targets, then the teacher follows it.

Predictions use the teacher (``predict_with``). Box regression is not self-trained: the readout exposes class
scores only, and the boxes keep the source's regression.
"""

from __future__ import annotations

from typing import NamedTuple

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor

from yolozu.functional import optim
from yolozu.functional.losses import centernet_focal_loss
from yolozu.functional.mean_teacher import TEACHER_OR_STUDENT, ema
from yolozu.functional.readout import DEFAULT_READOUT, Readout
from yolozu.functional.settings import number, one_of, setting
from yolozu.functional.state import Params, combine
from yolozu.functional.step import Apply, LossOutput, Method, TTTState, view_bn_mode


class SelfTrainState(NamedTuple):
    """The teacher's parameters and the global confidence level of its detections (NaN before the first batch)."""

    teacher: Params
    level: Tensor


@attrs.frozen(kw_only=True)
class SelfTrainSettings:
    """Detection self-training's settings."""

    ema_momentum: float = setting(0.99, "selftrain: teacher EMA momentum", number(0, 1))
    level_momentum: float = setting(0.9, "selftrain: EMA momentum of the detections' confidence level", number(0, 1))
    threshold_min: float = setting(0.2, "selftrain: lowest class threshold", number(0, 1))
    threshold_max: float = setting(0.6, "selftrain: highest class threshold", number(0, 1))
    negative_below: float = setting(
        0.1, "selftrain: teacher scores below this are negatives; up to the class threshold, ignored", number(0, 1)
    )
    top_k: int = setting(16, "selftrain: detections per image the confidence level reads", number(1, integer=True))
    flip: bool = setting(True, "selftrain: average the teacher's plain and mirrored views")
    predict_with: str = setting(
        "teacher", "selftrain: predict with the teacher or the student", one_of(*TEACHER_OR_STUDENT)
    )


def local_peaks(scores: Tensor) -> Tensor:
    """Where each class map ``(B, C, H, W)`` has a 3x3 local maximum (bool, same shape); every position of
    non-spatial scores ``(B, C, N)``.

    Args:
      scores: class maps ``(B, C, H, W)`` or scores ``(B, C, N)``.
    Returns:
      A bool tensor shaped like ``scores``."""
    if scores.dim() != 4:
        return torch.ones_like(scores, dtype=torch.bool)
    return F.max_pool2d(scores, 3, stride=1, padding=1) == scores


def class_thresholds(probs: Tensor, level: Tensor, s: SelfTrainSettings) -> Tensor:
    """Per-class thresholds ``(C,)``: ``level`` times each class's mean top score over the highest class's mean
    (FreeMatch's MaxNorm), clipped to ``[threshold_min, threshold_max]``.

    Args:
      probs: the teacher's scores ``(B, C, ...)`` in [0, 1].
      level: the global confidence level, a 0-d tensor.
      s: the settings (``top_k``, ``threshold_min``, ``threshold_max``).

    Returns:
      thresholds ``(C,)`` on ``probs``' device."""
    flat = probs.flatten(2)
    k = min(s.top_k, flat.shape[2])
    per_class = flat.topk(k, dim=2).values.mean(dim=(0, 2))
    relative = per_class / per_class.amax().clamp_min(1e-12)
    return (level * relative).clamp(s.threshold_min, s.threshold_max)


def next_level(probs: Tensor, level: Tensor, s: SelfTrainSettings) -> Tensor:
    """The confidence level after a batch: an EMA (``level_momentum``) of the mean top score of each image's
    ``top_k`` strongest detections (any class); the first batch sets it.

    Args:
      probs: the teacher's scores ``(B, C, ...)`` in [0, 1].
      level: the level so far, a 0-d tensor (NaN before the first batch).
      s: the settings (``top_k``, ``level_momentum``).
    Returns:
      The new level, a 0-d tensor."""
    best = probs.flatten(2).amax(dim=1)
    k = min(s.top_k, best.shape[1])
    observed = best.topk(k, dim=1).values.mean()
    return torch.where(torch.isfinite(level), torch.lerp(observed, level, s.level_momentum), observed)


def pseudo_targets(probs: Tensor, thresholds: Tensor, s: SelfTrainSettings) -> tuple[Tensor, Tensor]:
    """The teacher's scores as self-training targets.

    Args:
      probs: the teacher's scores ``(B, C, ...)`` in [0, 1].
      thresholds: per-class thresholds ``(C,)``.
      s: the settings (``negative_below``: scores under it count as negatives).

    Returns:
      ``(heatmap, mask)``: targets shaped like ``probs`` (1 at confident peaks, the teacher's score elsewhere)
      and the bool mask of counted cells (positives and negatives; the ignored band is False)."""
    shape = (1, -1) + (1,) * (probs.dim() - 2)
    confident = probs >= thresholds.view(shape)
    positive = confident & local_peaks(probs)
    heatmap = torch.where(positive, torch.ones_like(probs), probs)
    return heatmap, positive | (probs < s.negative_below)


def teacher_prepare(apply: Apply, readout: Readout, settings: SelfTrainSettings, bn: str):
    """Self-training's ``prepare``: the teacher's (flip-averaged) scores of the batch, without gradient, made into
    ``(heatmap, mask, method_state)``: the targets, the counted cells and the state with the new level. The
    teacher's views normalise like the student but leave the running statistics alone.

    Args:
      apply: the model as a pure function.
      readout: reads the class maps from an output.
      settings: the self-training settings.
      bn: the BatchNorm mode while adapting.
    Returns:
      ``prepare(state, batch, noise) -> (heatmap, mask, method_state)``."""
    view_bn = view_bn_mode(bn)

    def teacher_scores(params: Params, buffers: Params, batch: Tensor) -> Tensor:
        probs = torch.sigmoid(readout.scores(apply(params, buffers, batch, bn_mode=view_bn)[0]))
        if not settings.flip:
            return probs
        mirrored = readout.flipped_scores(apply(params, buffers, torch.flip(batch, dims=(-1,)), bn_mode=view_bn)[0])
        return (probs + torch.sigmoid(mirrored)) / 2

    def prepare(state: TTTState, batch: Tensor, noise: None) -> tuple:
        del noise
        own = state.method_state
        with torch.no_grad():
            probs = teacher_scores(combine(state.frozen, own.teacher), state.buffers, batch)
            level = next_level(probs, own.level, settings)
            heatmap, mask = pseudo_targets(probs, class_thresholds(probs, level, settings), settings)
        return heatmap, mask, own._replace(level=level)

    return prepare


def selftrain_method(
    apply: Apply,
    optimizer: optim.GradientTransformation,
    settings: SelfTrainSettings = SelfTrainSettings(),
    *,
    readout: Readout = DEFAULT_READOUT,
    bn: str = "running",
) -> Method:
    """Detection self-training as a ``Method`` (the module docstring has the rule).

    Needs class scores scored by independent sigmoids (a detector's readout, ``score_kind="sigmoid"``); a
    softmax readout is a ValueError. Metrics add ``positives`` (confident detections in the batch),
    ``ignored_ratio`` (the share of cells in the ignored band) and ``level``.

    Args:
      apply: the model as a pure function (``bridge.make_apply``).
      optimizer: the optimiser of the adapted parameters.
      settings: the method's settings.
      readout: how the method's signals are read from an output.
      bn: the BatchNorm mode while adapting (``step.BN_MODES``).
    Returns:
      The ``Method``, its state a ``SelfTrainState``.
    Raises:
      ValueError: the readout's scores are not sigmoid scores."""
    if readout.score_kind != "sigmoid":
        raise ValueError(
            "selftrain needs a detector's class scores with independent sigmoids (readout score_kind 'sigmoid'); "
            f"this adapter's readout scores with {readout.score_kind!r}"
        )
    def student_loss(params, buffers, batch, extra):
        heatmap, mask, own = extra
        output, new_buffers = apply(params, buffers, batch, bn_mode=bn)
        loss = centernet_focal_loss(readout.scores(output), heatmap, mask=mask)
        positives = (heatmap.eq(1.0) & mask).sum().to(loss.dtype)
        metrics = {"positives": positives, "ignored_ratio": 1 - mask.to(loss.dtype).mean(), "level": own.level}
        return loss, LossOutput(new_buffers, metrics, output, own)

    def finish(old: TTTState, new: TTTState, metrics: dict, noise: None) -> tuple[TTTState, dict]:
        del old, noise
        teacher = ema(new.method_state.teacher, new.trainable, settings.ema_momentum)
        return new._replace(method_state=new.method_state._replace(teacher=teacher)), metrics

    def init(trainable: Params) -> SelfTrainState:
        some = next(iter(trainable.values()))
        return SelfTrainState(dict(trainable), torch.full((), float("nan"), dtype=some.dtype, device=some.device))

    def predict_params(state: TTTState) -> Params:
        return state.method_state.teacher if settings.predict_with == "teacher" else state.trainable

    return Method(
        student_loss,
        optimizer,
        prepare=teacher_prepare(apply, readout, settings, bn),
        finish=finish,
        init=init,
        predict_params=predict_params,
        metric_names=("positives", "ignored_ratio", "level"),
        row_fields={"ema_momentum": settings.ema_momentum, "flip": settings.flip},
        calls=(2 + settings.flip, 1),  # the teacher's plain (and mirrored) view, the student's
    )
