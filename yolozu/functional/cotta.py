"""CoTTA: continual test-time adaptation (Wang, Fink, Van Gool & Dai, CVPR 2022), as pure functions.

A student is trained on the test stream towards a mean teacher's pseudo-labels:

- the teacher is an exponential moving average of the student, theta_t <- m theta_t + (1 - m) theta_s, and is
  never optimised;
- its pseudo-labels average its class scores over augmentation branches (mapped back to the original frame)
  where the source model is not confident (confidence < threshold), else use its plain prediction;
- after every ``restore_interval`` steps each element of the adapted parameters returns to its source value
  with probability ``restore_prob`` (stochastic restoration), which bounds forgetting on long streams.

Randomness enters as explicit inputs: an update takes the restore draws as a tensor dict (so ``vmap`` can
batch K streams, each with its own draws); ``cotta_step`` draws them from a key.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from yolozu.functional import optim
from yolozu.functional.readout import DEFAULT_READOUT, Readout
from yolozu.functional.rng import Key, generator
from yolozu.functional.state import Params, combine
from yolozu.functional.step import LossOutput, Method, TTTState, make_apply, make_step, make_update

AUGMENTATIONS = ("identity", "hflip")
AGGREGATIONS = ("confidence_weighted_mean", "mean")
TEACHER = "teacher"


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
    total = torch.stack(counts).sum() if counts else torch.zeros((), dtype=torch.int64)
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
) -> Tensor:
    """Soft pseudo-labels: the augmentation average where the source model's confidence is below ``threshold``,
    else the teacher's plain (first, identity-frame) prediction. ``branch_logits`` are in the original frame."""
    probs = [_probabilities(b, score_kind) for b in branch_logits]
    uncertain = _confidence(_probabilities(source_logits, score_kind)) < threshold
    return torch.where(uncertain, aggregate(probs, aggregation), probs[0])


def consistency_loss(student_logits: Tensor, targets: Tensor, score_kind: str) -> Tensor:
    """The student's consistency with soft targets: soft cross-entropy -sum_c y_c log p_c (softmax scores) or
    binary cross-entropy (sigmoid scores), averaged."""
    if score_kind == "sigmoid":
        return F.binary_cross_entropy_with_logits(student_logits, targets)
    return -(targets * F.log_softmax(student_logits, dim=1)).sum(dim=1).mean()


def _check_names(augmentations: Sequence[str], aggregation: str) -> None:
    unknown = [a for a in augmentations if a not in AUGMENTATIONS]
    if unknown or not augmentations:
        raise ValueError(f"unknown CoTTA augmentation(s) {unknown or '(none given)'}; choose from {AUGMENTATIONS}")
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown CoTTA aggregation {aggregation!r}; choose one of {AGGREGATIONS}")


def init_teacher(state: TTTState) -> TTTState:
    """The state with a teacher (a copy of the trainable params) in its extras."""
    return state._replace(extras={**state.extras, TEACHER: dict(state.trainable)})


def cotta_method(
    model: nn.Module,
    optimizer: optim.GradientTransformation,
    *,
    readout: Readout = DEFAULT_READOUT,
    augmentations: Sequence[str] = AUGMENTATIONS,
    aggregation: str = "confidence_weighted_mean",
    confidence_threshold: float = 0.92,
    ema_momentum: float = 0.999,
    restore_prob: float = 0.01,
    restore_interval: int = 1,
    bn: str = "running",
) -> Method:
    """CoTTA as a ``Method``: ``prepare`` makes the teacher's targets, the loss is the student's consistency
    with them, ``finish`` moves the teacher (EMA of the student) and restores; the randomness is one uniform
    draw per adapted element (``restore_draws``). ``state.extras["teacher"]`` holds the teacher
    (``init_teacher``).

    Metrics add ``consistency_loss`` (= ``loss``), ``ema_momentum`` and ``restored_count``.
    """
    _check_names(augmentations, aggregation)
    student_apply = make_apply(model, bn)
    # teacher and source forwards normalise like the student but leave the running statistics alone
    view_apply = make_apply(model, "eval" if bn == "eval" else "batch")

    def scores_in_frame(params: Params, buffers: Params, x: Tensor, name: str) -> Tensor:
        if name == "identity":
            return readout.scores(view_apply(params, buffers, x)[0])
        scores = readout.scores(view_apply(params, buffers, _hflip(x))[0])
        return _hflip(scores) if readout.spatial else scores

    def prepare(state: TTTState, batch: Tensor, draws: Params) -> Tensor:
        del draws
        teacher = combine(state.frozen, state.extras[TEACHER])
        with torch.no_grad():
            branches = [scores_in_frame(teacher, state.buffers, batch, name) for name in augmentations]
            source = scores_in_frame(combine(state.frozen, state.source), state.buffers, batch, "identity")
            return teacher_targets(
                branches, source, score_kind=readout.score_kind, aggregation=aggregation, threshold=confidence_threshold
            )

    def student_loss(params, buffers, batch, targets):
        output, new_buffers = student_apply(params, buffers, batch)
        loss = consistency_loss(readout.scores(output), targets, readout.score_kind)
        return loss, LossOutput(new_buffers, {"consistency_loss": loss.detach()}, output)

    def finish(old: TTTState, new: TTTState, metrics: dict, draws: Params) -> tuple[TTTState, dict]:
        teacher = ema(old.extras[TEACHER], new.trainable, ema_momentum)
        due = (new.step % restore_interval) == 0
        restored, count = stochastic_restore(new.trainable, old.source, restore_prob, draws, due)
        metrics = {
            **metrics,
            "ema_momentum": torch.full_like(metrics["loss"], ema_momentum),
            "restored_count": count,
            "total_update_norm": optim.global_norm(optim.tree_sub(restored, old.source)),
        }
        return new._replace(trainable=restored, extras={**new.extras, TEACHER: teacher}), metrics

    def draw(k: Key, state: TTTState, batch: Tensor) -> Params:
        del batch
        return restore_draws(state.source, k)

    return Method(student_loss, optimizer, prepare=prepare, finish=finish, draw=draw)


def make_cotta_update(
    model: nn.Module, optimizer: optim.GradientTransformation, *, differentiate: str = "autograd", **kwargs: Any
):
    """Build ``cotta_update(state, batch, draws) -> (new_state, metrics)`` (see ``cotta_method``)."""
    return make_update(cotta_method(model, optimizer, **kwargs), differentiate=differentiate)


def make_cotta_step(
    model: nn.Module, optimizer: optim.GradientTransformation, *, differentiate: str = "autograd", **kwargs: Any
):
    """Build ``cotta_step(state, batch, key)``: draws the restore noise from ``key``, then updates."""
    return make_step(cotta_method(model, optimizer, **kwargs), differentiate=differentiate)
