"""MIM test-time training: reconstruct the test image from a block-masked copy (masked-image modelling as a
self-supervised test-time task, as in TTT-MAE, Gandelsman et al., NeurIPS 2022)."""

from __future__ import annotations

from torch import Tensor, nn

from yolozu.functional import optim
from yolozu.functional.losses import masked_reconstruction_loss
from yolozu.functional.masking import apply_mask, block_mask
from yolozu.functional.readout import DEFAULT_READOUT, Readout
from yolozu.functional.rng import Key
from yolozu.functional.step import LossOutput, Method, TTTState, make_apply, make_step, make_update


def mim_method(
    model: nn.Module,
    optimizer: optim.GradientTransformation,
    *,
    patch_size: int = 16,
    mask_prob: float = 0.6,
    mask_value: float = 0.0,
    readout: Readout = DEFAULT_READOUT,
    bn: str = "running",
) -> Method:
    """MIM as a ``Method``: the randomness is the block mask, the loss the masked reconstruction error.

    Metrics add ``mask_ratio`` (the masked fraction of pixels).
    """
    apply = make_apply(model, bn)

    def reconstruction_loss(params, buffers, batch, mask):
        output, new_buffers = apply(params, buffers, apply_mask(batch, mask, mask_value), **readout.recon_kwargs)
        loss = masked_reconstruction_loss(readout.recon(output), batch, mask)
        return loss, LossOutput(new_buffers, {"mask_ratio": mask.to(batch.dtype).mean()}, output)

    def draw_mask(k: Key, state: TTTState, batch: Tensor) -> Tensor:
        del state
        b, _, h, w = batch.shape
        return block_mask(k, b, h, w, patch_size=patch_size, mask_prob=mask_prob, device=batch.device)

    return Method(reconstruction_loss, optimizer, draw=draw_mask)


def make_mim_update(
    model: nn.Module,
    optimizer: optim.GradientTransformation,
    *,
    mask_value: float = 0.0,
    readout: Readout = DEFAULT_READOUT,
    bn: str = "running",
    differentiate: str = "autograd",
):
    """Build ``mim_update(state, batch, mask) -> (new_state, metrics)``: one step on a given mask.

    Taking the mask as an input (not a key) is what lets ``vmap`` batch the step over K streams, each with
    its own mask.
    """
    method = mim_method(model, optimizer, mask_value=mask_value, readout=readout, bn=bn)
    return make_update(method, differentiate=differentiate)


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
):
    """Build ``mim_step(state, batch, key)``: draws block masks from ``key``, then updates on them."""
    method = mim_method(
        model, optimizer, patch_size=patch_size, mask_prob=mask_prob, mask_value=mask_value, readout=readout, bn=bn
    )
    return make_step(method, differentiate=differentiate)
