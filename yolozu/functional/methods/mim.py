"""MIM test-time training: reconstruct the test image from a block-masked copy (masked-image modelling as a
self-supervised test-time task, as in TTT-MAE, Gandelsman, Sun, Chen & Efros, NeurIPS 2022).

    L(theta) = sum_{masked pixels} ||f_theta(x * (1 - m) + v m) - x||^2 / #masked,   m ~ block mask (SimMIM)

With ``norm_pix_loss`` the reconstruction and x are first standardised cell by cell (MAE's per-patch normalised
pixels, He et al. 2022), so the loss reads each cell's structure and not its brightness or contrast.

With ``error_quantile`` an image counts in the loss only while its raw-pixel reconstruction error is within what
the source model makes on in-distribution images: at most that quantile of the source's per-image errors on the
``reference_data`` split (``calibrate``). An image beyond it is one the decoder cannot reconstruct (saturated,
covered), and fitting it moves the shared features towards the corruption rather than the scene (as SAR and EATA
leave out samples of large entropy; here the error is the task's own measure). A step with no image kept is undone.

A model that reconstructs its own features instead (YOLOZU's structured MIM hook, ``Readout.structured_mim``)
takes the mask and a geometry input with the clean image and returns ``output["mim"]``: the loss is then the
masked squared error of its reconstructed features against its teacher features (detached), plus
``STRUCTURED_ENTROPY_WEIGHT`` times the entropy it reports (``structured_mim_method``).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import attrs
import torch
from torch import Tensor

from yolozu.functional import optim, rng
from yolozu.functional.losses import masked_reconstruction_errors, masked_reconstruction_loss
from yolozu.functional.masking import apply_mask, block_mask, standardise_cells
from yolozu.functional.readout import DEFAULT_READOUT, Readout
from yolozu.functional.rng import Key
from yolozu.functional.settings import number, optional_split, setting
from yolozu.functional.state import Params, combine
from yolozu.functional.step import Apply, LossOutput, Method, TTTState, undo_where, view_bn_mode


@attrs.frozen(kw_only=True)
class MIMSettings:
    """The block mask of MIM's reconstruction task."""

    mask_prob: float = setting(0.6, "MIM: probability that a mask cell is masked", number(0, 1), yolozu=True)
    patch_size: int = setting(16, "MIM: side of a mask cell in pixels", number(1, integer=True), yolozu=True)
    mask_value: float = setting(0.0, "MIM: value written into masked pixels", number(), yolozu=True)
    norm_pix_loss: bool = setting(
        False,
        "MIM: compare the reconstruction and the image with each mask cell standardised (MAE's per-patch "
        "normalised pixels), so a shift of a cell's brightness or contrast makes no loss",
    )
    error_quantile: float | None = setting(
        None,
        "MIM: an image counts in the loss only if its raw-pixel reconstruction error is at most the source model's "
        "at this quantile over the reference_data images (None: every image counts)",
        number(0, 1, optional=True),
    )
    reference_data: str | None = setting(
        None, "MIM: split of in-distribution data the error_quantile ceiling is measured on", optional_split, type=str
    )


class MIMState(NamedTuple):
    """MIM's own state: the per-image reconstruction error above which an image is left out of the loss (0-d;
    +inf until ``calibrate`` measures it, and without ``error_quantile``)."""

    ceiling: Tensor


CALIBRATION_SEED = 0
"""The seed of the block masks the calibration draws (its batch index folded in): the ceiling of a source model
and a reference split is one number."""


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
    (default: the masked mean squared error) over the images within the error ceiling (``MIMState``; every image
    without ``error_quantile``). ``calibrate`` measures the ceiling (``source_ceiling``); ``finish`` undoes a step
    that kept no image.

    Metrics add ``mask_ratio`` (the masked fraction of pixels) and ``kept`` (images in the loss).

    Args:
      apply: the model as a pure function (``bridge.make_apply``).
      optimizer: the optimiser of the adapted parameters.
      settings: the method's settings.
      readout: how the method's signals are read from an output.
      bn: the BatchNorm mode while adapting (``step.BN_MODES``).
      loss: ``loss(reconstruction, image, mask) -> 0-d loss``, the images ``(B, C, H, W)``, the mask
        ``(B, 1, H, W)``.
    Returns:
      The ``Method``; its randomness a block mask ``(B, 1, H, W)`` (``masking.block_mask``), its state a
      ``MIMState``.
    Raises:
      ValueError: ``error_quantile`` without ``reference_data`` to measure it on, or ``reference_data`` without
        ``error_quantile`` (a split read for nothing)."""
    if settings.error_quantile is not None and settings.reference_data is None:
        raise ValueError("mim_error_quantile (--ttt-error-quantile) is a quantile of the source model's errors on "
                         "in-distribution images: name their split with mim_reference_data (--ttt-reference-data), "
                         "e.g. the training split")
    if settings.reference_data is not None and settings.error_quantile is None:
        raise ValueError(f"mim_reference_data {settings.reference_data!r} (--ttt-reference-data) is read only to "
                         "measure the error ceiling: set mim_error_quantile (--ttt-error-quantile) too, or drop it")
    if readout.structured_mim:
        return structured_mim_method(apply, optimizer, settings, bn=bn, loss=loss)

    def prepare(state: TTTState, batch: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        # a state made without this method's init (step.init_state, as a custom loop may) has no ceiling
        ceiling = state.method_state.ceiling if isinstance(state.method_state, MIMState) else torch.inf
        return mask, torch.as_tensor(ceiling, dtype=batch.dtype, device=batch.device)

    def reconstruction_loss(params, buffers, batch, extra):
        mask, ceiling = extra
        masked = apply_mask(batch, mask, settings.mask_value)
        output, new_buffers = apply(params, buffers, masked, bn_mode=bn, **readout.recon_kwargs)
        recon, target = readout.recon(output), batch
        kept = masked_reconstruction_errors(recon.detach(), target, mask) <= ceiling
        if settings.norm_pix_loss:
            recon, target = (standardise_cells(t, settings.patch_size) for t in (recon, target))
        error = loss(recon, target, mask & kept.view(-1, 1, 1, 1))
        metrics = {"mask_ratio": mask.to(batch.dtype).mean(), "kept": kept.to(batch.dtype).sum()}
        return error, LossOutput(new_buffers, metrics, output)

    def init(trainable: Params) -> MIMState:
        return MIMState(torch.full((), float("inf"), device=next(iter(trainable.values())).device))

    def calibrate(state: TTTState, batches: Any) -> TTTState:
        if settings.error_quantile is None:
            return state
        ceiling = source_ceiling(apply, readout, settings, state, batches, bn).to(state.step.device)
        return state._replace(method_state=MIMState(ceiling))

    return Method(
        reconstruction_loss,
        optimizer,
        prepare=prepare,
        finish=undo_if_none_kept,
        draw=mask_drawer(settings),
        init=init,
        calibrate=calibrate,
        metric_names=("mask_ratio", "kept"),
        yolozu_row=lambda row: {"mim_loss": row["loss"]},
        abstains=lambda metrics: metrics["kept"] == 0,
    )


def source_ceiling(
    apply: Apply, readout: Readout, settings: MIMSettings, state: TTTState, batches: Any, bn: str
) -> Tensor:
    """MIM's error ceiling: the ``settings.error_quantile`` quantile of the source model's per-image raw-pixel
    reconstruction errors (``losses.masked_reconstruction_errors``) on in-distribution ``batches``, each batch
    masked as a step masks it (seeded by ``CALIBRATION_SEED`` and its index) and normalised as a view is
    (``step.view_bn_mode``).

    Args:
      apply: the model as a pure function.
      readout: how the reconstruction is read from an output.
      settings: the mask and the quantile.
      state: a fresh state (its ``source`` and ``frozen`` parameters and buffers are the source model).
      batches: an iterable of input batches ``(B, C, H, W)``.
      bn: the adaptation's BatchNorm mode.
    Returns:
      The ceiling, a 0-d tensor.
    Raises:
      ValueError: ``batches`` is empty."""
    params, draw, root = combine(state.frozen, state.source), mask_drawer(settings), rng.key(CALIBRATION_SEED)
    errors = []
    with torch.no_grad():
        for index, x in enumerate(batches):
            mask = draw(rng.fold_in(root, index), state.source, x)
            output, _ = apply(params, state.buffers, apply_mask(x, mask, settings.mask_value),
                              bn_mode=view_bn_mode(bn), **readout.recon_kwargs)  # fmt: skip
            errors.append(masked_reconstruction_errors(readout.recon(output), x, mask))
    if not errors:
        raise ValueError("MIM's error ceiling needs at least one batch of in-distribution data (mim_reference_data)")
    return torch.quantile(torch.cat(errors).float(), settings.error_quantile)


def undo_if_none_kept(old: TTTState, new: TTTState, metrics: dict, noise: Any) -> tuple[TTTState, dict]:
    """MIM's ``finish``: a step that kept no image (all beyond the error ceiling) leaves the weights, optimiser
    state and buffers as they were (an optimiser with momentum would otherwise still move them).

    Args:
      old: the state before the step.
      new: the state after it.
      metrics: the step's metrics (``kept``).
      noise: the step's mask (unused).
    Returns:
      The kept state and the metrics, ``update_norm`` 0 for an undone step."""
    del noise
    none = metrics["kept"] == 0
    return undo_where(none, old, new), {**metrics, "update_norm": metrics["update_norm"] * (~none)}


def mask_drawer(settings: MIMSettings) -> Callable[[Key, Params, Tensor], Tensor]:
    """MIM's ``draw``: a block mask ``(B, 1, H, W)`` for a batch ``(B, C, H, W)`` from a key
    (``masking.block_mask`` with the settings' cell side and probability).

    Args:
      settings: the mask's cell side and probability.
    Returns:
      ``draw_mask(key, source, batch) -> (B, 1, H, W)`` bool, on the batch's device."""

    def draw_mask(k: Key, source: Params, batch: Tensor) -> Tensor:
        del source
        b, _, h, w = batch.shape
        return block_mask(
            k, b, h, w, patch_size=settings.patch_size, mask_prob=settings.mask_prob, device=batch.device
        )

    return draw_mask


STRUCTURED_ENTROPY_WEIGHT = 0.1
"""The weight of the entropy a structured-MIM model reports, YOLOZU's."""


def geometry_input(x: Tensor) -> Tensor:
    """YOLOZU's geometry stand-in for a structured-MIM model: a support channel of ones and the log luminance
    relative to the image's median, ``log(max(l, 1e-6)) - log(max(median l, 1e-6))`` with l the channel mean.

    Args:
      x: images ``(B, C, H, W)``.
    Returns:
      ``(B, 2, H, W)``, on ``x``'s device."""
    luminance = x.float().mean(dim=1, keepdim=True)
    median = luminance.flatten(1).median(dim=1).values.view(-1, 1, 1, 1)
    relative = luminance.clamp_min(1e-6).log() - median.clamp_min(1e-6).log()
    return torch.cat([torch.ones_like(luminance), relative], dim=1)


def structured_mim_method(
    apply: Apply,
    optimizer: optim.GradientTransformation,
    settings: MIMSettings = MIMSettings(),
    *,
    bn: str = "running",
    loss: Callable[[Tensor, Tensor, Tensor], Tensor] = masked_reconstruction_loss,
) -> Method:
    """MIM on a model that reconstructs its own features (``Readout.structured_mim``): the clean batch, the block
    mask as ``feature_mask`` and ``geometry_input`` go into ``forward(..., return_mim=True)``; the loss is
    ``loss(recon_feat, teacher_feat.detach(), mask)`` over ``output["mim"]`` (its ``mask`` if it returns one,
    else every position) plus ``STRUCTURED_ENTROPY_WEIGHT`` x its ``entropy`` when present.

    Metrics add ``mask_ratio``, ``loss_mim`` and ``loss_entropy`` (None in a row when the model reports none).

    Args:
      apply: the model as a pure function (``bridge.make_apply``).
      optimizer: the optimiser of the adapted parameters.
      settings: the block mask's settings (``mask_value`` is unused: the model masks its features).
      bn: the BatchNorm mode while adapting (``step.BN_MODES``).
      loss: ``loss(reconstruction, target, mask) -> 0-d loss``.
    Returns:
      The ``Method``; its randomness a block mask ``(B, 1, H, W)``.
    Raises:
      ValueError: with ``norm_pix_loss`` or ``error_quantile``, which read pixels a structured-MIM model does not
        return."""
    if settings.error_quantile is not None:
        raise ValueError("mim_error_quantile measures the error of a reconstructed image, and this model "
                         "(enable_mim) reconstructs its features: leave --ttt-error-quantile off for it")
    if settings.norm_pix_loss:
        raise ValueError("mim_norm_pix_loss standardises the pixels of a reconstructed image, and this model "
                         "(enable_mim) reconstructs its features: leave --ttt-norm-pix-loss off for it")

    def structured_loss(params, buffers, batch, mask):
        output, new_buffers = apply(params, buffers, batch, bn_mode=bn, geom_input=geometry_input(batch),
                                    feature_mask=mask, return_mim=True)  # fmt: skip
        mim = _mim_entry(output)
        recon, teacher = mim["recon_feat"], mim["teacher_feat"].detach()
        kept = mim.get("mask")
        error = loss(recon, teacher, torch.ones_like(recon[:, :1], dtype=torch.bool) if kept is None else kept)
        entropy = mim.get("entropy")
        total = error if entropy is None else error + STRUCTURED_ENTROPY_WEIGHT * entropy.to(error.dtype)
        shown = torch.full_like(error, float("nan")) if entropy is None else entropy.detach().to(error.dtype)
        metrics = {"mask_ratio": (mask if kept is None else kept).to(error.dtype).mean(),
                   "loss_mim": error.detach(), "loss_entropy": shown}  # fmt: skip
        return total, LossOutput(new_buffers, metrics, output)

    return Method(
        structured_loss,
        optimizer,
        draw=mask_drawer(settings),
        metric_names=("mask_ratio", "loss_mim", "loss_entropy"),
        optional_metrics=("loss_entropy",),
        yolozu_row=lambda row: {"mim_loss": row["loss_mim"], "entropy_loss": row["loss_entropy"]},
    )


def _mim_entry(output: Any) -> dict:
    mim = output.get("mim") if isinstance(output, dict) else None
    if not isinstance(mim, dict) or mim.get("recon_feat") is None or mim.get("teacher_feat") is None:
        got = sorted(output) if isinstance(output, dict) else type(output).__name__
        raise KeyError(f"a structured-MIM model (enable_mim) must return output['mim'] with recon_feat and "
                       f"teacher_feat when called with return_mim=True; got {got}")
    return mim
