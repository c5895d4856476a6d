"""The built-in detector: a compact CenterNet-style network, its decoding and checkpoints."""

from yolozu.models.checkpoint import DEFAULT_CHECKPOINT, build_detector, load_detector, save_detector
from yolozu.models.decode import batched_nms, decode, nms
from yolozu.models.detector import CenterNetDetector, count_parameters

__all__ = [
    "CenterNetDetector",
    "DEFAULT_CHECKPOINT",
    "batched_nms",
    "build_detector",
    "count_parameters",
    "decode",
    "load_detector",
    "nms",
    "save_detector",
]
