"""Tent: test-time entropy minimisation (Wang et al., ICLR 2021).

Minimise the entropy of the model's own predictions on the test batch, updating only the selected
parameters (the paper: BatchNorm affine parameters, normalising with test-batch statistics).
"""

from __future__ import annotations

from torch import nn

from yolozu.functional import optim
from yolozu.functional.readout import DEFAULT_READOUT, Readout
from yolozu.functional.step import LossOutput, Method, make_apply, make_step


def tent_method(
    model: nn.Module,
    optimizer: optim.GradientTransformation,
    *,
    readout: Readout = DEFAULT_READOUT,
    bn: str = "running",
) -> Method:
    """Tent as a ``Method``: the loss is ``readout.tent_loss(model(batch))``; no randomness."""
    apply = make_apply(model, bn)

    def entropy_loss(params, buffers, batch, extra):
        del extra
        output, new_buffers = apply(params, buffers, batch)
        return readout.tent_loss(output), LossOutput(new_buffers, {}, output)

    return Method(entropy_loss, optimizer)


def make_tent_step(
    model: nn.Module,
    optimizer: optim.GradientTransformation,
    *,
    readout: Readout = DEFAULT_READOUT,
    bn: str = "running",
    differentiate: str = "autograd",
    keep_output: bool = False,
):
    """Build ``tent_step(state, batch, key) -> (new_state, metrics)`` for ``model`` (a template only).

    ``key`` is accepted for a uniform step signature and unused (Tent is deterministic). ``bn`` picks the
    BatchNorm mode (``step.BN_MODES``).
    """
    method = tent_method(model, optimizer, readout=readout, bn=bn)
    return make_step(method, differentiate=differentiate, keep_output=keep_output)
