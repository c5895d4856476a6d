"""Building blocks of the detector: conv-BatchNorm-ReLU units with an optional low-rank adapter branch."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class LoRABranch(nn.Module):
    """Low-rank parallel branch ``up(down(x))`` (LoRA, Hu et al. 2022) for a convolution.

    ``down`` is a 1x1 conv C_in -> r (with the main conv's stride), ``up`` a 1x1 conv r -> C_out initialised to
    zero, so the branch adds nothing until test-time training moves it.
    """

    def __init__(self, in_channels: int, out_channels: int, rank: int, stride: int = 1) -> None:
        super().__init__()
        self.down = nn.Conv2d(in_channels, rank, 1, stride=stride, bias=False)
        self.up = nn.Conv2d(rank, out_channels, 1, bias=False)
        nn.init.kaiming_uniform_(self.down.weight, a=5**0.5)
        nn.init.zeros_(self.up.weight)

    def forward(self, x: Tensor) -> Tensor:
        return self.up(self.down(x))


class ConvBNReLU(nn.Module):
    """3x3 (or kxk) conv -> BatchNorm -> ReLU; with ``lora_rank > 0`` a :class:`LoRABranch` is added before the norm."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        kernel_size: int = 3,
        stride: int = 1,
        lora_rank: int = 0,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=False
        )
        self.lora = LoRABranch(in_channels, out_channels, lora_rank, stride) if lora_rank > 0 else None
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x)
        if self.lora is not None:
            y = y + self.lora(x)
        return F.relu(self.bn(y))


def upsample2x(x: Tensor) -> Tensor:
    """Nearest-neighbour 2x upsampling (the FPN top-down path, Lin et al. 2017)."""
    return F.interpolate(x, scale_factor=2.0, mode="nearest")
