"""A torchvision detector as test-time training runs it: class logits without targets, in any BatchNorm mode.

In train mode a torchvision detector wants targets and returns losses. ``DetectorView`` runs the model's own
pieces (transform, backbone, RPN and box head, or dense head and anchors) with every module but the BatchNorm
layers in eval mode, so BatchNorm normalises as the method asks (``bridge.make_apply``'s ``bn_mode``) while the
rest behaves as at inference. Its output holds, per family:

- ``samples``: class logits ``(B, C, k)`` at each image's k most confident candidates (proposals, anchors or
  locations), what Tent, EATA and SAR read;
- ``scores``: class logits ``(B, C, N)`` at candidates fixed by the image size alone (every anchor or location;
  for Faster R-CNN a grid of probe boxes through the box head), what CoTTA's teacher and student compare, and
  ``flip_index``, the permutation that maps them from the flipped image's frame;
- ``detections``: the model's own post-processing of the same forward (boxes in input pixels), and
  ``input_size``.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from typing import Any, Iterator

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

DEFAULT_TOPK = 8
PROBE_GRID = 4
"""Faster R-CNN's CoTTA scores: the box head's class logits on a PROBE_GRID x PROBE_GRID grid of cells."""


@contextlib.contextmanager
def heads_in_eval(model: nn.Module) -> Iterator[None]:
    """Every module of ``model`` but the BatchNorm layers in eval mode for the duration, then as it was."""
    changed = [m for m in model.modules() if m.training and not isinstance(m, _BatchNorm)]
    for module in changed:
        module.training = False
    try:
        yield
    finally:
        for module in changed:
            module.training = True


def top_candidates(logits: Tensor, rank: Tensor, k: int) -> Tensor:
    """Class logits ``(B, C, k)`` at each image's k highest ``rank`` (B, N) of ``logits`` (B, N, C); the choice
    is not differentiated, what is read there is."""
    index = rank.detach().topk(min(k, rank.shape[1]), dim=1).indices
    return torch.gather(logits, 1, index.unsqueeze(-1).expand(-1, -1, logits.shape[-1])).movedim(-1, 1)


def dense_flip_index(shapes: list[tuple[int, int]], anchors: int | list[int], device: torch.device) -> Tensor:
    """For candidates laid out level by level as (H, W, anchors), the index of each one's mirror image: anchors
    are centred boxes, so a horizontal flip maps column w to W - 1 - w and keeps the anchor.

    Args:
        shapes: each level's feature map (H, W).
        anchors: anchors per location, one count for every level or one per level (SSD300: 4, 6, 6, 6, 4, 4).
        device: where the index is made.
    Returns:
        (N,) long, N = sum of H * W * anchors over the levels.
    """
    counts = [anchors] * len(shapes) if isinstance(anchors, int) else list(anchors)
    if len(counts) != len(shapes):
        raise ValueError(f"anchors per location: {len(counts)} counts for {len(shapes)} feature levels")
    parts, offset = [], 0
    for (h, w), a in zip(shapes, counts):
        n = h * w * a
        parts.append(torch.arange(n, device=device).view(h, w, a).flip(1).flatten() + offset)
        offset += n
    return torch.cat(parts)


def anchors_per_location(detector: nn.Module, shapes: list[tuple[int, int]], total: int) -> list[int]:
    """Anchors per feature location on each level, from the detector's anchor generator (SSD300's differ by level:
    4, 6, 6, 6, 4, 4; RetinaNet's 9, FCOS's 1 and SSDlite's 6 are the same on every level); checked against the
    ``total`` candidates the head returned."""
    counts = [int(a) for a in detector.anchor_generator.num_anchors_per_location()]
    found = sum(h * w * a for (h, w), a in zip(shapes, counts))
    if len(counts) != len(shapes) or found != total:
        raise ValueError(
            f"the anchor generator's {counts} anchors per location on feature maps {shapes} give {found} "
            f"candidates, the head returned {total}"
        )
    return counts


def _prepare(detector: nn.Module, x: Tensor) -> tuple[Any, OrderedDict, list[tuple[int, int]]]:
    images = list(x.unbind(0))
    sizes = [(int(x.shape[-2]), int(x.shape[-1]))] * len(images)
    image_list, _ = detector.transform(images)
    features = detector.backbone(image_list.tensors)
    if isinstance(features, Tensor):
        features = OrderedDict([("0", features)])
    return image_list, features, sizes


def _rank(family: str, head: dict[str, Tensor]) -> Tensor:
    """Each candidate's detection score as the family's post-processing computes it, best class."""
    cls = head["cls_logits"]
    if family == "fcos":
        return torch.sqrt(cls.sigmoid() * head["bbox_ctrness"].sigmoid()).amax(-1)
    if family == "ssd":
        return cls.softmax(-1)[..., 1:].amax(-1)
    return cls.sigmoid().amax(-1)


def dense_forward(detector: nn.Module, x: Tensor, topk: int, family: str) -> dict[str, Any]:
    """RetinaNet, FCOS and SSD: the dense head's class logits at every anchor and the model's detections."""
    images, features, sizes = _prepare(detector, x)
    feats = list(features.values())
    head = detector.head(feats)
    anchors = detector.anchor_generator(images, feats)
    cls = head["cls_logits"]
    shapes = [(int(f.shape[-2]), int(f.shape[-1])) for f in feats]
    per_anchor = anchors_per_location(detector, shapes, cls.shape[1])
    with torch.no_grad():
        if family == "ssd":
            found = detector.postprocess_detections(head, anchors, images.image_sizes)
        else:
            per_level = [h * w * a for (h, w), a in zip(shapes, per_anchor)]
            split = {key: list(value.split(per_level, dim=1)) for key, value in head.items()}
            split_anchors = [list(a.split(per_level)) for a in anchors]
            found = detector.postprocess_detections(split, split_anchors, images.image_sizes)
        detections = detector.transform.postprocess(found, images.image_sizes, sizes)
    return {
        "samples": top_candidates(cls, _rank(family, head), topk),
        "scores": cls.movedim(-1, 1),
        "flip_index": dense_flip_index(shapes, per_anchor, cls.device),
        "detections": detections,
        "input_size": sizes[0],
    }


def probe_boxes(size: tuple[int, int], grid: int, like: Tensor) -> Tensor:
    """The ``grid`` x ``grid`` cells of an image of ``size`` (H, W) as boxes (x1, y1, x2, y2), row by row."""
    h, w = size
    steps = torch.arange(grid + 1, dtype=like.dtype, device=like.device) / grid
    xs, ys = steps * w, steps * h
    rows = [torch.stack([xs[:-1], ys[r].expand(grid), xs[1:], ys[r + 1].expand(grid)], dim=1) for r in range(grid)]
    return torch.cat(rows)


def _box_head(heads: nn.Module, features: OrderedDict, boxes: list[Tensor], sizes: list) -> tuple[Tensor, Tensor]:
    return heads.box_predictor(heads.box_head(heads.box_roi_pool(features, boxes, sizes)))


def two_stage_forward(detector: nn.Module, x: Tensor, topk: int) -> dict[str, Any]:
    """Faster R-CNN: the box head's class logits at the proposals and at fixed probe cells, and the detections."""
    images, features, sizes = _prepare(detector, x)
    proposals, _ = detector.rpn(images, features)
    heads = detector.roi_heads
    logits, regression = _box_head(heads, features, proposals, images.image_sizes)
    with torch.no_grad():
        boxes, scores, labels = heads.postprocess_detections(logits, regression, proposals, images.image_sizes)
        found = [{"boxes": b, "scores": s, "labels": c} for b, s, c in zip(boxes, scores, labels)]
        detections = detector.transform.postprocess(found, images.image_sizes, sizes)
    per_image = logits.split([len(p) for p in proposals])
    k = min([topk, *(len(p) for p in proposals)])
    samples = torch.cat([top_candidates(z[None], z.softmax(-1)[:, 1:].amax(-1)[None], k) for z in per_image])
    probes = [probe_boxes(size, PROBE_GRID, logits) for size in images.image_sizes]
    probe_logits, _ = _box_head(heads, features, probes, images.image_sizes)
    cells = torch.arange(PROBE_GRID * PROBE_GRID, device=logits.device).view(PROBE_GRID, PROBE_GRID)
    return {
        "samples": samples,
        "scores": probe_logits.view(len(probes), -1, probe_logits.shape[-1]).movedim(-1, 1),
        "flip_index": cells.flip(1).flatten(),
        "detections": detections,
        "input_size": sizes[0],
    }


class DetectorView(nn.Module):
    """A torchvision ``detector`` (a submodule: its tensors are this module's, under ``detector.``) whose forward
    on a batch ``(B, 3, H, W)`` in [0, 1] is the family's TTT output (the module docstring)."""

    def __init__(self, detector: nn.Module, family: str, topk: int = DEFAULT_TOPK) -> None:
        super().__init__()
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        self.detector = detector
        self.family = family
        self.topk = topk

    def forward(self, x: Tensor) -> dict[str, Any]:
        if torch._C._functorch.is_batchedtensor(x):
            raise ValueError(
                "a torchvision detector cannot adapt K vmapped streams (its post-processing has data-dependent "
                "shapes); use streams=1 (--ttt-streams 1)"
            )
        with heads_in_eval(self.detector):
            if self.family == "two_stage":
                return two_stage_forward(self.detector, x, self.topk)
            return dense_forward(self.detector, x, self.topk, self.family)
