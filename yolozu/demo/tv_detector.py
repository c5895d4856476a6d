"""FCOS-small: a second detector family for the shift benchmark, built from torchvision parts at random init.

torchvision's ``FCOS`` (anchor-free, focal loss) on a narrow ResNet-style backbone with plain, trainable
``nn.BatchNorm2d`` (so test-time training has norms to adapt) and a 64-channel FPN, sized for the demo's
160 px images: the transform does not resize them, and the locations sit at strides 8 to 64. ``adapter`` is
the plug-in factory the export loads with ``--adapter yolozu.demo.tv_detector:adapter``. torchvision is
imported lazily, so this module imports without it.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from yolozu.adapters.tv_adapter import TorchvisionAdapter
from yolozu.adapters.tv_models import import_torchvision, num_classes_in, read_checkpoint

DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[1] / "models" / "checkpoints" / "fcos_small.pt"
NAME = "fcos_small"
IMAGE_SIZE = 160
ARCHITECTURE: dict[str, Any] = {
    "stem": 24,
    "widths": [32, 64, 96, 128],
    "blocks": [1, 2, 2, 1],
    "fpn_channels": 64,
    "fpn_levels": ["layer2", "layer3", "layer4", "pool"],
    "strides": [8, 16, 32, 64],
    "anchor_sizes": [8, 16, 32, 64],
    "head_convs": 2,
}
"""The fixed architecture (recorded in the sidecar): stem width, widths and BasicBlocks per stage (each stage
halves the resolution), FPN width and levels (P3-P5 from the last three stages, P6 by max-pooling P5), one
location per cell whose size sets FCOS's centre sampling and scale ranges, and the head's convs per branch."""
ALIGN_LAYERS = ("detector.backbone.body.layer2", "detector.backbone.body.layer3", "detector.backbone.body.layer4")
"""The backbone stages (strides 8, 16, 32) whose features ``--ttt-method align`` matches."""
POSTPROCESS: dict[str, Any] = {"score_thresh": 0.05, "nms_thresh": 0.6, "detections_per_img": 50}
"""Post-processing: a low score threshold, since COCO mAP ranks detections and rewards recall."""


def _stage(tv: Any, inplanes: int, planes: int, blocks: int) -> nn.Sequential:
    """``blocks`` torchvision BasicBlocks (BatchNorm) of width ``planes``; the first halves the resolution."""
    block = tv.models.resnet.BasicBlock
    down = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride=2, bias=False), nn.BatchNorm2d(planes))
    layers = [block(inplanes, planes, stride=2, downsample=down)]
    layers += [block(planes, planes) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


def build_body(tv: Any) -> nn.Sequential:
    """The backbone: a stride-2 conv stem, then four BasicBlock stages (strides 4, 8, 16, 32)."""
    stem = ARCHITECTURE["stem"]
    parts: list[tuple[str, nn.Module]] = [
        ("stem", nn.Sequential(nn.Conv2d(3, stem, 3, 2, 1, bias=False), nn.BatchNorm2d(stem), nn.ReLU(inplace=True)))
    ]
    inplanes = stem
    for i, (width, blocks) in enumerate(zip(ARCHITECTURE["widths"], ARCHITECTURE["blocks"]), start=1):
        parts.append((f"layer{i}", _stage(tv, inplanes, width, blocks)))
        inplanes = width
    return nn.Sequential(OrderedDict(parts))


def build_fcos_small(num_classes: int, **options: Any) -> nn.Module:
    """torchvision ``FCOS`` on the small BatchNorm backbone, random init, in train mode; ``num_classes`` has no
    background class. ``options`` go to ``FCOS`` (defaults: 160 px, no resize, ``POSTPROCESS``)."""
    tv = import_torchvision()
    detection = tv.models.detection
    widths, channels = ARCHITECTURE["widths"], ARCHITECTURE["fpn_channels"]
    backbone = detection.backbone_utils.BackboneWithFPN(
        build_body(tv), {"layer2": "0", "layer3": "1", "layer4": "2"}, widths[1:], channels
    )
    sizes = tuple((s,) for s in ARCHITECTURE["anchor_sizes"])
    anchors = detection.anchor_utils.AnchorGenerator(sizes, ((1.0,),) * len(sizes))
    head = detection.fcos.FCOSHead(channels, 1, num_classes, num_convs=ARCHITECTURE["head_convs"])
    settings = {"min_size": IMAGE_SIZE, "max_size": IMAGE_SIZE, **POSTPROCESS, **options}
    return detection.fcos.FCOS(backbone, num_classes, anchor_generator=anchors, head=head, **settings)


def load_fcos_small(checkpoint: str | os.PathLike, num_classes: int | None = None) -> nn.Module:
    """FCOS-small with a checkpoint's weights (a plain state dict), in eval mode; ``num_classes`` when given must
    be the checkpoint's."""
    state = read_checkpoint(checkpoint)
    found = num_classes_in(state, "fcos")
    if num_classes is not None and num_classes != found:
        raise ValueError(f"checkpoint {checkpoint} has {found} classes; num_classes={num_classes} does not match it")
    model = build_fcos_small(found)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"checkpoint {checkpoint} is not an {NAME}: {str(e).splitlines()[0]} ...") from None
    return model.eval()


def adapter(
    checkpoint: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 8,
    image_size: int | None = None,
    *,
    num_classes: int | None = None,
    model: str | None = None,
    frozen_bn_eps: float | None = None,
) -> TorchvisionAdapter:
    """The export's plug-in factory: a ``TorchvisionAdapter`` of FCOS-small with ``checkpoint``'s weights
    (default: the committed one). ``frozen_bn_eps`` is accepted and unused (its norms are plain BatchNorm)."""
    del frozen_bn_eps
    if model not in (None, NAME):
        raise ValueError(f"this factory builds {NAME} only, not --model {model}")
    path = DEFAULT_CHECKPOINT if checkpoint is None else Path(checkpoint)
    detector = load_fcos_small(path, num_classes)
    return TorchvisionAdapter(
        detector, device=device, batch_size=batch_size, image_size=image_size, name=NAME, checkpoint=path,
        align_layers=ALIGN_LAYERS,
    )
