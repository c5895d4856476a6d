"""torchvision detectors from a checkpoint: the supported builders, their class counts, frozen norms and weights.

``build_detector(name, checkpoint)`` makes ``torchvision.models.detection.NAME(weights=None,
weights_backbone=None, num_classes=N)`` (N read from the checkpoint unless given) and loads the state dict. A
checkpoint saved from a model with ``FrozenBatchNorm2d`` (every pretrained torchvision detector: its norms carry no
``num_batches_tracked``) gets those layers back as frozen ones, with the eps torchvision gives them, so the model
computes what the saved one computed. Nothing is ever downloaded: a torchvision weights name is read from the
torch hub cache or refused. torchvision is imported here only, lazily (``import_torchvision``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlparse

import torch
from torch import Tensor, nn

from yolozu.adapters.norms import freeze_norms

FAMILIES = {
    "fasterrcnn_resnet50_fpn": "two_stage",
    "fasterrcnn_resnet50_fpn_v2": "two_stage",
    "fasterrcnn_mobilenet_v3_large_fpn": "two_stage",
    "fasterrcnn_mobilenet_v3_large_320_fpn": "two_stage",
    "retinanet_resnet50_fpn": "retinanet",
    "retinanet_resnet50_fpn_v2": "retinanet",
    "fcos_resnet50_fpn": "fcos",
    "ssd300_vgg16": "ssd",
    "ssdlite320_mobilenet_v3_large": "ssd",
}
"""The supported builders of ``torchvision.models.detection`` and the family of each (how it scores classes)."""
SUPPORTED = tuple(FAMILIES)
ZERO_EPS = ("fasterrcnn_resnet50_fpn", "retinanet_resnet50_fpn")
"""Builders whose pretrained detection weights run their frozen norms with eps 0.0 (torchvision's
``overwrite_eps``); every other frozen norm uses FrozenBatchNorm2d's default 1e-5."""


def import_torchvision() -> Any:
    """The ``torchvision`` module; missing or broken, an ImportError that says how to install it."""
    try:
        import torchvision
        import torchvision.models.detection  # noqa: F401
    except (ImportError, OSError, RuntimeError) as e:
        raise ImportError(
            f"the torchvision adapter needs torchvision built for this torch ({torch.__version__}): "
            f"pip install yolozu[torchvision] ({type(e).__name__}: {e})"
        ) from None
    return torchvision


def family_of_name(name: str) -> str:
    """The family of builder ``name``; an unsupported name is a ValueError listing the supported ones."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unsupported torchvision model {name!r}; supported: {', '.join(SUPPORTED)}") from None


def family_of_model(model: nn.Module) -> str:
    """The family of a torchvision detector instance (FasterRCNN, RetinaNet, FCOS, SSD), else a ValueError."""
    d = import_torchvision().models.detection
    if isinstance(model, d.faster_rcnn.FasterRCNN) and not isinstance(
        model, (d.mask_rcnn.MaskRCNN, d.keypoint_rcnn.KeypointRCNN)
    ):
        return "two_stage"
    for cls, family in ((d.retinanet.RetinaNet, "retinanet"), (d.fcos.FCOS, "fcos"), (d.ssd.SSD, "ssd")):
        if isinstance(model, cls):
            return family
    raise ValueError(
        f"{type(model).__name__} is not a supported torchvision detector (FasterRCNN, RetinaNet, FCOS or SSD "
        f"without mask or keypoint heads)"
    )


def declare_inline_norms(model: nn.Module) -> list[str]:
    """Name SSD300's L2-normalisation scale (``SSDFeatureExtractorVGG.scale_weight``, VGG16's only normalisation)
    as a norm parameter, so ``norm_only`` selects it (``filters.NORM_PARAMETERS``); returns the modules named."""
    from yolozu.functional.filters import NORM_PARAMETERS

    extractor = import_torchvision().models.detection.ssd.SSDFeatureExtractorVGG
    named = [name for name, module in model.named_modules() if isinstance(module, extractor)]
    for name in named:
        setattr(model.get_submodule(name), NORM_PARAMETERS, ("scale_weight",))
    return named


def _weights_file(spec: str) -> Path | None:
    """The torch hub cache file of torchvision weights named ``spec`` (e.g. ``FasterRCNN_ResNet50_FPN_Weights.
    COCO_V1``); None when ``spec`` names no weights."""
    try:
        weights = import_torchvision().models.get_weight(spec)
    except (ValueError, KeyError, AttributeError):
        return None
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)


def _state_dict_of(loaded: Any, source: str) -> dict[str, Tensor]:
    for key in ("model", "state_dict"):
        if isinstance(loaded, Mapping) and isinstance(loaded.get(key), Mapping):
            loaded = loaded[key]
    if not isinstance(loaded, Mapping) or not all(isinstance(v, Tensor) for v in loaded.values()):
        raise ValueError(f"{source}: not a state dict (save model.state_dict(), or a dict holding it under 'model')")
    return dict(loaded)


def read_checkpoint(spec: str | os.PathLike) -> dict[str, Tensor]:
    """The state dict in checkpoint file ``spec``, or in the hub cache file of torchvision weights named ``spec``;
    never downloads. Tensors only (``weights_only``)."""
    path = Path(spec)
    if not path.is_file():
        cached = _weights_file(str(spec))
        if cached is None:
            raise FileNotFoundError(
                f"checkpoint {spec}: no such file, and not a torchvision weights name "
                "(e.g. FasterRCNN_ResNet50_FPN_Weights.COCO_V1)"
            )
        if not cached.is_file():
            raise FileNotFoundError(
                f"torchvision weights {spec} are not in the torch hub cache ({cached}); yolozu never downloads "
                f"weights: fetch them where there is network (torchvision.models.get_weight('{spec}')"
                ".get_state_dict()) and put the file there, or pass a checkpoint file"
            )
        path = cached
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and weights-only errors alike
        raise ValueError(f"checkpoint {path}: cannot be read as tensors ({type(e).__name__}: {e})") from None
    return _state_dict_of(loaded, str(path))


def _last_conv_rows(state: Mapping[str, Tensor], prefix: str) -> int:
    keys = [k for k in state if k.startswith(prefix) and k.endswith("weight") and state[k].dim() == 4]
    if not keys:
        raise KeyError(prefix)
    return state[keys[-1]].shape[0]


def num_classes_in(state: Mapping[str, Tensor], family: str) -> int:
    """The class count of a ``family`` detector's state dict (background included where the family has one)."""
    try:
        if family == "two_stage":
            return state["roi_heads.box_predictor.cls_score.weight"].shape[0]
        if family == "fcos":
            return state["head.classification_head.cls_logits.weight"].shape[0]
        if family == "retinanet":
            anchors = state["head.regression_head.bbox_reg.weight"].shape[0] // 4
            return state["head.classification_head.cls_logits.weight"].shape[0] // anchors
        anchors = _last_conv_rows(state, "head.regression_head.module_list.0.") // 4
        return _last_conv_rows(state, "head.classification_head.module_list.0.") // anchors
    except KeyError as e:
        raise ValueError(f"it has no {e} (a {family} detector's head): is it saved from another model?") from None


def frozen_norm_names(model: nn.Module, state: Mapping[str, Tensor]) -> list[str]:
    """The BatchNorm2d layers of ``model`` that the checkpoint ``state`` saved from frozen norms (stats without a
    ``num_batches_tracked``)."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.BatchNorm2d)
        and f"{name}.running_mean" in state
        and f"{name}.num_batches_tracked" not in state
    ]


def build_detector(
    name: str,
    checkpoint: str | os.PathLike,
    *,
    num_classes: int | None = None,
    frozen_bn_eps: float | None = None,
    **model_kwargs: Any,
) -> nn.Module:
    """torchvision's ``NAME`` with the checkpoint's weights, in eval mode, on the CPU. ``num_classes`` (default:
    the checkpoint's) includes the background class of Faster R-CNN and SSD. Frozen norms get ``frozen_bn_eps``
    (default: what torchvision gives the model's pretrained weights, 0.0 or 1e-5). ``model_kwargs`` go to the
    builder (e.g. ``min_size``, ``box_score_thresh``)."""
    family = family_of_name(name)
    builder = getattr(import_torchvision().models.detection, name)
    state = read_checkpoint(checkpoint)
    try:
        found = num_classes_in(state, family)
    except ValueError as e:
        raise ValueError(f"checkpoint {checkpoint} does not fit {name}: {e}") from None
    if num_classes is not None and num_classes != found:
        raise ValueError(f"checkpoint {checkpoint} has {found} classes; num_classes={num_classes} does not match it")
    model = builder(weights=None, weights_backbone=None, num_classes=found, **model_kwargs)
    eps = frozen_bn_eps if frozen_bn_eps is not None else (0.0 if name in ZERO_EPS else 1e-5)
    freeze_norms(model, frozen_norm_names(model, state), eps)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"checkpoint {checkpoint} does not fit {name}: {str(e).splitlines()[0]} ...") from None
    return model.eval()
