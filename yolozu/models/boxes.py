"""Box geometry: the box head's parametrisation, corner/centre conversions and IoU.

The box head predicts ``(tx, ty, tw, th)`` per stride-4 cell ``(i, j)`` of an ``H x W`` map. The box is, in
normalised image units: centre ``((j + sigmoid(tx)) / W, (i + sigmoid(ty)) / H)`` and size
``(exp(tw) / W, exp(th) / H)`` (CenterNet's offset + size heads, Zhou et al. 2019, with a log-size).
"""

from __future__ import annotations

import torch
from torch import Tensor

MAX_LOG_SIZE = 6.0
"""Clamp on ``tw``/``th`` before ``exp``, so a wild prediction cannot overflow."""


def decode_box_map(boxes: Tensor) -> Tensor:
    """Dense ``(..., 4, H, W)`` box-head output -> ``(..., 4, H, W)`` boxes ``(cx, cy, w, h)`` in [0, 1] units."""
    height, width = boxes.shape[-2:]
    cols = torch.arange(width, dtype=boxes.dtype, device=boxes.device).view(1, width)
    rows = torch.arange(height, dtype=boxes.dtype, device=boxes.device).view(height, 1)
    tx, ty, tw, th = boxes.unbind(dim=-3)
    cx = (cols + torch.sigmoid(tx)) / width
    cy = (rows + torch.sigmoid(ty)) / height
    w = torch.exp(tw.clamp(max=MAX_LOG_SIZE)) / width
    h = torch.exp(th.clamp(max=MAX_LOG_SIZE)) / height
    return torch.stack([cx, cy, w, h], dim=-3)


def cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """``(..., 4)`` centre/size boxes -> corner boxes ``(x1, y1, x2, y2)``."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


def xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """``(..., 4)`` corner boxes -> centre/size boxes ``(cx, cy, w, h)``."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], dim=-1)


def pairwise_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU matrix ``(N, M)`` between corner boxes ``a`` (N, 4) and ``b`` (M, 4); 0 where both areas are 0."""
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=-1)
    area_a = (a[:, 2:] - a[:, :2]).clamp(min=0).prod(dim=-1)
    area_b = (b[:, 2:] - b[:, :2]).clamp(min=0).prod(dim=-1)
    union = area_a[:, None] + area_b[None, :] - inter
    return inter / union.clamp(min=1e-12)
