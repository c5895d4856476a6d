"""YOLOZU 4.12's ``yolozu.inference.export_predictions_cli``: the export command (``main(argv)``, the project's
``yolozu export``) and its TTA helpers, the postprocess summary and the merge of a model-mode flipped branch."""

from __future__ import annotations

from typing import Any, Iterable, Sequence

from yolozu.cli.export import main
from yolozu.inference.flip import weighted_box_fusion
from yolozu.tta.base import summarize_tta


def _summarize_tta(predictions: Iterable[dict[str, Any]], *, warnings: Iterable[str]) -> dict[str, Any]:
    """YOLOZU's name of ``yolozu.tta.base.summarize_tta``."""
    return summarize_tta(predictions, warnings=warnings)


def _merge_model_tta_branches(
    base_entries: Sequence[dict], aug_entries: Sequence[dict], *, iou_threshold: float, max_detections: int
) -> tuple[list[dict], list[str]]:
    """Merge each image's base detections with its flipped branch's (already in the image's frame) by weighted
    box fusion (``yolozu.inference.flip``), keeping the best ``max_detections`` (0: all). Returns the merged
    entries (base order) and a warning per flipped-branch image without a base entry."""
    aug = {e["image"]: e for e in aug_entries if isinstance(e, dict) and isinstance(e.get("image"), str)}
    merged, seen = [], set()
    for entry in base_entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
            continue
        seen.add(entry["image"])
        branches = [entry.get("detections") or [], (aug.get(entry["image"]) or {}).get("detections") or []]
        dets = weighted_box_fusion(branches, iou_threshold) if branches[1] else list(branches[0])
        merged.append({**entry, "detections": dets[: max_detections] if max_detections > 0 else dets})
    warnings = [f"tta model branch has no base entry for {image}" for image in aug if image not in seen]
    return merged, warnings


__all__ = ["main", "_summarize_tta", "_merge_model_tta_branches"]
