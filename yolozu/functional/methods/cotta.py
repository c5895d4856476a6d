"""CoTTA: continual test-time adaptation (Wang, Fink, Van Gool & Dai, CVPR 2022), as pure functions.

A student is trained on the test stream towards a mean teacher's pseudo-labels:

- the teacher is an exponential moving average of the student, theta_t <- m theta_t + (1 - m) theta_s, and is
  never optimised;
- its pseudo-labels average its class scores over augmentation branches (mapped back to the original frame)
  where the source model is not confident (confidence < threshold), else use its plain prediction;
- after every ``restore_interval`` steps each element of the adapted parameters returns to its source value
  with probability ``restore_prob`` (stochastic restoration), which bounds forgetting on long streams.

Randomness enters as explicit inputs: an update takes the restore draws as a tensor dict (so ``vmap`` can
batch K streams, each with its own draws); ``step.make_step`` draws them from a key.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor

from yolozu.functional import optim
from yolozu.functional.readout import DEFAULT_READOUT, Readout
from yolozu.functional.rng import Key, generator
from yolozu.functional.settings import many_of, number, one_of, setting, str_tuple
from yolozu.functional.state import Params, combine
from yolozu.functional.step import Apply, LossOutput, Method, TTTState, view_bn_mode

AUGMENTATIONS = ("identity", "hflip")
AGGREGATIONS = ("confidence_weighted_mean", "mean")
PREDICT_WITH = ("teacher", "student")


def ema(teacher: Params, student: Params, momentum: float | Tensor) -> Params:
    """theta_t <- m * theta_t + (1 - m) * theta_s, leaf-wise (the mean teacher of Tarvainen & Valpola 2017)."""
    return {name: torch.lerp(student[name], t, momentum) for name, t in teacher.items()}


def restore_draws(params: Params, k: Key) -> Params:
    """Uniform draws in [0, 1), one per parameter element, from key ``k`` (CPU, moved to each tensor's device)."""
    gen = generator(k)
    return {name: torch.rand(p.shape, generator=gen).to(p.device) for name, p in params.items()}


def stochastic_restore(
    params: Params, source: Params, prob: float | Tensor, draws: Params, active: Tensor | bool = True
) -> tuple[Params, Tensor]:
    """Each element returns to its source value where its draw is below ``prob`` (and ``active``).

    Returns the new params and the number of elements restored (a 0-d tensor). Only the names in ``params``
    are touched: restoration applies to the adapted parameters, never to frozen ones.
    """
    restored = {}
    counts = []
    for name, p in params.items():
        hit = (draws[name] < prob) & active
        restored[name] = torch.where(hit, source[name], p)
        counts.append(hit.sum())
    # an empty selection has no device of its own: its count of zero is a CPU scalar
    total = torch.stack(counts).sum() if counts else torch.zeros((), dtype=torch.int64, device="cpu")
    return restored, total


def _hflip(x: Tensor) -> Tensor:
    return torch.flip(x, dims=(-1,))


def _probabilities(logits: Tensor, score_kind: str) -> Tensor:
    return torch.sigmoid(logits) if score_kind == "sigmoid" else torch.softmax(logits, dim=1)


def _confidence(probs: Tensor) -> Tensor:
    """Per sample (and position): the largest class probability, kept as dim 1 for broadcasting."""
    return probs.amax(dim=1, keepdim=True)


def aggregate(branch_probs: Sequence[Tensor], aggregation: str) -> Tensor:
    """Average branch probabilities: plainly (``mean``), or weighted by each branch's confidence per sample and
    position (``confidence_weighted_mean``)."""
    stacked = torch.stack(list(branch_probs))
    if aggregation == "mean":
        return stacked.mean(dim=0)
    weights = _confidence(stacked.flatten(0, 1)).unflatten(0, stacked.shape[:2])
    return (stacked * weights).sum(dim=0) / weights.sum(dim=0).clamp_min(1e-12)


def teacher_targets(
    branch_logits: Sequence[Tensor],
    source_logits: Tensor,
    *,
    score_kind: str,
    aggregation: str,
    threshold: float,
    plain_logits: Tensor,
) -> Tensor:
    """Soft pseudo-labels (CoTTA, Wang et al. 2022): the augmentation average where the source model's
    confidence is below ``threshold``, else the teacher's plain prediction.

    Args:
      branch_logits: the teacher's scores of each augmented view, mapped back to the original frame,
        each ``(B, C, ...)``.
      source_logits: the source model's scores of the plain view, ``(B, C, ...)``.
      plain_logits: the teacher's scores of the plain (identity) view, ``(B, C, ...)``, whatever the branches.

    Returns:
      target probabilities ``(B, C, ...)``.
    """
    probs = [_probabilities(b, score_kind) for b in branch_logits]
    uncertain = _confidence(_probabilities(source_logits, score_kind)) < threshold
    return torch.where(uncertain, aggregate(probs, aggregation), _probabilities(plain_logits, score_kind))


def consistency_loss(student_logits: Tensor, targets: Tensor, score_kind: str) -> Tensor:
    """The student's consistency with soft targets: soft cross-entropy -sum_c y_c log p_c (softmax scores) or
    binary cross-entropy (sigmoid scores), averaged."""
    if score_kind == "sigmoid":
        return F.binary_cross_entropy_with_logits(student_logits, targets)
    return -(targets * F.log_softmax(student_logits, dim=1)).sum(dim=1).mean()


class CoTTAState(NamedTuple):
    """CoTTA's own state: the mean teacher's adapted parameters."""

    teacher: Params


@attrs.frozen(kw_only=True)
class CoTTASettings:
    """CoTTA's settings; defaults from the paper's CIFAR setting."""

    ema_momentum: float = setting(0.999, "CoTTA: teacher EMA momentum m", number(0, 1), yolozu=True)
    augmentations: tuple[str, ...] = setting(
        AUGMENTATIONS, "CoTTA: teacher branches", many_of(*AUGMENTATIONS), type=tuple, converter=str_tuple, yolozu=True
    )
    aggregation: str = setting(
        "confidence_weighted_mean", "CoTTA: branch averaging", one_of(*AGGREGATIONS), yolozu=True
    )
    restore_prob: float = setting(0.01, "CoTTA: stochastic restore probability", number(0, 1), yolozu=True)
    restore_interval: int = setting(1, "CoTTA: restore every N steps", number(1, integer=True), yolozu=True)
    confidence_threshold: float = setting(
        0.92, "CoTTA: average the branches where the source confidence is below this", number(0, 1)
    )
    predict_with: str = setting("teacher", "CoTTA: predict with the teacher or the student", one_of(*PREDICT_WITH))


def teacher_prepare(apply: Apply, readout: Readout, settings: CoTTASettings, bn: str):
    """CoTTA's ``prepare``: the teacher's soft targets for a batch (no gradient). The teacher and source views
    normalise like the student but leave the running statistics alone."""
    view_bn = view_bn_mode(bn)

    def scores_in_frame(params: Params, buffers: Params, x: Tensor, name: str) -> Tensor:
        if name == "identity":
            return readout.scores(apply(params, buffers, x, bn_mode=view_bn)[0])
        return readout.flipped_scores(apply(params, buffers, _hflip(x), bn_mode=view_bn)[0])

    def prepare(state: TTTState, batch: Tensor, draws: Params) -> Tensor:
        del draws
        teacher = combine(state.frozen, state.method_state.teacher)
        with torch.no_grad():
            views = {name: scores_in_frame(teacher, state.buffers, batch, name) for name in settings.augmentations}
            plain = views.get("identity")
            if plain is None:  # the branches hold no plain view: confident samples still take it
                plain = scores_in_frame(teacher, state.buffers, batch, "identity")
            source = scores_in_frame(combine(state.frozen, state.source), state.buffers, batch, "identity")
            return teacher_targets(
                list(views.values()),
                source,
                score_kind=readout.score_kind,
                aggregation=settings.aggregation,
                threshold=settings.confidence_threshold,
                plain_logits=plain,
            )

    return prepare


def teacher_finish(settings: CoTTASettings):
    """CoTTA's ``finish``: the teacher follows the student (EMA), then the due stochastic restore."""

    def finish(old: TTTState, new: TTTState, metrics: dict, draws: Params) -> tuple[TTTState, dict]:
        teacher = ema(old.method_state.teacher, new.trainable, settings.ema_momentum)
        due = (new.step % settings.restore_interval) == 0
        restored, count = stochastic_restore(new.trainable, old.source, settings.restore_prob, draws, due)
        metrics = {
            **metrics,
            "ema_momentum": torch.full_like(metrics["loss"], settings.ema_momentum),
            "restored_count": count,
        }
        return new._replace(trainable=restored, method_state=CoTTAState(teacher)), metrics

    return finish


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
    randomness is one uniform draw per adapted element (``restore_draws``). Its state is a ``CoTTAState``;
    predictions use the teacher unless ``settings.predict_with`` is ``student``.

    Metrics add ``consistency_loss`` (= ``loss``), ``ema_momentum`` and ``restored_count``.
    """

    def student_loss(params, buffers, batch, targets):
        output, new_buffers = apply(params, buffers, batch, bn_mode=bn)
        loss = consistency_loss(readout.scores(output), targets, readout.score_kind)
        return loss, LossOutput(new_buffers, {"consistency_loss": loss.detach()}, output)

    def draw(k: Key, source: Params, batch: Tensor) -> Params:
        del batch
        return restore_draws(source, k)

    def predict_params(state: TTTState) -> Params:
        return state.method_state.teacher if settings.predict_with == "teacher" else state.trainable

    augmentations = list(settings.augmentations)
    aug = {"augmentations": augmentations, "aggregation": settings.aggregation, "branches": len(augmentations)}
    return Method(
        student_loss,
        optimizer,
        prepare=teacher_prepare(apply, readout, settings, bn),
        finish=teacher_finish(settings),
        draw=draw,
        init=lambda trainable: CoTTAState(dict(trainable)),
        predict_params=predict_params,
        metric_names=("consistency_loss", "restored_count"),
        row_fields={
            "ema_momentum": settings.ema_momentum,
            "restore_prob": settings.restore_prob,
            "restore_interval": settings.restore_interval,
            "aug": aug,
        },
    )
