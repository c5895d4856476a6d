"""Test-time augmentation by horizontal flip: predict on the mirrored image, map the boxes back, merge.

Boxes are normalised ``cx, cy, w, h``, so mirroring is ``cx -> 1 - cx``. The two branches are merged per class
by weighted box fusion (Solovyev, Wang & Gabruseva 2021) or by non-maximum suppression. Each image gets the
flipped branch with probability ``flip_prob`` (1: every image), drawn from ``seed`` and the image's file name,
so the draw does not depend on batching, order, sharding or where the dataset lies.
"""

from __future__ import annotations

import hashlib
from pathlib import PurePath
from typing import Sequence

import attrs

MERGES = ("wbf", "nms")


@attrs.frozen
class FlipTTAConfig:
    """Flip TTA settings: the merge rule and its IoU threshold."""

    merge: str = attrs.field(default="wbf", validator=attrs.validators.in_(MERGES))
    iou: float = attrs.field(default=0.55)

    @iou.validator
    def _iou_in_range(self, attribute: attrs.Attribute, value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
            raise ValueError(f"FlipTTAConfig.iou must be in (0, 1] (an IoU threshold), got {value!r}")
    max_detections: int = 100
    flip_prob: float = attrs.field(default=1.0)
    seed: int = 0
    norm_only: bool = False
    """YOLOZU's: mirror only normalised boxes. Every box here is normalised, so it changes nothing."""
    keypoint_swap_pairs: tuple[tuple[int, int], ...] | None = None
    flip_keypoints: bool = True
    flip_pose_offsets: bool = True
    """YOLOZU's keypoint and pose-offset mirroring: validated and recorded; the project's detectors predict
    boxes only, so they change nothing here."""

    @flip_prob.validator
    def _prob_in_range(self, attribute: attrs.Attribute, value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise ValueError(f"FlipTTAConfig.flip_prob must be in [0, 1] (a probability), got {value!r}")

    def flips(self, image: str) -> bool:
        """Whether ``image`` gets the flipped branch: a uniform draw from (seed, file name) below ``flip_prob``."""
        digest = hashlib.sha256(f"{self.seed}:{PurePath(image).name}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64 < self.flip_prob

    def to_dict(self) -> dict:
        return {
            "enabled": True,
            "mode": "model",
            "augmentations": ["identity", "hflip"],
            "merge": self.merge,
            "iou": self.iou,
            "max_detections": self.max_detections,
            "flip_prob": self.flip_prob,
            "seed": self.seed,
            "norm_only": self.norm_only,
            "keypoint_swap_pairs": self.keypoint_swap_pairs and list(map(list, self.keypoint_swap_pairs)),
            "flip_keypoints": self.flip_keypoints,
            "flip_pose_offsets": self.flip_pose_offsets,
        }


def mirror_detections(detections: Sequence[dict]) -> list[dict]:
    """Detections of a horizontally flipped image mapped back to the original frame."""
    return [{**d, "bbox": {**d["bbox"], "cx": 1.0 - d["bbox"]["cx"]}} for d in detections]


def _corners(bbox: dict) -> tuple[float, float, float, float]:
    return (
        bbox["cx"] - bbox["w"] / 2,
        bbox["cy"] - bbox["h"] / 2,
        bbox["cx"] + bbox["w"] / 2,
        bbox["cy"] + bbox["h"] / 2,
    )


def iou(a: dict, b: dict) -> float:
    """Intersection over union of two ``{"cx","cy","w","h"}`` boxes."""
    ax0, ay0, ax1, ay1 = _corners(a)
    bx0, by0, bx1, by1 = _corners(b)
    inter = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
    union = a["w"] * a["h"] + b["w"] * b["h"] - inter
    return inter / union if union > 0 else 0.0


def _by_score(detections: list[dict]) -> list[dict]:
    return sorted(detections, key=lambda d: (-d["score"], d["class_id"], d["bbox"]["cx"], d["bbox"]["cy"]))


def _fuse(cluster: list[dict], branches: int) -> dict:
    total = sum(d["score"] for d in cluster)
    bbox = {k: sum(d["score"] * d["bbox"][k] for d in cluster) / total for k in ("cx", "cy", "w", "h")}
    score = total / len(cluster) * min(len(cluster), branches) / branches
    return {"class_id": cluster[0]["class_id"], "score": score, "bbox": bbox}


def weighted_box_fusion(branches: Sequence[Sequence[dict]], iou_threshold: float = 0.55) -> list[dict]:
    """Fuse the detections of several branches: per class, boxes overlapping a cluster's fused box by more
    than ``iou_threshold`` join it; a cluster's box is the score-weighted mean of its members and its score
    the mean member score scaled by the fraction of branches that found it."""
    clusters: list[list[dict]] = []
    fused: list[dict] = []
    for det in _by_score([d for branch in branches for d in branch]):
        match = next(
            (
                i
                for i, f in enumerate(fused)
                if f["class_id"] == det["class_id"] and iou(f["bbox"], det["bbox"]) > iou_threshold
            ),
            None,
        )
        if match is None:
            clusters.append([det])
            fused.append(det)
        else:
            clusters[match].append(det)
            fused[match] = _fuse(clusters[match], len(branches))
    return _by_score([_fuse(c, len(branches)) for c in clusters])


def nms_merge(branches: Sequence[Sequence[dict]], iou_threshold: float = 0.55) -> list[dict]:
    """Class-wise non-maximum suppression over the union of the branches' detections."""
    kept: list[dict] = []
    for det in _by_score([d for branch in branches for d in branch]):
        if all(k["class_id"] != det["class_id"] or iou(k["bbox"], det["bbox"]) <= iou_threshold for k in kept):
            kept.append(det)
    return kept


def merge_flip(identity: Sequence[dict], flipped: Sequence[dict], config: FlipTTAConfig) -> list[dict]:
    """Merge the identity branch with a flipped branch (still in the flipped frame); the best
    ``config.max_detections`` are kept."""
    branches = [list(identity), mirror_detections(flipped)]
    merge = weighted_box_fusion if config.merge == "wbf" else nms_merge
    return merge(branches, config.iou)[: config.max_detections]
