"""MIM test-time training: reconstruct the test image from a block-masked copy (masked-image modelling as a
self-supervised test-time task, as in TTT-MAE, Gandelsman et al., NeurIPS 2022)."""

from __future__ import annotations

from typing import Callable

from torch import Tensor, nn

from yolozu.functional import optim
from yolozu.functional.losses import masked_reconstruction_loss
from yolozu.functional.masking import apply_mask, block_mask
from yolozu.functional.readout import DEFAULT_READOUT, Readout
from yolozu.functional.rng import Key
from yolozu.functional.step import LossOutput, TTTState, make_apply, make_gradient_step

MaskedUpdate = Callable[[TTTState, Tensor, Tensor], tuple[TTTState, dict]]


def make_mim_update(
    model: nn.Module,
    optimizer: optim.GradientTransformation,
    *,
    mask_value: float = 0.0,
    readout: Readout = DEFAULT_READOUT,
    bn: str = "running",
    differentiate: str = "autograd",
) -> MaskedUpdate:
    """Build ``mim_update(state, batch, mask) -> (new_state, metrics)``: one step on a given mask.

    Taking the mask as an input (not a key) is what lets ``vmap`` batch the step over K streams, each with
    its own mask. Metrics add ``mask_ratio`` (the masked fraction of pixels).
    """
    apply = make_apply(model, bn)

    def reconstruction_loss(params, buffers, batch, mask):
        output, new_buffers = apply(params, buffers, apply_mask(batch, mask, mask_value), **readout.recon_kwargs)
        loss = masked_reconstruction_loss(readout.recon(output), batch, mask)
        metrics = {"mask_ratio": mask.to(batch.dtype).mean()}
        return loss, LossOutput(new_buffers, metrics, output)

    return make_gradient_step(reconstruction_loss, optimizer, differentiate=differentiate)


def make_mim_step(
    model: nn.Module,
    optimizer: optim.GradientTransformation,
    *,
    patch_size: int = 16,
    mask_prob: float = 0.6,
    mask_value: float = 0.0,
    readout: Readout = DEFAULT_READOUT,
    bn: str = "running",
    differentiate: str = "autograd",
) -> Callable[[TTTState, Tensor, Key], tuple[TTTState, dict]]:
    """Build ``mim_step(state, batch, key)``: draws block masks from ``key``, then ``mim_update``."""
    update = make_mim_update(
        model, optimizer, mask_value=mask_value, readout=readout, bn=bn, differentiate=differentiate
    )

    def mim_step(state: TTTState, batch: Tensor, key: Key) -> tuple[TTTState, dict]:
        batch_size, _, height, width = batch.shape
        mask = block_mask(
            key, batch_size, height, width, patch_size=patch_size, mask_prob=mask_prob, device=batch.device
        )
        return update(state, batch, mask)

    return mim_step


__all__ = ["make_mim_update", "make_mim_step"]
