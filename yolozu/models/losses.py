"""Supervised training losses of the detector: the heatmap focal loss (``functional.losses``, which self-training at
test time shares) and the box regression."""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

from yolozu.functional.losses import centernet_focal_loss
from yolozu.models.targets import Targets


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
