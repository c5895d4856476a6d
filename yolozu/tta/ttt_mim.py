"""YOLOZU's MIM test-time training API: masking, reconstruction loss, update filtering and ``run_ttt_mim``.

Thin wrappers over the functional core (``yolozu.functional.masking``, ``losses``, ``filters``, ``mim``).
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import attrs
import torch
from torch import Tensor, nn

from yolozu.functional import masking, optim
from yolozu.functional.filters import include_exclude, select
from yolozu.functional.losses import masked_reconstruction_loss
from yolozu.functional.readout import DEFAULT_READOUT, Readout
from yolozu.tta.config import TTTConfig
from yolozu.tta.engine import Adaptation


@attrs.frozen
class TTTMIMResult:
    """Outcome of ``run_ttt_mim``: per-step losses, mean masked fraction, numel of the updated params."""

    losses: list[float]
    mask_ratio: float
    updated_param_count: int


def generate_block_mask(
    height: int,
    width: int,
    *,
    patch_size: int = 16,
    mask_prob: float = 0.6,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """One block mask ``(height, width)`` (bool, True = masked) drawn from ``generator`` (torch's default
    CPU generator when None).

    Args:
      height: the image height H.
      width: the image width W.
      patch_size: the cell side, in pixels.
      mask_prob: the probability that a cell is masked.
      generator: the generator drawn from.
      device: where the mask goes.
    Returns:
      A bool mask ``(H, W)``."""
    gen = generator if generator is not None else torch.default_generator
    grid = masking.block_grid(1, height, width, patch_size=patch_size, mask_prob=mask_prob, gen=gen)
    return masking.expand_grid(grid, height, width, patch_size)[0].to(device)


def apply_mask(x: Tensor, mask: Tensor, *, mask_value: float = 0.0) -> Tensor:
    """``x`` with masked pixels set to ``mask_value``; ``mask`` is ``(H, W)`` (every image) or ``(B, H, W)``
    (one per image), broadcast over channels.

    Args:
      x: images ``(B, C, H, W)``.
      mask: bool ``(H, W)`` or ``(B, H, W)``.
      mask_value: what masked pixels become.
    Returns:
      The masked images, shaped like ``x``."""
    mask = mask.to(torch.bool)
    return masking.apply_mask(x, mask.unsqueeze(-3) if mask.dim() == 3 else mask, mask_value)


def reconstruction_loss(pred: Tensor, target: Tensor, *, mask: Tensor | None = None, reduction: str = "mean") -> Tensor:
    """Squared reconstruction error over the masked pixels: ``mean`` (over masked elements), ``sum`` or
    ``none`` (the element-wise error, shaped like ``pred`` as ``F.mse_loss(reduction="none")``, zero outside
    the mask, so callers can reduce per image).

    Args:
      pred: the reconstruction ``(B, C, H, W)``.
      target: the images, shaped like ``pred``.
      mask: bool ``(H, W)`` or ``(B, H, W)``; None: every pixel.
      reduction: ``mean``, ``sum`` or ``none``.
    Returns:
      A 0-d tensor, or the element-wise error shaped like ``pred`` for ``none``."""
    if reduction == "mean":
        return masked_reconstruction_loss(pred, target, None if mask is None else mask.to(torch.bool))
    err = (pred - target).square()
    if mask is not None:
        err = err * mask.to(err.dtype)
    if reduction == "sum":
        return err.sum()
    if reduction == "none":
        return err
    raise ValueError(f"reduction must be mean, sum or none, got {reduction!r}")


def filter_parameters(
    named_params: Iterable[tuple[str, Tensor]],
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    allowed: Iterable[str] | None = None,
) -> list[Tensor]:
    """The parameters (tensors) whose name is in ``allowed`` (all when None), contains an ``include`` substring
    (any, when given) and no ``exclude`` substring, skipping those with ``requires_grad=False``.

    Args:
      named_params: ``(name, tensor)`` pairs, e.g. ``model.named_parameters()``.
      include: substrings of which a kept name contains at least one.
      exclude: substrings of which a kept name contains none.
      allowed: the names that may be kept (None: all).
    Returns:
      The kept tensors, in order."""
    pairs = [(name, p) for name, p in named_params if getattr(p, "requires_grad", True)]
    allowed_set = None if allowed is None else set(allowed)
    names = [name for name, _ in pairs if allowed_set is None or name in allowed_set]
    kept = set(include_exclude(names, include, exclude))
    return [param for name, param in pairs if name in kept]


def select_parameters(
    model: nn.Module,
    update_filter: str = "all",
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
) -> list[Tensor]:
    """The model's parameters an update filter selects (``yolozu.functional.filters``), as tensors.

    Args:
      model: the module.
      update_filter: one of ``functional.filters.FILTERS``.
      include: substrings of which a selected name contains at least one.
      exclude: substrings of which a selected name contains none.
    Returns:
      The selected parameter tensors."""
    named = dict(model.named_parameters())
    return [named[name] for name in select(model, update_filter, include=include, exclude=exclude)]


_MIM = TTTConfig(method="mim")  # the defaults run_ttt_mim's keywords take


def run_ttt_mim(
    model: nn.Module,
    x: Tensor,
    *,
    steps: int = 1,
    lr: float = _MIM.lr,
    mask_prob: float = _MIM.mim_mask_prob,
    patch_size: int = _MIM.mim_patch_size,
    mask_value: float = _MIM.mim_mask_value,
    update_filter: str = _MIM.update_filter,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    optimizer: optim.GradientTransformation | str | None = None,
    recon_fn: Callable[[nn.Module, Tensor], Tensor] | None = None,
    loss_fn: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    readout: Readout = DEFAULT_READOUT,
) -> TTTMIMResult:
    """``steps`` MIM steps on the batch ``x`` (batch index 0 of the keys): mask blocks, reconstruct, update
    the filtered params; the adapted weights are written into ``model`` at the end.

    ``optimizer``: an optimiser name (``adam``, ``sgd``) or a ``yolozu.functional.optim`` transformation
    (default Adam at ``lr``). ``recon_fn(model, masked)`` gives the reconstruction (default: the output, or the
    readout's reconstruction of it), ``loss_fn(reconstruction, image, mask)`` the loss (default: the masked mean
    squared error). The masks come from ``seed``, else from a seed drawn from ``generator``, else from torch's
    global generator.

    Args:
      model: the module adapted (it holds the adapted weights afterwards).
      x: the images ``(B, C, H, W)``.
      steps: the steps.
      lr: the learning rate.
      mask_prob: the probability that a mask cell is masked.
      patch_size: the mask cell's side, in pixels.
      mask_value: what masked pixels become.
      update_filter: the parameters adapted (``functional.filters.FILTERS``).
      include: substrings of which an adapted name contains at least one.
      exclude: substrings of which an adapted name contains none.
      optimizer: an optimiser name or transformation (None: Adam).
      recon_fn: ``recon_fn(model, masked) -> reconstruction``, or None.
      loss_fn: ``loss_fn(reconstruction, image, mask) -> 0-d loss``, or None.
      generator: draws the seed when ``seed`` is None.
      seed: the seed of the masks.
      readout: how the reconstruction is read from an output.
    Returns:
      The ``TTTMIMResult``."""
    if seed is None and generator is not None:
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    config = TTTConfig(
        enabled=True,
        method="mim",
        steps=steps,
        lr=lr,
        mim_mask_prob=mask_prob,
        mim_patch_size=patch_size,
        mim_mask_value=mask_value,
        update_filter=update_filter,
        include=include,
        exclude=exclude,
        seed=seed,
        **({"optimizer": optimizer} if isinstance(optimizer, str) else {}),
    )
    options: dict = {"forward": None if recon_fn is None else (lambda module, masked, **_: recon_fn(module, masked))}
    if isinstance(optimizer, optim.GradientTransformation):
        options["optimizer"] = optimizer
    if loss_fn is not None:
        options["loss"] = loss_fn
    if recon_fn is not None:
        readout = attrs.evolve(readout, recon=lambda output: output)
    adaptation = Adaptation(model, config, readout, **options)
    adaptation.adapt(x, 0, steps)
    adaptation.write_back()
    report = adaptation.report(seconds=0.0, steps_requested=steps, batches_used=1)
    return TTTMIMResult(
        losses=report.losses,
        mask_ratio=report.mask_ratio or 0.0,
        updated_param_count=report.updated_param_count,
    )


def ttt_mim_step(model: nn.Module, x: Tensor, **options) -> float:
    """One MIM step on ``x`` (``run_ttt_mim`` with ``steps=1``; same options); returns its loss (NaN when a guard
    stopped it).

    Args:
      model: the module adapted.
      x: the images ``(B, C, H, W)``.
      options: ``run_ttt_mim``'s keyword arguments.
    Returns:
      The step's loss."""
    result = run_ttt_mim(model, x, steps=1, **options)
    return result.losses[0] if result.losses else float("nan")
