"""Tent: test-time entropy minimisation (Wang et al., ICLR 2021).

Minimise the entropy of the model's own predictions on the test batch, updating only the selected
parameters (the paper: BatchNorm affine parameters, normalising with test-batch statistics).
"""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from yolozu.functional import optim
from yolozu.functional.readout import DEFAULT_READOUT, Readout
from yolozu.functional.rng import Key
from yolozu.functional.step import LossOutput, TTTState, make_apply, make_gradient_step

Step = Callable[[TTTState, Any, Any], tuple[TTTState, dict]]


def make_tent_step(
    model: nn.Module,
    optimizer: optim.GradientTransformation,
    *,
    readout: Readout = DEFAULT_READOUT,
    bn: str = "running",
    differentiate: str = "autograd",
    keep_output: bool = False,
) -> Step:
    """Build ``tent_step(state, batch, key) -> (new_state, metrics)`` for ``model`` (a template only).

    The loss is ``readout.tent_loss(model(batch))``; ``key`` is accepted for a uniform step signature and
    unused (Tent is deterministic). ``bn`` picks the BatchNorm mode (``step.BN_MODES``).
    """
    apply = make_apply(model, bn)

    def entropy_loss(params, buffers, batch, extra):
        del extra
        output, new_buffers = apply(params, buffers, batch)
        return readout.tent_loss(output), LossOutput(new_buffers, {}, output)

    update = make_gradient_step(entropy_loss, optimizer, differentiate=differentiate, keep_output=keep_output)

    def tent_step(state: TTTState, batch: Any, key: Key | None = None) -> tuple[TTTState, dict]:
        del key
        return update(state, batch, None)

    return tent_step
