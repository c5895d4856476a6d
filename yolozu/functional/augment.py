"""Random strong augmentations of an image batch, as CoTTA's reference rule averages its teacher over.

CoTTA (Wang et al., CVPR 2022) averages the teacher's logits over N = 32 random views of the batch, each drawn
from colour jitter (brightness in [0.6, 1.4], contrast in [0.7, 1.3], saturation in [0.5, 1.5], gamma in
[0.7, 1.3]), a Gaussian blur (sigma in [0.001, 0.5], a 5-tap kernel), a horizontal flip with probability 0.5 and
additive Gaussian noise (standard deviation 0.005), on images in [0, 1], clipped back to [0, 1]. The reference
also jitters hue and applies a random affine warp; those are left out here because a detector's score maps
cannot be mapped back through a warp (a flip can: ``Readout.flipped_scores``), and hue is the one colour
transform without a cheap tensor form.

A view's parameters are drawn from a key outside any transform (``draw_views``) and applied as pure tensor
functions (``augment``), so K vmapped streams each use their own views and the same key gives the same views on
every device. The noise field is one per view, shared by the images of the batch (N fields of one image's size,
not N x B).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from yolozu.functional.rng import Key, generator

BRIGHTNESS = (0.6, 1.4)
CONTRAST = (0.7, 1.3)
SATURATION = (0.5, 1.5)
GAMMA = (0.7, 1.3)
BLUR_SIGMA = (0.001, 0.5)
FLIP_PROB = 0.5
NOISE_STD = 0.005
"""The reference rule's ranges (its CIFAR and ImageNet transforms), on images in [0, 1]."""


class Views(NamedTuple):
    """The parameters of N random views, each a tensor with a leading dim N.

    Attributes:
      brightness: ``(N,)`` multiplicative brightness factors.
      contrast: ``(N,)`` blend factors towards each image's mean grey level.
      saturation: ``(N,)`` blend factors towards each pixel's grey level.
      gamma: ``(N,)`` exponents.
      sigma: ``(N,)`` Gaussian blur standard deviations, in pixels.
      flip: ``(N,)`` bool, True where the view is flipped horizontally.
      noise: ``(N, C, H, W)`` additive noise, one field per view.
    """

    brightness: Tensor
    contrast: Tensor
    saturation: Tensor
    gamma: Tensor
    sigma: Tensor
    flip: Tensor
    noise: Tensor


def _uniform(n: int, bounds: tuple[float, float], gen: torch.Generator) -> Tensor:
    low, high = bounds
    return low + (high - low) * torch.rand(n, generator=gen, device="cpu")


def draw_views(k: Key, n: int, image_shape: tuple[int, ...], device: torch.device | str) -> Views:
    """The parameters of ``n`` random views of images shaped ``image_shape``, drawn from ``k`` on the CPU (the
    same key gives the same views on every device) and moved to ``device``.

    Args:
      k: the step's key for the views.
      n: the number of views N.
      image_shape: ``(C, H, W)`` of one image.
      device: where the parameters go (the batch's device).
    Returns:
      The ``Views``.
    """
    gen = generator(k)
    views = Views(
        brightness=_uniform(n, BRIGHTNESS, gen),
        contrast=_uniform(n, CONTRAST, gen),
        saturation=_uniform(n, SATURATION, gen),
        gamma=_uniform(n, GAMMA, gen),
        sigma=_uniform(n, BLUR_SIGMA, gen),
        flip=torch.rand(n, generator=gen, device="cpu") < FLIP_PROB,
        noise=torch.randn((n, *image_shape), generator=gen, device="cpu") * NOISE_STD,
    )
    return Views(*(t.to(device) for t in views))


def _grey(x: Tensor) -> Tensor:
    """Per-pixel grey level ``(B, 1, H, W)`` (ITU-R 601 luma for three channels, the channel mean otherwise)."""
    if x.shape[1] == 3:
        weights = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype, device=x.device)
        return (x * weights.view(1, 3, 1, 1)).sum(dim=1, keepdim=True)
    return x.mean(dim=1, keepdim=True)


def _blur(x: Tensor, sigma: Tensor) -> Tensor:
    """A separable 5-tap Gaussian blur of standard deviation ``sigma`` (0-d), reflecting at the borders."""
    taps = torch.arange(-2, 3, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-(taps**2) / (2 * sigma.to(x.dtype) ** 2))
    kernel = kernel / kernel.sum()
    c = x.shape[1]
    mode = "reflect" if min(x.shape[-2:]) > 2 else "replicate"
    x = F.conv2d(F.pad(x, (2, 2, 0, 0), mode=mode), kernel.view(1, 1, 1, 5).expand(c, 1, 1, 5), groups=c)
    return F.conv2d(F.pad(x, (0, 0, 2, 2), mode=mode), kernel.view(1, 1, 5, 1).expand(c, 1, 5, 1), groups=c)


def augment(x: Tensor, views: Views, i: int) -> Tensor:
    """View ``i`` of the batch ``x``: brightness, contrast, saturation, gamma, blur, flip, noise, clipped to [0, 1].

    Every operation is a tensor function of the view's parameters (the flip a ``torch.where``), so the view can be
    taken inside ``vmap`` and a CUDA graph.

    Args:
      x: images ``(B, C, H, W)`` in [0, 1].
      views: the drawn ``Views``.
      i: which view.
    Returns:
      The augmented images ``(B, C, H, W)``.
    """
    out = (x * views.brightness[i]).clamp(0, 1)
    mean = _grey(out).mean(dim=(1, 2, 3), keepdim=True)
    out = torch.lerp(mean, out, views.contrast[i]).clamp(0, 1)
    out = torch.lerp(_grey(out), out, views.saturation[i]).clamp(0, 1)
    out = out.clamp_min(1e-8) ** views.gamma[i]
    out = _blur(out, views.sigma[i])
    out = torch.where(views.flip[i], torch.flip(out, dims=(-1,)), out)
    return (out + views.noise[i]).clamp(0, 1)
