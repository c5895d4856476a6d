"""Small torchvision detectors with random weights for the tests (nothing is downloaded): one builder of each
family at a small input size, with random BatchNorm statistics and affine, saved as a checkpoint whose norms
are plain BatchNorm or frozen (as a fine-tuned pretrained model saves them)."""

from __future__ import annotations

import copy
import functools
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from yolozu.adapters.tv_models import import_torchvision

REQUIRED = "YOLOZU_REQUIRE_TORCHVISION"
"""Set to 1 (make test sets it): a missing torchvision is an error, not a skip, so CI cannot pass without it."""


def torchvision_or_skip():
    """torchvision, or a module-level skip (an error when ``YOLOZU_REQUIRE_TORCHVISION=1``)."""
    try:
        return import_torchvision()
    except ImportError as e:  # the library runs without it; these tests need it
        if os.environ.get(REQUIRED) == "1":
            raise ImportError(f"{e}; {REQUIRED}=1 requires it: run make setup (it installs the torch pair)") from e
        pytest.skip(str(e), allow_module_level=True)


TORCHVISION = torchvision_or_skip()

from yolozu.adapters.norms import freeze_norms  # noqa: E402
from yolozu.adapters.tv_adapter import TorchvisionAdapter  # noqa: E402

SMALL = {"min_size": 64, "max_size": 64}
TWO_STAGE = {"rpn_pre_nms_top_n_test": 40, "rpn_post_nms_top_n_test": 16, "box_detections_per_img": 10}
DENSE = {"detections_per_img": 10}
BUILDS = {
    "two_stage": ("fasterrcnn_mobilenet_v3_large_320_fpn", {**SMALL, **TWO_STAGE}),
    "retinanet": ("retinanet_resnet50_fpn", {**SMALL, **DENSE, "score_thresh": 0.005}),
    "fcos": ("fcos_resnet50_fpn", {**SMALL, **DENSE, "score_thresh": 0.01}),
    "ssd": ("ssdlite320_mobilenet_v3_large", {**DENSE, "topk_candidates": 50}),
    "two_stage_r50": ("fasterrcnn_resnet50_fpn_v2", {**SMALL, **TWO_STAGE}),
    "retinanet_r50": ("retinanet_resnet50_fpn", {**SMALL, **DENSE, "score_thresh": 0.005}),
    "fcos_r50": ("fcos_resnet50_fpn", {**SMALL, **DENSE, "score_thresh": 0.01}),
    "ssd300": ("ssd300_vgg16", {**DENSE, "topk_candidates": 50}),
}
"""Each zoo model's builder and its small settings (the SSDs run at their fixed sizes, 320 and 300 px)."""
FAMILIES = tuple(BUILDS)
"""The zoo: one model of each family (Faster R-CNN, RetinaNet, FCOS, SSD) on a light backbone, and the ResNet-50
builders and SSD300 (VGG-16) that users fine-tune, each through the same per-family checks."""
KIND = {name: name.split("_r50")[0].replace("ssd300", "ssd") for name in BUILDS}
"""The family of each zoo model: two_stage, retinanet, fcos or ssd."""
LIGHT = ("retinanet", "fcos")
"""Built from their torchvision class around a ResNet-18 FPN of width 64 (``retinanet_r50`` and ``fcos_r50`` are
the builders themselves): the same heads, anchors and post-processing at a fraction of the cost."""
FROZEN_EPS = {
    "two_stage": 1e-5, "retinanet": 0.0, "fcos": None, "ssd": None,
    "two_stage_r50": 1e-5, "retinanet_r50": 0.0, "fcos_r50": 1e-5, "ssd300": None,
}
"""Which models are saved with frozen norms, with the eps torchvision gives that builder's pretrained weights
(retinanet_resnet50_fpn's 0.0, FrozenBatchNorm2d's 1e-5 otherwise; None: BatchNorm; SSD300's VGG has no norm
but its L2 scale)."""
NUM_CLASSES = 6
UPDATE = {name: {"update_filter": "norm_only"} for name in BUILDS}
UPDATE["ssd300"] = {"update_filter": "all", "include": ("head.classification_head",)}
"""What a step adapts: every norm's affine, except on SSD300, whose VGG-16 has no norm (its L2 scale reaches only
the first level's anchors, rarely among the top candidates): its class head."""


def randomise_norms(model: nn.Module, seed: int) -> nn.Module:
    """Random BatchNorm statistics and affine (a fresh model's are 0/1), so every BatchNorm mode differs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                module.running_mean.copy_(0.1 * torch.randn(n, generator=gen))
                module.running_var.copy_(0.5 + torch.rand(n, generator=gen))
                module.weight.copy_(0.5 + torch.rand(n, generator=gen))
                module.bias.copy_(0.1 * torch.randn(n, generator=gen))
    return model


def frozen(model: nn.Module, eps: float) -> nn.Module:
    """``model`` with every BatchNorm2d replaced by a FrozenBatchNorm2d(eps) holding the same tensors."""
    state = model.state_dict()
    freeze_norms(model, [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)], eps)
    model.load_state_dict(state)  # FrozenBatchNorm2d drops num_batches_tracked itself
    return model


class Built(NamedTuple):
    family: str
    reference: nn.Module  # the model as saved (frozen norms where the family has them), never converted
    adapter: TorchvisionAdapter  # built from the checkpoint (or from a copy of a light model)


def light_model(family: str) -> nn.Module:
    """A RetinaNet or FCOS (torchvision's classes) on a ResNet-18 FPN of width 64, random weights."""
    detection = TORCHVISION.models.detection
    utils = detection.backbone_utils
    body = TORCHVISION.models.resnet18(weights=None)
    fpn = utils.BackboneWithFPN(
        body,
        {"layer2": "0", "layer3": "1", "layer4": "2"},
        [128, 256, 512],
        64,
        extra_blocks=TORCHVISION.ops.feature_pyramid_network.LastLevelP6P7(64, 64),
    )
    cls = detection.retinanet.RetinaNet if family == "retinanet" else detection.fcos.FCOS
    return cls(fpn, NUM_CLASSES, **BUILDS[family][1])


TEMPERED = ("ssd300_vgg16",)
"""Builders without BatchNorm, whose random class logits reach +-20 at 300 px (VGG-16 has no norm to bound
them), so the softmax at the top candidates is saturated and an entropy step has no gradient: their class
head's weights are scaled down by ``TEMPER``, to the logits of a trained model."""
TEMPER = 0.1


def build_named(name: str, kwargs: dict, eps: float | None, folder: Path) -> tuple[nn.Module, TorchvisionAdapter]:
    """torchvision's builder ``name`` with random weights, saved (frozen norms with ``eps``, or BatchNorm), and
    the adapter ``from_checkpoint`` makes of the file."""
    builder = getattr(TORCHVISION.models.detection, name)
    model = randomise_norms(builder(weights=None, weights_backbone=None, num_classes=NUM_CLASSES, **kwargs), 7)
    if name in TEMPERED:
        with torch.no_grad():
            for p in model.head.classification_head.parameters():
                p.mul_(TEMPER)
    reference = (model if eps is None else frozen(model, eps)).eval()
    path = folder / f"{name}.pt"
    torch.save(reference.state_dict(), path)
    return reference, TorchvisionAdapter.from_checkpoint(name, path, model_kwargs=kwargs, batch_size=4)


@functools.cache
def build(family: str, folder: Path) -> Built:
    """The family's small detector and its adapter (checkpoints go to ``folder``)."""
    torch.manual_seed(FAMILIES.index(family))
    eps = FROZEN_EPS[family]
    if family not in LIGHT:
        return Built(family, *build_named(*BUILDS[family], eps, folder))
    model = randomise_norms(light_model(family), 7)
    reference = (model if eps is None else frozen(model, eps)).eval()
    return Built(family, reference, TorchvisionAdapter(copy.deepcopy(reference), batch_size=4))


def zoo_folder(tmp_path_factory) -> Path:
    """One folder per test session for the checkpoints, so each family is built once (``build`` caches)."""
    folder = tmp_path_factory.getbasetemp() / "tv-zoo"
    folder.mkdir(exist_ok=True)
    return folder


def write_images(folder: Path, n: int = 2, size: int = 64, seed: int = 0) -> list[dict]:
    """``n`` images of bright squares on noise, and their records."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        image = rng.integers(0, 80, (size, size, 3), dtype=np.uint8)
        x, y = rng.integers(4, size // 2, 2)
        image[y : y + size // 3, x : x + size // 3] = rng.integers(150, 256, 3, dtype=np.uint8)
        path = folder / f"{i}.png"
        Image.fromarray(image).save(path)
        records.append({"image": str(path), "labels": []})
    return records
