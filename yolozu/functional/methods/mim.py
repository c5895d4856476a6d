"""MIM test-time training: reconstruct the test image from a block-masked copy (masked-image modelling as a
self-supervised test-time task, as in TTT-MAE, Gandelsman, Sun, Chen & Efros, NeurIPS 2022).

    L(theta) = sum_{masked pixels} ||f_theta(x * (1 - m) + v m) - x||^2 / #masked,   m ~ block mask (SimMIM)
"""

from __future__ import annotations

from typing import Callable

import attrs
from torch import Tensor

from yolozu.functional import optim
from yolozu.functional.losses import masked_reconstruction_loss
from yolozu.functional.masking import apply_mask, block_mask
from yolozu.functional.readout import DEFAULT_READOUT, Readout
from yolozu.functional.rng import Key
from yolozu.functional.settings import number, setting
from yolozu.functional.state import Params
from yolozu.functional.step import Apply, LossOutput, Method


@attrs.frozen(kw_only=True)
class MIMSettings:
    """The block mask of MIM's reconstruction task."""

    mask_prob: float = setting(0.6, "MIM: probability that a mask cell is masked", number(0, 1), yolozu=True)
    patch_size: int = setting(16, "MIM: side of a mask cell in pixels", number(1, integer=True), yolozu=True)
    mask_value: float = setting(0.0, "MIM: value written into masked pixels", number(), yolozu=True)


def mim_method(
    apply: Apply,
    optimizer: optim.GradientTransformation,
    settings: MIMSettings = MIMSettings(),
    *,
    readout: Readout = DEFAULT_READOUT,
    bn: str = "running",
    loss: Callable[[Tensor, Tensor, Tensor], Tensor] = masked_reconstruction_loss,
) -> Method:
    """MIM as a ``Method``: the randomness is the block mask, the loss ``loss(reconstruction, image, mask)``
    (default: the masked mean squared error).

    Metrics add ``mask_ratio`` (the masked fraction of pixels).

    Args:
      apply: the model as a pure function (``bridge.make_apply``).
      optimizer: the optimiser of the adapted parameters.
      settings: the method's settings.
      readout: how the method's signals are read from an output.
      bn: the BatchNorm mode while adapting (``step.BN_MODES``).
      loss: ``loss(reconstruction, image, mask) -> 0-d loss``, the images ``(B, C, H, W)``, the mask
        ``(B, 1, H, W)``.
    Returns:
      The ``Method``; its randomness a block mask ``(B, 1, H, W)`` (``masking.block_mask``)."""

    def reconstruction_loss(params, buffers, batch, mask):
        masked = apply_mask(batch, mask, settings.mask_value)
        output, new_buffers = apply(params, buffers, masked, bn_mode=bn, **readout.recon_kwargs)
        error = loss(readout.recon(output), batch, mask)
        return error, LossOutput(new_buffers, {"mask_ratio": mask.to(batch.dtype).mean()}, output)

    def draw_mask(k: Key, source: Params, batch: Tensor) -> Tensor:
        del source
        b, _, h, w = batch.shape
        return block_mask(
            k, b, h, w, patch_size=settings.patch_size, mask_prob=settings.mask_prob, device=batch.device
        )

    return Method(
        reconstruction_loss,
        optimizer,
        draw=draw_mask,
        metric_names=("mask_ratio",),
        yolozu_row=lambda row: {"mim_loss": row["loss"]},
    )
