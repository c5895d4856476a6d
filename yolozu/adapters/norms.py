"""Frozen BatchNorm made adaptable, and the other way round for checkpoints saved from frozen models.

Pretrained torchvision detectors replace BatchNorm with ``torchvision.ops.FrozenBatchNorm2d``: its affine and its
statistics are buffers, so an update filter over parameters (``norm_only``) selects nothing and batch statistics
never enter. ``make_adaptable`` swaps every such layer for an ``AdaptableBatchNorm2d``: affine as parameters,
statistics as buffers, and in eval mode exactly the frozen layer's arithmetic (bitwise the same outputs).
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FROZEN_NAME = "FrozenBatchNorm2d"
BATCH_EPS = 1e-5
"""The eps batch statistics use where the frozen layer's is 0.0 (torch refuses 0.0 in train mode)."""


class AdaptableBatchNorm2d(nn.BatchNorm2d):
    """A ``FrozenBatchNorm2d`` that test-time training can adapt.

    In eval mode it computes what the frozen layer computes, ``x * scale + (bias - mean * scale)`` with
    ``scale = weight * rsqrt(var + eps)``, with its own ``eps`` (torchvision uses 1e-5 or, for some pretrained
    models, 0.0); in train mode it is ``nn.BatchNorm2d``: batch statistics, running statistics updated with
    ``momentum``, and an eps of 0.0 raised to ``BATCH_EPS`` (a batch's variance can be zero).
    """

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            if self.num_batches_tracked is not None:
                self.num_batches_tracked.add_(1)
            eps = self.eps if self.eps > 0 else BATCH_EPS
            return F.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias, True, self.momentum, eps
            )
        w = self.weight.reshape(1, -1, 1, 1)
        b = self.bias.reshape(1, -1, 1, 1)
        rv = self.running_var.reshape(1, -1, 1, 1)
        rm = self.running_mean.reshape(1, -1, 1, 1)
        scale = w * (rv + self.eps).rsqrt()
        shift = b - rm * scale
        return x * scale + shift


def is_frozen_norm(module: nn.Module) -> bool:
    """True for a ``torchvision.ops.FrozenBatchNorm2d`` (or a layer of that name with its four buffers)."""
    return type(module).__name__ == FROZEN_NAME and all(
        hasattr(module, name) for name in ("weight", "bias", "running_mean", "running_var", "eps")
    )


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, new)


def adaptable_copy(frozen: nn.Module) -> AdaptableBatchNorm2d:
    """An ``AdaptableBatchNorm2d`` holding copies of a frozen layer's affine, statistics and eps."""
    n = frozen.weight.numel()
    norm = AdaptableBatchNorm2d(n, eps=frozen.eps, device=frozen.weight.device, dtype=frozen.weight.dtype)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(norm, name).copy_(getattr(frozen, name))
    norm.train(frozen.training)
    return norm


def make_adaptable(model: nn.Module) -> list[str]:
    """Replace, in place, every ``FrozenBatchNorm2d`` of ``model`` with an ``AdaptableBatchNorm2d``; returns the
    names of the layers replaced (none: the model is unchanged)."""
    names = [name for name, module in model.named_modules() if name and is_frozen_norm(module)]
    for name in names:
        _replace(model, name, adaptable_copy(model.get_submodule(name)))
    return names


def freeze_norms(model: nn.Module, names: Iterable[str], eps: float) -> None:
    """Replace, in place, the ``nn.BatchNorm2d`` layers called ``names`` with ``FrozenBatchNorm2d(eps=eps)``: the
    layers a torchvision builder makes frozen when it starts from pretrained weights."""
    from torchvision.ops import FrozenBatchNorm2d

    for name in names:
        norm = model.get_submodule(name)
        if not isinstance(norm, nn.BatchNorm2d):
            raise TypeError(f"{name} is a {type(norm).__name__}, not a BatchNorm2d")
        _replace(model, name, FrozenBatchNorm2d(norm.num_features, eps=eps).to(norm.weight.device))
