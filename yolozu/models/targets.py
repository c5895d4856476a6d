"""Training targets: ground-truth boxes -> CenterNet heatmaps and box-head regression targets.

Each object puts an elliptical Gaussian peak (value 1 at its centre cell) on its class channel, with
standard deviations proportional to its width and height (TTFNet, Liu et al. 2020; CenterNet, Zhou et al. 2019
uses a circular one); overlapping peaks of the same class take the maximum.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import attrs
import torch
from torch import Tensor

GAUSSIAN_ALPHA = 0.54
"""sigma = alpha * size / 6 (TTFNet's choice)."""


@attrs.frozen
class Targets:
    """Dense targets for a batch.

    Attributes:
      heatmap: (B, C, H, W) Gaussian peaks in [0, 1].
      box: (B, 4, H, W) targets ``(fx, fy, log w, log h)``: the centre's offset inside its cell and the log size
        in cells, set at centre cells only.
      box_mask: (B, 1, H, W) bool, True at object centre cells.
    """

    heatmap: Tensor
    box: Tensor
    box_mask: Tensor


def _gaussian(height: int, width: int, cx: int, cy: int, sigma_x: float, sigma_y: float) -> Tensor:
    xs = torch.arange(width, dtype=torch.float32).view(1, width) - cx
    ys = torch.arange(height, dtype=torch.float32).view(height, 1) - cy
    return torch.exp(-(xs.square() / (2 * sigma_x**2) + ys.square() / (2 * sigma_y**2)))


def build_targets(
    labels: Sequence[Sequence[Mapping[str, float]]], *, num_classes: int, height: int, width: int
) -> Targets:
    """Targets for one label list per image (labels ``{"class_id", "cx", "cy", "w", "h"}``, normalised)."""
    batch = len(labels)
    heatmap = torch.zeros(batch, num_classes, height, width)
    box = torch.zeros(batch, 4, height, width)
    box_mask = torch.zeros(batch, 1, height, width, dtype=torch.bool)
    for b, objects in enumerate(labels):
        for obj in objects:
            x, y = float(obj["cx"]) * width, float(obj["cy"]) * height
            w, h = float(obj["w"]) * width, float(obj["h"]) * height
            if w <= 0 or h <= 0:
                continue
            j, i = min(int(x), width - 1), min(int(y), height - 1)
            peak = _gaussian(height, width, j, i, max(GAUSSIAN_ALPHA * w / 6, 0.3), max(GAUSSIAN_ALPHA * h / 6, 0.3))
            cls = int(obj["class_id"])
            heatmap[b, cls] = torch.maximum(heatmap[b, cls], peak)
            box[b, :, i, j] = torch.tensor([x - j, y - i, math.log(w), math.log(h)])
            box_mask[b, 0, i, j] = True
    return Targets(heatmap=heatmap, box=box, box_mask=box_mask)
