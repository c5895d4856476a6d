"""The built-in detector: a compact CenterNet-style network, its decoding, checkpoints and test-time losses."""

from yolozu.models.checkpoint import DEFAULT_CHECKPOINT, build_detector, load_detector, save_detector
from yolozu.models.decode import batched_nms, decode, nms
from yolozu.models.detector import CenterNetDetector, count_parameters
from yolozu.models.ttt_losses import TENT_LOSSES, peak_softmax_entropy, sigmoid_entropy

__all__ = [
    "CenterNetDetector",
    "DEFAULT_CHECKPOINT",
    "TENT_LOSSES",
    "batched_nms",
    "build_detector",
    "count_parameters",
    "decode",
    "load_detector",
    "nms",
    "peak_softmax_entropy",
    "save_detector",
    "sigmoid_entropy",
]
