"""Block masks for masked-image modelling (MIM).

A mask is a Bernoulli grid of ceil(H/p) x ceil(W/p) cells, each cell masked with probability ``mask_prob``,
expanded to p x p pixel blocks and cropped to H x W; one independent grid per image of a batch (as in the
block-wise masking of SimMIM, Xie et al. 2022).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from yolozu.functional.rng import Key, generator


def block_grid(
    batch: int, height: int, width: int, *, patch_size: int, mask_prob: float, gen: torch.Generator
) -> Tensor:
    """Boolean cell grid ``(batch, ceil(H/p), ceil(W/p))`` drawn from ``gen``: True where a cell is masked.

    Args:
      batch: the number of images B.
      height: the image height H.
      width: the image width W.
      patch_size: the cell side p, in pixels.
      mask_prob: the probability that a cell is masked.
      gen: the generator drawn from (a ``rng.generator``).
    Returns:
      The bool grid ``(B, ceil(H/p), ceil(W/p))``."""
    if patch_size < 1:
        raise ValueError(f"patch_size must be >= 1, got {patch_size}")
    if not 0.0 <= mask_prob <= 1.0:
        raise ValueError(f"mask_prob must be in [0, 1], got {mask_prob}")
    cells = (batch, math.ceil(height / patch_size), math.ceil(width / patch_size))
    return torch.rand(cells, generator=gen, device=gen.device) < mask_prob


def expand_grid(grid: Tensor, height: int, width: int, patch_size: int) -> Tensor:
    """Expand a cell grid ``(..., gh, gw)`` to pixels ``(..., H, W)``: every pixel takes its cell's value.

    Args:
      grid: a cell grid ``(..., gh, gw)``.
      height: the pixel height H.
      width: the pixel width W.
      patch_size: the cell side, in pixels.
    Returns:
      The pixel grid ``(..., H, W)``, cropped where the cells overhang the image."""
    pixels = grid.repeat_interleave(patch_size, dim=-2).repeat_interleave(patch_size, dim=-1)
    return pixels[..., :height, :width]


def block_mask(
    k: Key,
    batch: int,
    height: int,
    width: int,
    *,
    patch_size: int = 16,
    mask_prob: float = 0.6,
    device: torch.device | str | None = None,
) -> Tensor:
    """Block masks for masked-image modelling (MIM): square cells of ``patch_size`` pixels, each masked with
    probability ``mask_prob``, for key ``k``.

    Drawn on the CPU and moved to ``device``, so the same key gives the same mask on every device.

    Args:
      k: the step's ``rng.Key``.
      batch: the number of images B.
      height: the image height H.
      width: the image width W.
      patch_size: the cell side, in pixels.
      mask_prob: the probability that a cell is masked.
      device: where the mask goes.
    Returns:
      A bool mask ``(B, 1, H, W)``, True where a pixel is masked."""
    grid = block_grid(batch, height, width, patch_size=patch_size, mask_prob=mask_prob, gen=generator(k))
    return expand_grid(grid, height, width, patch_size).unsqueeze(1).to(device)


def apply_mask(x: Tensor, mask: Tensor, mask_value: float = 0.0) -> Tensor:
    """``x`` with the masked pixels (all channels) replaced by ``mask_value``; a new tensor.

    Args:
      x: images ``(B, C, H, W)``.
      mask: bool ``(B, 1, H, W)`` (or broadcastable), True where masked.
      mask_value: what masked pixels become.
    Returns:
      The masked images, shaped like ``x``."""
    return x.masked_fill(mask, mask_value)


def standardise_cells(x: Tensor, patch_size: int, eps: float = 1e-6) -> Tensor:
    """``x`` with each mask cell standardised: the cell's mean over its pixels and channels subtracted and the result
    divided by ``sqrt(var + eps)`` (the unbiased variance), the per-patch normalised pixels of MAE's
    ``norm_pix_loss`` (He et al. 2022) on the cells ``block_mask`` draws (cells that overhang the image use the
    pixels inside it).

    Args:
      x: images ``(B, C, H, W)``.
      patch_size: the cell side p, in pixels.
      eps: added to each cell's variance (MAE's 1e-6).
    Returns:
      ``(B, C, H, W)``, on ``x``'s device; differentiable in ``x``."""
    h, w = x.shape[-2:]
    pad = (0, -w % patch_size, 0, -h % patch_size)

    def cell_sums(t: Tensor) -> Tensor:  # (B, 1, ceil(H/p), ceil(W/p)): sums over each cell's pixels and channels
        return F.avg_pool2d(F.pad(t, pad), patch_size).sum(dim=1, keepdim=True) * (patch_size * patch_size)

    count = cell_sums(torch.ones_like(x[:1]))
    total, squares = cell_sums(x), cell_sums(x.square())
    mean = total / count
    var = ((squares - total * mean) / (count - 1).clamp_min(1.0)).clamp_min(0.0)
    return (x - expand_grid(mean, h, w, patch_size)) / expand_grid(var + eps, h, w, patch_size).sqrt()
