"""Post-processing: dense detector outputs -> per-image detection lists (pure functions, no model state).

CenterNet decoding (Zhou et al. 2019): sigmoid heatmap, keep 3x3 local maxima, take the top-K scores over
classes and positions, read the box at each peak; then a class-wise greedy NMS as a safety net.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from yolozu.models.boxes import cxcywh_to_xyxy, decode_box_map, pairwise_iou, xyxy_to_cxcywh

Detection = dict
"""``{"class_id": int, "score": float, "bbox": {"cx", "cy", "w", "h"}}`` with coordinates in [0, 1]."""


def heatmap_peaks(scores: Tensor, kernel: int = 3) -> Tensor:
    """``scores`` (B, C, H, W) with every value that is not a ``kernel x kernel`` local maximum set to 0."""
    pooled = F.max_pool2d(scores, kernel, stride=1, padding=kernel // 2)
    return scores * (pooled == scores).to(scores.dtype)


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy non-maximum suppression over corner boxes ``(N, 4)``; indices kept, by decreasing score.

    A box is dropped when its IoU with a higher-scoring kept box exceeds ``iou_threshold``.
    """
    order = torch.argsort(scores, descending=True, stable=True)
    if order.numel() == 0:
        return order
    overlaps = (pairwise_iou(boxes[order], boxes[order]) > iou_threshold).numpy()
    suppressed = np.zeros(order.numel(), dtype=bool)
    keep: list[int] = []
    for i in range(order.numel()):
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= overlaps[i]
    return order[torch.tensor(keep, dtype=torch.long)]


def batched_nms(boxes: Tensor, scores: Tensor, classes: Tensor, iou_threshold: float) -> Tensor:
    """Class-wise NMS: boxes of different classes never suppress each other (boxes are shifted apart per class)."""
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.long)
    span = (boxes.max() - boxes.min()).abs() + 1.0
    shifted = boxes + (classes.to(boxes.dtype) * span)[:, None]
    return nms(shifted, scores, iou_threshold)


def decode(
    output: Mapping[str, Tensor],
    *,
    score_threshold: float = 0.01,
    max_detections: int = 100,
    nms_iou: float = 0.5,
) -> list[list[Detection]]:
    """Detector outputs ``{"logits": (B, C, H, W), "boxes": (B, 4, H, W)}`` -> one detection list per image.

    Detections are sorted by decreasing score; boxes are clipped to the image and given as normalised
    ``{"cx", "cy", "w", "h"}``.
    """
    # the dense part on the outputs' device; only the top-k candidates travel to the host
    logits = output["logits"].detach().float()
    box_map = decode_box_map(output["boxes"].detach().float())
    batch, num_classes, height, width = logits.shape
    peaks = heatmap_peaks(torch.sigmoid(logits)).flatten(1)
    k = min(max_detections, peaks.shape[1])
    top_scores, top_index = torch.topk(peaks, k, dim=1)
    cells = top_index % (height * width)
    flat_boxes = box_map.flatten(2).transpose(1, 2)  # (B, H*W, 4)
    top_boxes = torch.gather(flat_boxes, 1, cells[..., None].expand(-1, -1, 4))  # (B, k, 4)
    top_scores, top_index, top_boxes = (t.cpu() for t in (top_scores, top_index, top_boxes))
    classes = top_index // (height * width)
    results: list[list[Detection]] = []
    for b in range(batch):
        keep = top_scores[b] > score_threshold
        scores_b, classes_b = top_scores[b][keep], classes[b][keep]
        corners = cxcywh_to_xyxy(top_boxes[b][keep]).clamp(0.0, 1.0)
        kept = batched_nms(corners, scores_b, classes_b, nms_iou)
        boxes_b = xyxy_to_cxcywh(corners[kept]).tolist()
        results.append(
            [
                {
                    "class_id": int(c),
                    "score": float(s),
                    "bbox": {"cx": bx[0], "cy": bx[1], "w": bx[2], "h": bx[3]},
                }
                for c, s, bx in zip(classes_b[kept].tolist(), scores_b[kept].tolist(), boxes_b)
            ]
        )
    return results
