"""SAR: sharpness-aware and reliable entropy minimisation (Niu, Wu, Zhang, Wen, Chen, Zhao & Tan, ICLR 2023).

Each step is sharpness-aware minimisation (SAM, Foret et al. 2021) of the entropy of reliable samples:

- reliable: a sample's entropy H(x) is below E0 (default 0.4 ln C); the loss is the mean over those;
- first pass: g = grad L(theta) at the current weights; the perturbation is
  e = rho * g / ||g|| (SAM), or, adaptive (ASAM), e = rho * theta^2 g / ||theta g|| (element-wise);
- second pass: the gradient of L at theta + e, on the samples reliable in both passes, drives the optimiser
  step of theta;
- model recovery: a moving average of the second-pass loss, a <- 0.9 a + 0.1 L, below ``reset_constant``
  (0.2) means the model collapsed to trivial confident predictions: the adapted weights and the optimiser
  state go back to the source and the average restarts.

The paper adapts the norm layers minus the top block (pick them with the update filter and ``exclude``).
YOLOZU's ``first_step_scale`` multiplies rho. For a detector the samples are its per-peak (per-anchor) class
distributions (``Readout.class_rows``; independent sigmoid scores normalised over the classes).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import attrs
import torch
from torch import Tensor

from yolozu.functional import optim
from yolozu.functional.losses import entropy_margin, softmax_entropy
from yolozu.functional.readout import DEFAULT_READOUT, Readout
from yolozu.functional.settings import number, setting
from yolozu.functional.state import Params, combine, tree_where
from yolozu.functional.step import Apply, LossOutput, Method, TTTState, grad_params, view_bn_mode


class SARState(NamedTuple):
    """SAR's own state: the moving average of the second-pass loss (NaN until the first step or a recovery)."""

    ema_loss: Tensor


@attrs.frozen(kw_only=True)
class SARSettings:
    """SAM's radius, ASAM, the reliable-entropy margin and the recovery threshold (the paper's defaults)."""

    rho: float = setting(0.05, "SAR: SAM radius rho", number(0), yolozu=True)
    adaptive: bool = setting(False, "SAR: adaptive SAM (ASAM), the perturbation scaled by theta^2", yolozu=True)
    first_step_scale: float = setting(1.0, "SAR: scale of the first (perturbation) step", number(0), yolozu=True)
    e_margin: float | None = setting(
        None, "SAR: entropy margin E0 (none: 0.4 ln C)", number(0, low_open=True, optional=True), type=float
    )
    reset_constant: float = setting(
        0.2, "SAR: recover the source model when the loss average falls below this", number(0)
    )


def reliable_entropy(logits: Tensor, e_margin: float | None) -> tuple[Tensor, Tensor]:
    """Per-sample entropies of class rows ``(N, C)`` and which are reliable (below E0, default 0.4 ln C).

    Args:
      logits: class rows ``(N, C)``.
      e_margin: E0 (None: 0.4 ln C).
    Returns:
      ``(entropy, reliable)``: ``(N,)`` entropies (with grad) and a bool ``(N,)``."""
    entropy = softmax_entropy(logits, dim=1)
    return entropy, entropy.detach() < entropy_margin(e_margin, logits.shape[1])


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` where ``mask`` holds (0 when it holds nowhere).

    Args:
      values: ``(N,)``.
      mask: bool ``(N,)``.
    Returns:
      A 0-d tensor."""
    return (values * mask).sum() / mask.sum().clamp_min(1)


def sam_perturbation(grads: Params, params: Params, rho: float, adaptive: bool) -> Params:
    """SAM's ascent step e = rho * g / ||g|| or, adaptive, rho * theta^2 g / ||theta g|| (element-wise), with
    1e-12 added to the norm (the reference code's).

    Args:
      grads: the first pass's gradients, keyed like ``params``.
      params: the adapted parameters theta.
      rho: the radius.
      adaptive: ASAM's element-wise scaling.
    Returns:
      e, keyed and shaped like ``grads``."""
    scaled = {n: (params[n].abs() * g if adaptive else g) for n, g in grads.items()}
    scale = rho / (optim.global_norm(scaled) + 1e-12)
    return {n: (params[n].square() if adaptive else 1.0) * g * scale for n, g in grads.items()}


def recover_or_keep(s: SARSettings, optimizer: optim.GradientTransformation):
    """SAR's ``finish``: the moving average of the loss over steps with a selected sample (a step without one is
    taken on zero gradients, as the reference's); below ``reset_constant``, model recovery (weights and
    optimiser state back to the source, the average restarted, where the reference code keeps it: docs/ttt.md).

    Args:
      s: SAR's settings (``reset_constant``).
      optimizer: the optimiser, whose state a recovery re-initialises.
    Returns:
      ``finish(old, new, metrics, noise) -> (state, metrics)``."""

    def finish(old: TTTState, new: TTTState, metrics: dict, noise: Any) -> tuple[TTTState, dict]:
        del noise
        # no selected sample: the loss is the mean over no sample, its gradients zeros, and the step is taken on
        # them as in the reference code (momentum SGD still moves the weights); the average keeps its value
        idle = metrics["selected"] == 0
        previous = old.method_state.ema_loss
        ema = torch.where(torch.isfinite(previous), 0.9 * previous + 0.1 * metrics["loss"], metrics["loss"])
        ema = torch.where(idle, previous, ema)
        recover = ema < s.reset_constant
        trainable = tree_where(recover, old.source, new.trainable)
        opt_state = tree_where(recover, optimizer.init(old.source), new.opt_state)
        ema = torch.where(recover, torch.full_like(ema, float("nan")), ema)
        metrics = {
            **metrics,
            "ema_loss": ema,
            "recovered": recover,
        }
        return new._replace(trainable=trainable, opt_state=opt_state, method_state=SARState(ema)), metrics

    return finish


def sar_method(
    apply: Apply,
    optimizer: optim.GradientTransformation,
    settings: SARSettings = SARSettings(),
    *,
    readout: Readout = DEFAULT_READOUT,
    bn: str = "running",
) -> Method:
    """SAR as a ``Method``: ``prepare`` runs the first pass and returns the perturbation and the first pass's
    reliable samples; the loss is the second pass at the perturbed weights; ``finish`` keeps the loss average
    and recovers (``recover_or_keep``). Metrics add ``reliable`` (first-pass reliable samples), ``selected``
    (reliable in both passes; none: zero gradients), ``ema_loss`` and ``recovered``.

    Args:
      apply: the model as a pure function (``bridge.make_apply``).
      optimizer: the optimiser of the adapted parameters.
      settings: the method's settings.
      readout: how the method's signals are read from an output.
      bn: the BatchNorm mode while adapting (``step.BN_MODES``).
    Returns:
      The ``Method``, its state a ``SARState``."""
    s = settings
    rho = s.rho * s.first_step_scale

    def first_pass(trainable: Params, state: TTTState, batch: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        view = view_bn_mode(bn)  # the second pass alone updates running statistics
        output, _ = apply(combine(state.frozen, trainable), state.buffers, batch, bn_mode=view)
        entropy, reliable = reliable_entropy(readout.class_rows(output), s.e_margin)
        loss = masked_mean(entropy, reliable)
        return loss, (reliable, loss.detach())

    def prepare(state: TTTState, batch: Tensor, noise: Any) -> tuple[Params, Tensor, Tensor]:
        del noise
        grads, (reliable, first) = grad_params(first_pass, state.trainable, state, batch, has_aux=True)
        return sam_perturbation(grads, state.trainable, rho, s.adaptive), reliable, first

    def loss_fn(params, buffers, batch, extra):
        perturbation, reliable, first = extra
        shifted = {n: p + perturbation[n] if n in perturbation else p for n, p in params.items()}
        output, new_buffers = apply(shifted, buffers, batch, bn_mode=bn)
        entropy, reliable_again = reliable_entropy(readout.class_rows(output), s.e_margin)
        selected = reliable & reliable_again
        loss = masked_mean(entropy, selected)
        counts = {
            "reliable": reliable.sum().to(loss.dtype),
            "selected": selected.sum().to(loss.dtype),
            "loss_first": first,
        }
        return loss, LossOutput(new_buffers, counts, output)

    def init(trainable: Params) -> SARState:
        return SARState(torch.full((), float("nan"), device=next(iter(trainable.values())).device))

    return Method(
        loss_fn,
        optimizer,
        prepare=prepare,
        finish=recover_or_keep(s, optimizer),
        init=init,
        metric_names=("reliable", "selected", "ema_loss", "recovered", "loss_first"),
        row_fields={"sar_rho": s.rho, "sar_adaptive": s.adaptive},
        calls=(2, 2),  # SAM's two passes
        optional_metrics=("ema_loss",),  # no average before a step with a selected sample, nor after a recovery
        yolozu_row=lambda row: sar_row(row, rho),
    )


def sar_row(row: dict, rho: float) -> dict:
    """YOLOZU's SAR step keys beside ours: ``loss_second`` (the loss at the perturbed weights),
    ``sar_rho_applied`` (rho x first_step_scale) and whether the step's update was discarded (a recovery).

    Args:
      row: a step row of this method.
      rho: the perturbation radius applied (rho x first_step_scale).
    Returns:
      YOLOZU's keys for the row (and ``update_skipped``).
    """
    return {
        "loss_second": row["loss"],
        "sar_rho_applied": rho,
        "update_skipped": bool(row["recovered"]),
    }
