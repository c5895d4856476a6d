"""The export's two TTA modes: ``model`` (the predictor's flip branch, ``yolozu.inference.flip``) and
``postprocess`` (YOLOZU's seeded per-detection mirror of the predictions, ``yolozu.tta.base``)."""

from __future__ import annotations

import json

import attrs

from yolozu.inference.flip import FlipTTAConfig
from yolozu.tta.base import TTAConfig, apply_tta_transform, summarize_tta


def flip_meta(tta: FlipTTAConfig | TTAConfig | None) -> dict:
    """``meta.tta`` before any postprocess: the model-mode flip's settings, else ``{"enabled": False}`` (the
    postprocess mirror records its own in ``postprocess``)."""
    return tta.to_dict() if isinstance(tta, FlipTTAConfig) else {"enabled": False}


def flip(tta: FlipTTAConfig | TTAConfig | None) -> FlipTTAConfig | None:
    """The model-mode flip settings the predictor runs (None for no TTA or the postprocess mirror)."""
    return tta if isinstance(tta, FlipTTAConfig) else None


def postprocess(predictions: list, meta: dict, tta: FlipTTAConfig | TTAConfig | None) -> list:
    """``--tta-mode postprocess``: YOLOZU's seeded per-detection mirror of the predictions, its settings and
    summary in ``meta.tta``; the predictions as they are otherwise."""
    if not isinstance(tta, TTAConfig):
        return predictions
    result = apply_tta_transform(predictions, config=tta)
    settings = json.loads(json.dumps(attrs.asdict(tta)))  # tuples -> lists
    meta["tta"] = {**settings, "mode": "postprocess", **summarize_tta(result.entries, warnings=result.warnings)}
    return result.entries


TTA_ONLY = ("--tta-flip-prob", "--tta-seed", "--tta-norm-only", "--tta-keypoint-swap-pairs")
"""Flags that mean something only with ``--tta``."""


def misused_flag(args) -> str | None:
    """The usage error of a ``TTA_ONLY`` flag given without ``--tta`` (None when there is none)."""
    given = [f for f in TTA_ONLY if getattr(args, f[2:].replace("-", "_")) is not None]
    return f"{given[0]} applies to --tta only; add --tta or drop it" if given and not args.tta else None
