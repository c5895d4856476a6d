"""Paired bootstrap intervals over images for the gain of one method's mAP50 over another's on the same images.

mAP50 is not a mean over images, but its matching is per image: at IoU 0.5 each detection of an image is a true or
a false positive whatever other images are in the set (COCO's greedy matching within an image and class). So the
matches are made once (``image_matches``, with pycocotools as ``yolozu.metrics.evaluate``), and a resample of the
images is a weight per image (how often it was drawn) on its detections and its ground truth: the weighted
cumulative true and false positives give COCO's 101-point interpolated AP of that resample (``weighted_map50``),
the mean over the classes with ground truth its mAP50. The paired bootstrap draws the same images for both methods
(Efron & Tibshirani 1993; the percentile interval), which is what makes the gain's interval narrower than either
score's.
"""

from __future__ import annotations

import contextlib
import io
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import numpy as np

from yolozu.metrics import coco_dicts

RECALL_POINTS = np.linspace(0.0, 1.0, 101)
"""COCO's recall thresholds of the interpolated precision."""


class Matches(NamedTuple):
    """Every detection of a set of images at IoU 0.5 (area all, up to 100 per image), sorted by descending score
    within each class: ``image``, ``cls``, ``tp`` (0/1) as flat arrays; ``gt`` ``(images, classes)`` counts the
    ground-truth objects of each image and class."""

    image: np.ndarray
    cls: np.ndarray
    tp: np.ndarray
    gt: np.ndarray


def image_matches(predictions: Sequence[Mapping[str, Any]], records: Sequence[Mapping[str, Any]]) -> Matches:
    """The IoU-0.5 matches of ``predictions`` on ``records`` (the same images, any order), made by pycocotools."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt, results = coco_dicts(predictions, records)
    categories = [c["id"] for c in gt["categories"]]
    n_images = len(gt["images"])
    counts = np.zeros((n_images, len(categories)))
    column = {c: j for j, c in enumerate(categories)}
    for a in gt["annotations"]:
        counts[a["image_id"] - 1, column[a["category_id"]]] += 1
    if not results:
        empty = np.zeros(0)
        return Matches(empty.astype(int), empty.astype(int), empty, counts)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        evaluator = COCOeval(coco_gt, coco_gt.loadRes(results), iouType="bbox")
        evaluator.evaluate()
    images, classes, scores, tps = [], [], [], []
    areas = len(evaluator.params.areaRng)
    for k, category in enumerate(evaluator.params.catIds):
        for i in range(n_images):
            e = evaluator.evalImgs[(k * areas) * n_images + i]  # area range 0: all
            if e is None or not len(e["dtScores"]):
                continue
            n = len(e["dtScores"])
            images.append(np.full(n, i))
            classes.append(np.full(n, column[category]))
            scores.append(np.asarray(e["dtScores"]))
            tps.append((np.asarray(e["dtMatches"])[0] > 0).astype(float))
    image, cls, score, tp = (np.concatenate(x) for x in (images, classes, scores, tps))
    order = np.lexsort((-score, cls))  # stable: ties keep the image order, as COCO's accumulate
    return Matches(image[order], cls[order], tp[order], counts)


def weighted_map50(m: Matches, weights: np.ndarray) -> np.ndarray:
    """mAP50 of resamples given as image weights ``(B, images)`` (how often each image was drawn): for each class
    with ground truth, COCO's 101-point interpolated AP of the weighted detections, then the mean over classes.

    Returns:
      ``(B,)`` mAP50 of each resample (classes without ground truth in a resample are left out of its mean).
    """
    weights = np.atleast_2d(weights).astype(float)
    n_gt = weights @ m.gt  # (B, classes)
    aps = np.full(n_gt.shape, np.nan)
    for c in range(m.gt.shape[1]):
        sel = m.cls == c
        w = weights[:, m.image[sel]]  # (B, D) in descending score order
        tp = np.cumsum(w * m.tp[sel], axis=1)
        fp = np.cumsum(w * (1 - m.tp[sel]), axis=1)
        for b in range(weights.shape[0]):
            if n_gt[b, c] <= 0:
                continue
            if not tp.shape[1]:
                aps[b, c] = 0.0
                continue
            recall = tp[b] / n_gt[b, c]
            precision = tp[b] / np.maximum(tp[b] + fp[b], np.finfo(float).eps)
            envelope = np.maximum.accumulate(precision[::-1])[::-1]
            at = np.searchsorted(recall, RECALL_POINTS, side="left")
            aps[b, c] = np.where(at < len(recall), envelope[np.minimum(at, len(recall) - 1)], 0.0).mean()
    return np.nanmean(aps, axis=1)


class Interval(NamedTuple):
    """A point estimate and its percentile bootstrap interval."""

    value: float
    low: float
    high: float


def resample_weights(n: int, draws: int, rng: np.random.Generator) -> np.ndarray:
    """``(draws, n)``: how often each of ``n`` items is drawn in each of ``draws`` resamples of size ``n``."""
    picks = rng.integers(0, n, size=(draws, n))
    return np.stack([np.bincount(row, minlength=n) for row in picks]).astype(float)


def paired_interval(
    statistics: Sequence[Callable[[np.ndarray], np.ndarray]],
    sizes: Sequence[int],
    *,
    draws: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> Interval:
    """The mean over groups (e.g. corruptions) of a paired statistic and its percentile bootstrap interval.

    Args:
      statistics: per group, ``statistic(weights (B, n)) -> (B,)``: the paired difference (method minus baseline)
        computed on each resample of the group's ``n`` images (the same images for both methods).
      sizes: each group's number of images.
      draws: resamples B; ``seed``: the generator's seed; ``level``: the interval's coverage.

    Returns:
      the statistic on the full sets (weights 1), averaged over groups, and the interval of that average; every
      group is resampled independently in each draw.
    """
    rng = np.random.default_rng(seed)
    value = float(np.mean([stat(np.ones((1, n)))[0] for stat, n in zip(statistics, sizes)]))
    samples = np.mean([stat(resample_weights(n, draws, rng)) for stat, n in zip(statistics, sizes)], axis=0)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(samples, [tail, 100 - tail])
    return Interval(value, float(low), float(high))


def map50_gain(base: Matches, method: Matches) -> Callable[[np.ndarray], np.ndarray]:
    """The paired statistic of ``paired_interval``: ``method``'s mAP50 minus ``base``'s on each resample."""
    return lambda weights: weighted_map50(method, weights) - weighted_map50(base, weights)
