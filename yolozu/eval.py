"""Deprecated path of the eval command, kept for one release: ``yolozu.cli.eval`` (the command) and
``yolozu.metrics`` (the metrics) are its homes."""

from yolozu.cli.eval import build_parser, main  # noqa: F401
from yolozu.metrics import EvaluationError, coco_dicts, evaluate, match_images  # noqa: F401
