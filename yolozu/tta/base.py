"""YOLOZU's TTA base names: ``TTARunner`` (the runner interface), ``TTAConfig`` and ``apply_tta_transform``.

``apply_tta_transform`` is YOLOZU's ``--tta-mode postprocess``: a seeded, per-detection horizontal mirror of
already-made predictions (``cx -> 1 - cx``; absolute boxes and keypoints with the image width; pose offsets'
x negated), each detection mirrored with probability ``flip_prob``, and a ``tta_mask`` per entry saying which
were. It changes predictions without looking at the image; the project's real flip TTA (``--tta-mode model``,
``yolozu.inference.flip``) predicts on the flipped image and merges.
"""

from __future__ import annotations

import random
from typing import Any, Iterable, NamedTuple

import attrs

from yolozu.functional.settings import is_bool, number


class TTARunner:
    """The interface of a test-time adaptation runner: ``reset``, ``adapt_step(batch) -> metrics``, ``maybe_log``."""

    def reset(self) -> None:
        """Forget the adaptation (the base runner has none)."""
        return None

    def adapt_step(self, batch: Any) -> dict[str, float]:
        """One adaptation step on ``batch``; returns its scalar metrics.

        Args:
          batch: an input batch.
        Returns:
          The step's scalar metrics.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement adapt_step(batch)")

    def maybe_log(self) -> dict[str, Any] | None:
        """Runner-specific counters, if any (None here).

        Returns:
          The counters, or None.
        """
        return None


@attrs.frozen(kw_only=True)
class TTAConfig:
    """Settings of ``apply_tta_transform`` (YOLOZU's defaults: off, flip_prob 0.5 per detection)."""

    enabled: bool = attrs.field(default=False, validator=is_bool)
    seed: int | None = attrs.field(default=None, validator=number(0, integer=True, optional=True))
    flip_prob: float = attrs.field(default=0.5, validator=number(0, 1))
    norm_only: bool = attrs.field(default=False, validator=is_bool)
    flip_keypoints: bool = attrs.field(default=True, validator=is_bool)
    flip_pose_offsets: bool = attrs.field(default=True, validator=is_bool)
    keypoint_swap_pairs: tuple[tuple[int, int], ...] | None = attrs.field(
        default=None, converter=lambda v: None if v is None else tuple((int(a), int(b)) for a, b in v)
    )


class TransformResult(NamedTuple):
    """The transformed entries (new dicts; the input is not mutated) and the warnings met."""

    entries: list[dict[str, Any]]
    warnings: list[str]


def _flip_x(x: Any, width: float | None, norm_only: bool) -> float:
    """A keypoint's mirrored x: normalised (<= 1, or ``norm_only``) -> 1 - x, else width - x."""
    x = float(x)
    if norm_only or x <= 1.0:
        return 1.0 - x
    if width is None:
        raise ValueError("absolute keypoint without image_size")
    return float(width) - x


def _flip_keypoints(det: dict, width, config: TTAConfig, warnings: list[str], where: str) -> None:
    points = det.get("keypoints")
    if not isinstance(points, list):
        return
    out = []
    for i, point in enumerate(points):
        try:
            if isinstance(point, dict) and "x" in point:
                out.append({**point, "x": _flip_x(point["x"], width, config.norm_only)})
            elif isinstance(point, (list, tuple)) and len(point) >= 2:
                out.append([_flip_x(point[0], width, config.norm_only), *point[1:]])
            else:
                raise ValueError("unsupported keypoint format")
        except (TypeError, ValueError) as e:
            warnings.append(f"{where}.keypoints[{i}]: {e}")
            out.append(point)
    for a, b in config.keypoint_swap_pairs or ():
        if 0 <= a < len(out) and 0 <= b < len(out):
            out[a], out[b] = out[b], out[a]
        else:
            warnings.append(f"{where}: keypoint swap pair ({a},{b}) is out of range for {len(out)} keypoints")
    det["keypoints"] = out


def _mirror(det: dict, width, config: TTAConfig, warnings: list[str], where: str) -> dict:
    det = dict(det)
    box = det.get("bbox")
    if isinstance(box, dict) and {"cx", "cy", "w", "h"} <= set(box):
        det["bbox"] = {**box, "cx": 1.0 - float(box["cx"])}
    else:
        warnings.append(f"{where}: missing bbox for tta")
    box_abs = det.get("bbox_abs")
    if not config.norm_only and isinstance(box_abs, dict) and "cx" in box_abs:
        if width is None:
            warnings.append(f"{where}: missing image_size for bbox_abs")
        else:
            det["bbox_abs"] = {**box_abs, "cx": float(width) - float(box_abs["cx"])}
    if config.flip_keypoints:
        _flip_keypoints(det, width, config, warnings, where)
    offsets = det.get("offsets")
    if config.flip_pose_offsets and isinstance(offsets, (list, tuple)) and offsets:
        det["offsets"] = [-float(offsets[0]), *offsets[1:]]
    return det


def _width(entry: dict) -> float | None:
    size = entry.get("image_size")
    if isinstance(size, dict):
        return size.get("width")
    if isinstance(size, (list, tuple)) and size:
        return size[0]
    return None


def apply_tta_transform(entries: Iterable[dict[str, Any]], *, config: TTAConfig) -> TransformResult:
    """Mirror each detection of ``entries`` with probability ``config.flip_prob`` (one ``random.Random(seed)``
    draw per detection, in order), recording ``tta_mask`` per entry when enabled.

    Args:
      entries: predictions ``[{"image", "detections": [{"bbox": {cx, cy, w, h}, ...}], ...}]``.
      config: the mirror's settings (``enabled``, ``seed``, ``flip_prob``, keypoint and offset options).
    Returns:
      ``TransformResult(entries, warnings)``; disabled: copies of the entries unchanged.
    """
    rng = random.Random(config.seed)
    out, warnings = [], []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            continue
        entry = dict(entry)
        dets = entry.get("detections") if isinstance(entry.get("detections"), list) else []
        width, mask, new = _width(entry), [], []
        for j, det in enumerate(d for d in dets if isinstance(d, dict)):
            flip = config.enabled and rng.random() < config.flip_prob
            mask.append(flip)
            where = f"predictions[{i}].detections[{j}]"
            new.append(_mirror(det, width, config, warnings, where) if flip else dict(det))
        entry["detections"] = new
        if config.enabled:
            entry["tta_mask"] = mask
        out.append(entry)
    return TransformResult(out, warnings)


def summarize_tta(entries: Iterable[dict[str, Any]], *, warnings: Iterable[str] = ()) -> dict[str, Any]:
    """How many detections the postprocess mirror saw and mirrored (from each entry's ``tta_mask``), and the
    warnings: ``{"detections", "applied", "applied_ratio", "warnings"}``.

    Args:
      entries: the transformed predictions.
      warnings: the transform's warnings.
    Returns:
      ``{"detections", "applied", "applied_ratio", "warnings"}``.
    """
    masks = [e["tta_mask"] for e in entries if isinstance(e, dict) and isinstance(e.get("tta_mask"), list)]
    total, applied = sum(map(len, masks)), sum(sum(map(bool, m)) for m in masks)
    return {
        "detections": total,
        "applied": applied,
        "applied_ratio": applied / total if total else 0.0,
        "warnings": list(warnings),
    }
