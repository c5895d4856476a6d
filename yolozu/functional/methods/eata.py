"""EATA: efficient anti-forgetting test-time adaptation (Niu, Wu, Zhang, Chen, Zhao, Zhao & Tan, ICML 2022).

Tent's entropy minimisation on reliable, non-redundant samples only, re-weighted, plus an anti-forgetting
regulariser:

- reliable: a sample's entropy H(x) = -sum_c p_c log p_c is below E0 (default 0.4 ln C);
- non-redundant: of those, the samples whose probabilities p(x) have |cos(p(x), m)| < d_margin, m being the
  moving average of the selected samples' mean probabilities (m <- 0.9 m + 0.1 mean p; the first selection
  starts it);
- weighted: each kept sample's entropy counts exp(E0 - H(x)) (detached), averaged over the kept samples;
- anti-forgetting: + alpha * sum_i F_i (theta_i - theta0_i)^2, with the diagonal Fisher information F of
  in-distribution data (squared gradients of the cross-entropy to the model's own argmax, averaged over
  batches; ``calibrate``); without such data, lambda * sum_i (theta_i - theta0_i)^2 (YOLOZU's L2 anchor).

For a detector the samples are its per-peak (per-anchor) class distributions (``Readout.class_rows``; independent
sigmoid scores normalised over the classes). YOLOZU's knobs act on
top: a sample also needs top probability >= ``conf_min`` and ``entropy_min`` <= H <= ``entropy_max``; a step with
fewer than ``min_valid_dets`` kept samples is skipped (no update); more than ``max_skip_streak`` skipped steps in
a row, or a kept fraction below ``selected_ratio_min``, stop the run (``Method.stop_reasons``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor

from yolozu.functional import optim
from yolozu.functional.losses import entropy_margin, softmax_entropy
from yolozu.functional.readout import DEFAULT_READOUT, Readout
from yolozu.functional.settings import number, optional_split, setting
from yolozu.functional.state import Params, combine, tree_where
from yolozu.functional.step import Apply, LossOutput, Method, TTTState, grad_params

STOP_REASONS = ("eata_max_skip_streak_exceeded", "eata_selected_ratio_below_min")


class EATAState(NamedTuple):
    """EATA's own state: the moving average of the selected probabilities (NaN until the first selection), the
    count of consecutive skipped steps and the diagonal Fisher information (empty without calibration data)."""

    probs: Tensor
    skip_streak: Tensor
    fisher: Params


@attrs.frozen(kw_only=True)
class EATASettings:
    """EATA's margins and regulariser (the paper's defaults) and YOLOZU's selection knobs."""

    conf_min: float = setting(0.2, "EATA: a sample needs at least this top probability", number(0, 1), yolozu=True)
    entropy_min: float = setting(0.05, "EATA: a sample needs at least this entropy", number(0), yolozu=True)
    entropy_max: float = setting(3.0, "EATA: a sample needs at most this entropy", number(0), yolozu=True)
    min_valid_dets: int = setting(
        1, "EATA: a step with fewer kept samples is skipped", number(0, integer=True), yolozu=True
    )
    anchor_lambda: float = setting(
        1e-3, "EATA: L2 anchor to the source weights without Fisher data", number(0), yolozu=True
    )
    selected_ratio_min: float = setting(
        0.0, "EATA: stop when the kept fraction falls below this", number(0, 1), yolozu=True
    )
    max_skip_streak: int | None = setting(
        3,
        "EATA: stop after more skipped steps in a row than this (none: never)",
        number(0, integer=True, optional=True),
        yolozu=True,
    )
    e_margin: float | None = setting(
        None, "EATA: entropy margin E0 (none: 0.4 ln C)", number(0, low_open=True, optional=True), type=float
    )
    d_margin: float = setting(0.05, "EATA: redundancy margin on |cos| to the moving probabilities", number(0, 1))
    fisher_alpha: float = setting(2000.0, "EATA: weight alpha of the Fisher regulariser", number(0))
    fisher_data: str | None = setting(
        None, "EATA: split of in-distribution data for the Fisher information", optional_split, type=str
    )


def selection(probs: Tensor, entropy: Tensor, moving: Tensor, e0: float, s: EATASettings) -> Tensor:
    """Which samples (rows of ``probs``) EATA keeps: reliable by entropy and confidence, and not redundant with
    the moving probabilities ``moving`` (every reliable sample while ``moving`` is NaN).

    Args:
      probs: the samples' class probabilities ``(N, C)``.
      entropy: their entropies ``(N,)``.
      moving: the moving probabilities ``(C,)`` (NaN before the first selection).
      e0: the entropy margin E0.
      s: EATA's settings (the knobs ``conf_min``, ``entropy_min``, ``entropy_max``, ``d_margin``).
    Returns:
      bool ``(N,)``: the kept samples."""
    reliable = (entropy < e0) & (entropy >= s.entropy_min) & (entropy <= s.entropy_max)
    reliable = reliable & (probs.amax(dim=1) >= s.conf_min)
    cosine = F.cosine_similarity(probs, moving.expand_as(probs), dim=1)
    started = torch.isfinite(moving).all()
    return reliable & (~started | (cosine.abs() < s.d_margin))


def moving_probs(moving: Tensor, probs: Tensor, keep: Tensor) -> Tensor:
    """m <- 0.9 m + 0.1 mean(kept probabilities); the first kept batch starts it; no kept sample: unchanged.

    Args:
      moving: the moving probabilities ``(C,)``, or NaN before the first selection.
      probs: the samples' class probabilities ``(N, C)``.
      keep: bool ``(N,)``, the kept samples.
    Returns:
      The new moving probabilities ``(C,)``."""
    count = keep.sum()
    mean = (probs * keep[:, None]).sum(dim=0) / count.clamp_min(1)
    updated = torch.where(torch.isfinite(moving), 0.9 * moving + 0.1 * mean, mean)
    return torch.where(count > 0, updated, moving)


def anchor_penalty(trainable: Params, source: Params, fisher: Params, s: EATASettings) -> Tensor:
    """EATA's anti-forgetting regulariser (eq. 8 of the paper): alpha * sum F (theta - theta0)^2 with a
    Fisher, else YOLOZU's L2 anchor lambda * sum (theta - theta0)^2.

    Args:
      trainable: the adapted parameters theta.
      source: their source values theta0.
      fisher: the diagonal Fisher information keyed like ``trainable``, or empty.
      s: EATA's settings (``fisher_alpha``, ``anchor_lambda``).
    Returns:
      A 0-d tensor."""
    if fisher:
        terms = [(fisher[n] * (p - source[n]).square()).sum() for n, p in trainable.items()]
        return s.fisher_alpha * torch.stack(terms).sum()
    return s.anchor_lambda * torch.stack([(p - source[n]).square().sum() for n, p in trainable.items()]).sum()


def eata_loss(apply: Apply, readout: Readout, s: EATASettings, bn: str):
    """EATA's loss ``(params, buffers, batch, (eata_state, source))``: the weighted entropy of the kept samples
    plus the anti-forgetting penalty; metrics carry the kept count and the kept fraction, and the method state
    returned beside them carries the new moving probabilities.

    Args:
      apply: the model as a pure function.
      readout: reads the class rows ``(N, C)`` from an output.
      s: EATA's settings.
      bn: the BatchNorm mode while adapting.
    Returns:
      The ``LossFn``."""

    def loss_fn(params, buffers, batch, extra):
        eata, source = extra
        output, new_buffers = apply(params, buffers, batch, bn_mode=bn)
        logits = readout.class_rows(output)
        probs = F.log_softmax(logits, dim=1).exp()
        entropy = softmax_entropy(logits, dim=1)
        e0 = entropy_margin(s.e_margin, logits.shape[1])
        keep = selection(probs.detach(), entropy.detach(), eata.probs, e0, s)
        weight = torch.exp(e0 - entropy.detach()) * keep
        adapt = (entropy * weight).sum() / keep.sum().clamp_min(1)
        anchor = anchor_penalty({n: params[n] for n in source}, source, eata.fisher, s)
        loss = adapt + anchor
        metrics = {
            "selected": keep.sum().to(loss.dtype),
            "selected_ratio": keep.to(loss.dtype).mean(),
            "samples": torch.full_like(loss, keep.numel()).detach(),
            "adapt_loss": adapt.detach(),
            "anchor_loss": anchor.detach(),
            "mean_conf": probs.detach().amax(dim=1).mean(),
            "mean_entropy": entropy.detach().mean(),
        }
        moved = eata._replace(probs=moving_probs(eata.probs, probs.detach(), keep))
        return loss, LossOutput(new_buffers, metrics, output, moved)

    return loss_fn


def skip_or_keep(s: EATASettings):
    """EATA's ``finish``: a step with fewer than ``min_valid_dets`` kept samples is undone (weights and
    optimiser state), the skip streak counts it, the moving probabilities move, the stop flags are raised.

    Args:
      s: EATA's settings (``min_valid_dets``, ``max_skip_streak``, ``selected_ratio_min``).
    Returns:
      ``finish(old, new, metrics, noise) -> (state, metrics)``."""

    def finish(old: TTTState, new: TTTState, metrics: dict, noise: Any) -> tuple[TTTState, dict]:
        del noise
        metrics = dict(metrics)
        skipped = metrics["selected"] < s.min_valid_dets
        trainable = tree_where(skipped, old.trainable, new.trainable)
        opt_state = tree_where(skipped, old.opt_state, new.opt_state)
        streak = old.method_state.skip_streak
        streak = torch.where(skipped, streak + 1, torch.zeros_like(streak))
        never = torch.zeros_like(streak, dtype=torch.bool)  # max_skip_streak None: no skip stop (the paper's)
        metrics.update(
            skipped=skipped,
            update_norm=torch.where(skipped, torch.zeros_like(metrics["update_norm"]), metrics["update_norm"]),
            skip_streak=streak.to(metrics["loss"].dtype),
            eata_max_skip_streak_exceeded=streak > s.max_skip_streak if s.max_skip_streak is not None else never,
            eata_selected_ratio_below_min=metrics["selected_ratio"] < s.selected_ratio_min,
        )
        state = new.method_state._replace(skip_streak=streak)
        return new._replace(trainable=trainable, opt_state=opt_state, method_state=state), metrics

    return finish


def eata_method(
    apply: Apply,
    optimizer: optim.GradientTransformation,
    settings: EATASettings = EATASettings(),
    *,
    readout: Readout = DEFAULT_READOUT,
    bn: str = "running",
) -> Method:
    """EATA as a ``Method`` (``eata_loss``, ``skip_or_keep``; ``calibrate`` computes the Fisher information);
    metrics add ``selected`` (kept samples), ``selected_ratio`` and ``skipped``. Its loss is one plain forward
    of the batch, so that forward's output is also the batch's prediction (``clean_forward``), as the reference
    code predicts.

    Args:
      apply: the model as a pure function (``bridge.make_apply``).
      optimizer: the optimiser of the adapted parameters.
      settings: the method's settings.
      readout: how the method's signals are read from an output.
      bn: the BatchNorm mode while adapting (``step.BN_MODES``).
    Returns:
      The ``Method``, its state an ``EATAState``."""

    def prepare(state: TTTState, batch: Tensor, noise: Any) -> tuple:
        del batch, noise
        return state.method_state, state.source

    def init(trainable: Params) -> EATAState:
        device = next(iter(trainable.values())).device
        # the class count is known at the first step: NaN broadcasts to the moving average's shape then
        nan = torch.full((), float("nan"), device=device)
        return EATAState(nan, torch.zeros((), dtype=torch.int64, device=device), {})

    def calibrate(state: TTTState, batches: Any) -> TTTState:
        fisher = diagonal_fisher(apply, readout, state, batches)
        return state._replace(method_state=state.method_state._replace(fisher=fisher))

    return Method(
        eata_loss(apply, readout, settings, bn),
        optimizer,
        prepare=prepare,
        finish=skip_or_keep(settings),
        init=init,
        calibrate=calibrate,
        metric_names=("selected", "selected_ratio", "skipped", "samples", "adapt_loss", "anchor_loss", "mean_conf",
                      "mean_entropy", "skip_streak"),  # fmt: skip
        stop_reasons=STOP_REASONS,
        clean_forward=True,
        yolozu_row=eata_row,
    )


def eata_row(row: dict) -> dict:
    """YOLOZU's EATA step keys beside ours: ``selected_count`` and ``batch_count`` (kept and all samples: the
    readout's candidates), ``skip_reason`` (None for a kept step) and whether the step changed nothing.

    Args:
      row: a step row of this method.
    Returns:
      YOLOZU's keys for the row (and ``update_skipped``).
    """
    skipped = bool(row["skipped"])
    return {
        "selected_count": row["selected"],
        "batch_count": row["samples"],
        "skip_reason": "selected_below_min_valid_dets" if skipped else None,
        "update_skipped": skipped,
    }


def diagonal_fisher(apply: Apply, readout: Readout, state: TTTState, batches: Any) -> Params:
    """The diagonal Fisher information of the adapted params on in-distribution ``batches``: per batch, the
    squared gradient of the cross-entropy between the model's class rows and their own argmax, averaged over
    batches (EATA's estimate), with test-batch BatchNorm statistics and the running ones left alone.

    Args:
      apply: the model as a pure function.
      readout: reads the class rows ``(N, C)`` from an output.
      state: a fresh state (the source model).
      batches: an iterable of in-distribution input batches.
    Returns:
      F, keyed and shaped like ``state.trainable``.
    Raises:
      ValueError: ``batches`` is empty."""

    def cross_entropy(trainable: Params, x: Tensor) -> Tensor:
        output, _ = apply(combine(state.frozen, trainable), state.buffers, x, bn_mode="batch")
        logits = readout.class_rows(output)
        return F.cross_entropy(logits, logits.detach().argmax(dim=1))

    total = {n: torch.zeros_like(t) for n, t in state.trainable.items()}
    count = 0
    for x in batches:
        grads = grad_params(cross_entropy, state.trainable, x)
        total = {n: total[n] + grads[n].square() for n in total}
        count += 1
    if count == 0:
        raise ValueError("EATA's Fisher information needs at least one batch of in-distribution data")
    return {n: t / count for n, t in total.items()}
