"""Tent: test-time entropy minimisation (Wang, Shelhamer, Liu, Olshausen & Darrell, ICLR 2021).

Tent minimises the mean Shannon entropy of the model's own class predictions on the test batch,

    L(theta) = 1/N sum_n H(p_n),   H(p) = -sum_c p_c log p_c,   p_n = softmax(z_n)

(for independent sigmoid scores, H(p) = -sum_c [p_c log p_c + (1 - p_c) log(1 - p_c)]), updating only the
selected parameters (the paper: BatchNorm affine parameters, normalising with test-batch statistics). The
samples z_n are what the readout (``yolozu.functional.readout``) reads from the output: a classifier's logit
rows, or a detector's class logits at its top-k heatmap peaks (``peak_class_logits``).
"""

from __future__ import annotations

import attrs
from torch import Tensor

from yolozu.functional import optim
from yolozu.functional.losses import binary_entropy, softmax_entropy
from yolozu.functional.readout import DEFAULT_READOUT, Readout
from yolozu.functional.step import Apply, LossOutput, Method, make_step


@attrs.frozen(kw_only=True)
class TentSettings:
    """Tent has no settings of its own: its learning rate, filter and BatchNorm mode are every method's."""


def entropy(logits: Tensor, kind: str) -> Tensor:
    """Per-sample entropy ``H(p)`` of class logits (classes on dim 1): softmax or independent sigmoid scores.

    Args:
      logits: class logits ``(N, C, ...)``.
      kind: ``softmax`` or ``sigmoid``.
    Returns:
      ``(N, ...)`` for softmax scores (classes summed); the element-wise entropy ``(N, C, ...)`` for sigmoid ones."""
    return softmax_entropy(logits, dim=1) if kind == "softmax" else binary_entropy(logits)


def tent_loss(output, readout: Readout = DEFAULT_READOUT) -> Tensor:
    """Tent's objective on one forward output: the mean entropy of the class samples the readout gives.

    Args:
      output: a model's forward output.
      readout: reads the class samples from it.
    Returns:
      A 0-d tensor."""
    logits, kind = readout.class_samples(output)
    return entropy(logits, kind).mean()


def tent_method(
    apply: Apply,
    optimizer: optim.GradientTransformation,
    settings: TentSettings = TentSettings(),
    *,
    readout: Readout = DEFAULT_READOUT,
    bn: str = "running",
) -> Method:
    """Tent as a ``Method``: the loss is ``tent_loss(apply(batch))``; no randomness. Its loss is one plain
    forward of the batch, so that forward's output is also the batch's prediction (``clean_forward``).

    Args:
      apply: the model as a pure function (``bridge.make_apply``).
      optimizer: the optimiser of the adapted parameters.
      settings: the method's settings.
      readout: how the method's signals are read from an output.
      bn: the BatchNorm mode while adapting (``step.BN_MODES``).
    Returns:
      The ``Method``."""
    del settings

    def entropy_loss(params, buffers, batch, extra):
        del extra
        output, new_buffers = apply(params, buffers, batch, bn_mode=bn)
        return tent_loss(output, readout), LossOutput(new_buffers, {}, output)

    return Method(entropy_loss, optimizer, clean_forward=True)


def make_tent_step(
    apply: Apply,
    optimizer: optim.GradientTransformation,
    *,
    readout: Readout = DEFAULT_READOUT,
    bn: str = "running",
    differentiate: str = "autograd",
    keep_output: bool = False,
    capture: bool = False,
):
    """Build ``tent_step(state, batch, key) -> (new_state, metrics)`` over ``apply`` (``bridge.make_apply``).

    ``key`` is accepted for a uniform step signature and unused (Tent is deterministic). ``bn`` picks the
    BatchNorm mode (``step.BN_MODES``); ``capture`` replays a CUDA graph of the step (``step.make_step``).

    Args:
      apply: the model as a pure function.
      optimizer: the optimiser of the adapted parameters.
      readout: reads the class samples from an output.
      bn: the BatchNorm mode while adapting.
      differentiate: ``autograd`` or ``func`` (``step.DIFFERENTIATE``).
      keep_output: whether the metrics keep the forward output.
      capture: whether (or with which backend) the step is replayed as a CUDA graph.
    Returns:
      ``tent_step``."""
    method = tent_method(apply, optimizer, readout=readout, bn=bn)
    return make_step(method, differentiate=differentiate, keep_output=keep_output, capture=capture)
