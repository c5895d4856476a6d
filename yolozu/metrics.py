"""COCO-style detection metrics for predictions.json against a YOLO-layout dataset (pycocotools).

Normalised boxes are converted to pixels with each image's size; mAP50 is AP at IoU 0.5 and ``map`` is COCO's
AP averaged over IoU 0.50:0.95 (Lin et al. 2014). Predictions and dataset records are matched by image path.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

from yolozu.io.predictions import validate_predictions


class EvaluationError(ValueError):
    """Predictions and dataset that cannot be compared (different image sets, no ground truth)."""


def _split_key(path: str) -> str:
    p = Path(path)
    return f"{p.parent.name}/{p.name}"


def _resolved(path: str) -> str:
    return os.path.normcase(os.path.realpath(os.path.expanduser(path)))


def _listing(items: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" ... ({len(items)} in all)" if len(items) > limit else "")


def match_images(predictions: Sequence[Mapping[str, Any]], records: Sequence[Mapping[str, Any]]) -> list[int]:
    """For each record, the index of its prediction entry.

    A prediction matches a record by resolved path, else by ``<split folder>/<file name>`` when that is unique
    (predictions written on another machine or from another working directory). Unmatched entries on either
    side, or two predictions for one image, raise EvaluationError listing a few.
    """
    by_resolved: dict[str, int] = {}
    by_split: dict[str, list[int]] = {}
    for r, record in enumerate(records):
        by_resolved[_resolved(str(record["image"]))] = r
        by_split.setdefault(_split_key(str(record["image"])), []).append(r)
    owner: dict[int, int] = {}
    unknown: list[str] = []
    duplicates: list[str] = []
    for i, entry in enumerate(predictions):
        image = str(entry["image"])
        r = by_resolved.get(_resolved(image))
        if r is None:
            candidates = by_split.get(_split_key(image), [])
            r = candidates[0] if len(candidates) == 1 else None
        if r is None:
            unknown.append(image)
        elif r in owner:
            duplicates.append(image)
        else:
            owner[r] = i
    if unknown:
        raise EvaluationError(f"{len(unknown)} predicted image(s) are not in the dataset: {_listing(unknown)}")
    if duplicates:
        raise EvaluationError(f"image(s) predicted more than once: {_listing(duplicates)}")
    missing = [str(records[r]["image"]) for r in range(len(records)) if r not in owner]
    if missing:
        raise EvaluationError(f"{len(missing)} dataset image(s) have no prediction: {_listing(missing)}")
    return [owner[r] for r in range(len(records))]


def _pixel_box(box: Mapping[str, float], width: int, height: int) -> list[float]:
    w, h = float(box["w"]) * width, float(box["h"]) * height
    return [float(box["cx"]) * width - w / 2, float(box["cy"]) * height - h / 2, w, h]


def _image_size(record: Mapping[str, Any]) -> tuple[int, int]:
    if "width" in record and "height" in record:
        return int(record["width"]), int(record["height"])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(record["image"]) as im:
                width, height = im.size
    except Image.DecompressionBombError:
        raise EvaluationError(
            f"refusing image {record['image']}: over Pillow's limit of {Image.MAX_IMAGE_PIXELS} pixels (a "
            "decompression bomb?)"
        ) from None
    except (OSError, FileNotFoundError) as e:
        raise EvaluationError(f"cannot read the size of image {record['image']}: {e}") from None
    if Image.MAX_IMAGE_PIXELS is not None and width * height > Image.MAX_IMAGE_PIXELS:
        raise EvaluationError(
            f"refusing image {record['image']}: {width} x {height} pixels is over the limit of "
            f"{Image.MAX_IMAGE_PIXELS} (a decompression bomb?)"
        )
    return width, height


def coco_dicts(
    predictions: Sequence[Mapping[str, Any]], records: Sequence[Mapping[str, Any]]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Ground truth in COCO format and the matching detection results (category id = class_id + 1)."""
    order = match_images(predictions, records)
    images, annotations, results = [], [], []
    class_ids: set[int] = set()
    for image_id, (record, p) in enumerate(zip(records, order), start=1):
        width, height = _image_size(record)
        images.append({"id": image_id, "width": width, "height": height, "file_name": str(record["image"])})
        for label in record.get("labels", []):
            box = _pixel_box(label, width, height)
            class_ids.add(int(label["class_id"]))
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(label["class_id"]) + 1,
                    "bbox": box,
                    "area": box[2] * box[3],
                    "iscrowd": 0,
                }
            )
        for det in predictions[p]["detections"]:
            class_ids.add(int(det["class_id"]))
            results.append(
                {
                    "image_id": image_id,
                    "category_id": int(det["class_id"]) + 1,
                    "bbox": _pixel_box(det["bbox"], width, height),
                    "score": float(det["score"]),
                }
            )
    categories = [{"id": c + 1, "name": str(c)} for c in sorted(class_ids)]
    return {"images": images, "annotations": annotations, "categories": categories}, results


def evaluate(predictions: Sequence[Mapping[str, Any]], records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """COCO box metrics of ``predictions`` on ``records``: ``map50``, ``map`` (0.50:0.95), ``map75`` and counts."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    validate_predictions(list(predictions))
    gt, results = coco_dicts(predictions, records)
    counts = {"images": len(gt["images"]), "ground_truth": len(gt["annotations"]), "detections": len(results)}
    if not gt["annotations"]:
        raise EvaluationError(f"the dataset's {len(records)} image(s) have no labelled objects: nothing to evaluate")
    if not results:
        return {"map50": 0.0, "map": 0.0, "map75": 0.0, **counts}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(results)
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = np.maximum(evaluator.stats, 0.0)  # pycocotools uses -1 for "undefined"
    return {"map50": float(stats[1]), "map": float(stats[0]), "map75": float(stats[2]), **counts}
