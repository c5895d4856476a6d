"""A compact anchor-free detector in the CenterNet style (Zhou et al. 2019, "Objects as Points").

A small conv backbone with BatchNorm (stride 32), an FPN-style top-down neck (Lin et al. 2017) that ends at
stride 4, and three heads on the stride-4 features:

- ``logits`` (B, C, S/4, S/4): per-class centre heatmap logits (sigmoid, CenterNet focal loss);
- ``boxes`` (B, 4, S/4, S/4): ``(tx, ty, tw, th)`` with centre ``((j + sigmoid(tx)) / W, (i + sigmoid(ty)) / H)``
  and size ``(exp(tw) / W, exp(th) / H)`` in normalised image units (see :mod:`yolozu.models.boxes`);
- ``recon`` (B, 3, S, S) in [0, 1], only with ``forward(x, recon=True)``: a light masked-image-modelling
  decoder (MAE-style pixel prediction, He et al. 2022) that predicts each 4x4 patch from the stride-4 features,
  so MIM test-time training has a reconstruction signal through the shared backbone.

Zero-initialised low-rank branches (submodules named ``lora``) sit on a few convs for adapter-only TTT.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from yolozu.models.layers import ConvBNReLU, upsample2x

PIXEL_MEAN = 0.45
PIXEL_STD = 0.25
OUTPUT_STRIDE = 4
HEATMAP_PRIOR = 0.05
"""Initial foreground probability of the heatmap (the focal-loss bias prior, Lin et al. 2017)."""
MAX_IMAGE_SIZE = 4096
"""The largest model input side a checkpoint may ask for (a corrupt ``image_size`` such as 2**31 would overflow)."""


class CenterNetDetector(nn.Module):
    """CenterNet-style detector for images ``(B, 3, S, S)`` in [0, 1]; ``S`` must be a multiple of 32."""

    def __init__(
        self,
        *,
        image_size: int = 160,
        num_classes: int = 10,
        widths: tuple[int, ...] = (16, 32, 64, 128, 192),
        neck_channels: int = 48,
        head_channels: int = 32,
        decoder_channels: int = 48,
        lora_rank: int = 4,
    ) -> None:
        super().__init__()
        if not isinstance(image_size, int) or not 32 <= image_size <= MAX_IMAGE_SIZE:
            raise ValueError(f"image_size must be an integer from 32 to {MAX_IMAGE_SIZE} pixels, got {image_size!r}")
        if image_size % 32:
            raise ValueError(f"image_size must be a multiple of 32, got {image_size}")
        if len(widths) != 5:
            raise ValueError(f"widths needs 5 entries (stem, stage1..stage4), got {widths}")
        self.config: dict[str, Any] = {
            "image_size": image_size,
            "num_classes": num_classes,
            "widths": list(widths),
            "neck_channels": neck_channels,
            "head_channels": head_channels,
            "decoder_channels": decoder_channels,
            "lora_rank": lora_rank,
        }
        self.image_size = image_size
        self.num_classes = num_classes
        w0, w1, w2, w3, w4 = widths
        n = neck_channels

        self.stem = ConvBNReLU(3, w0, stride=2)
        self.stage1 = nn.Sequential(ConvBNReLU(w0, w1, stride=2), ConvBNReLU(w1, w1))
        self.stage2 = nn.Sequential(ConvBNReLU(w1, w2, stride=2), ConvBNReLU(w2, w2, lora_rank=lora_rank))
        self.stage3 = nn.Sequential(ConvBNReLU(w2, w3, stride=2), ConvBNReLU(w3, w3, lora_rank=lora_rank))
        self.stage4 = nn.Sequential(ConvBNReLU(w3, w4, stride=2), ConvBNReLU(w4, w4))

        self.lateral4 = ConvBNReLU(w4, n, kernel_size=1)
        self.lateral3 = ConvBNReLU(w3, n, kernel_size=1)
        self.lateral2 = ConvBNReLU(w2, n, kernel_size=1)
        self.lateral1 = ConvBNReLU(w1, n, kernel_size=1)
        self.smooth3 = ConvBNReLU(n, n)
        self.smooth2 = ConvBNReLU(n, n)
        self.smooth1 = ConvBNReLU(n, n, lora_rank=lora_rank)

        self.cls_head = nn.Sequential(
            nn.Conv2d(n, head_channels, 3, padding=1), nn.ReLU(), nn.Conv2d(head_channels, num_classes, 1)
        )
        self.box_head = nn.Sequential(
            nn.Conv2d(n, head_channels, 3, padding=1), nn.ReLU(), nn.Conv2d(head_channels, 4, 1)
        )
        patch = OUTPUT_STRIDE
        self.decoder = nn.Sequential(
            nn.Conv2d(n, decoder_channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(decoder_channels, 3 * patch * patch, 1),
        )
        self._init_heads()

    def _init_heads(self) -> None:
        nn.init.constant_(self.cls_head[-1].bias, -math.log((1 - HEATMAP_PRIOR) / HEATMAP_PRIOR))
        box_out = self.box_head[-1]
        nn.init.normal_(box_out.weight, std=0.01)
        with torch.no_grad():
            box_out.bias.copy_(torch.tensor([0.0, 0.0, math.log(8.0), math.log(8.0)]))

    def features(self, x: Tensor) -> Tensor:
        """Stride-4 neck features ``(B, neck_channels, S/4, S/4)`` of images ``x`` in [0, 1]."""
        x = (x - PIXEL_MEAN) / PIXEL_STD
        c1 = self.stage1(self.stem(x))
        c2 = self.stage2(c1)
        c3 = self.stage3(c2)
        c4 = self.stage4(c3)
        p = self.lateral4(c4)
        p = self.smooth3(upsample2x(p) + self.lateral3(c3))
        p = self.smooth2(upsample2x(p) + self.lateral2(c2))
        return self.smooth1(upsample2x(p) + self.lateral1(c1))

    def forward(self, x: Tensor, *, recon: bool = False) -> dict[str, Tensor]:
        """Heads on ``x`` (B, 3, S, S) in [0, 1]: ``logits`` and ``boxes``, plus ``recon`` when asked."""
        p = self.features(x)
        out = {"logits": self.cls_head(p), "boxes": self.box_head(p)}
        if recon:
            out["recon"] = torch.sigmoid(F.pixel_shuffle(self.decoder(p), OUTPUT_STRIDE))
        return out


def count_parameters(model: nn.Module) -> int:
    """Number of scalar parameters of ``model``."""
    return sum(p.numel() for p in model.parameters())
