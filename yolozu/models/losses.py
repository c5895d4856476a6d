"""Supervised training losses of the detector (source training only; test-time losses live in ttt_losses)."""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from yolozu.models.targets import Targets


def centernet_focal_loss(logits: Tensor, heatmap: Tensor, *, alpha: float = 2.0, beta: float = 4.0) -> Tensor:
    """Penalty-reduced pixel-wise focal loss of CenterNet (Zhou et al. 2019, eq. 1), normalised by #objects.

    Positives are cells where the target is 1; negatives near a peak are down-weighted by ``(1 - y)^beta``.
    """
    log_p = F.logsigmoid(logits)
    log_q = F.logsigmoid(-logits)
    p = log_p.exp()
    positive = heatmap.eq(1.0).to(logits.dtype)
    pos_loss = -((1 - p) ** alpha) * log_p * positive
    neg_loss = -((1 - heatmap) ** beta) * (p**alpha) * log_q * (1 - positive)
    num_pos = positive.sum().clamp(min=1.0)
    return (pos_loss.sum() + neg_loss.sum()) / num_pos


def box_regression_loss(boxes: Tensor, targets: Targets) -> Tensor:
    """L1 loss on the centre offset (after sigmoid) and the log size, at object centre cells only."""
    mask = targets.box_mask.to(boxes.dtype)
    offset = torch.sigmoid(boxes[:, :2])
    err = (offset - targets.box[:, :2]).abs().sum(1, keepdim=True) + (boxes[:, 2:] - targets.box[:, 2:]).abs().sum(
        1, keepdim=True
    )
    return (err * mask).sum() / mask.sum().clamp(min=1.0)


def detection_loss(output: Mapping[str, Tensor], targets: Targets, *, box_weight: float = 1.0) -> dict[str, Tensor]:
    """Focal heatmap loss + ``box_weight`` x box L1; returns ``{"loss", "heatmap", "box"}``."""
    heat = centernet_focal_loss(output["logits"], targets.heatmap)
    box = box_regression_loss(output["boxes"], targets)
    return {"loss": heat + box_weight * box, "heatmap": heat, "box": box}
