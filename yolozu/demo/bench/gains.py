"""Each method's gain in mAP50 over a baseline on the same images, with paired bootstrap 95% intervals over
images (``yolozu.demo.bench.bootstrap``), per corruption and for the mean over corruptions; and the per-image
matches the intervals are drawn from, saved beside a results file so they can be redrawn.

The shift benchmark records every method's IoU-0.5 matches on each corrupted split
(``bootstrap.image_matches``); the gains compare each method with BatchNorm statistics of the same batches.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from yolozu.demo.bench.bootstrap import Matches, resample_weights, weighted_map50

DRAWS = 1000
"""Bootstrap resamples of each interval."""
LEVEL = 0.95


def trimmed(m: Matches) -> Matches:
    """``m`` without each class's false positives ranked below its last true positive: they change no resample's
    AP (after a class's last true positive its precision only falls and its recall stays, so COCO's interpolated
    precision at every recall point is the same), and they are most of a detector's low-score tail."""
    keep = np.ones(len(m.tp), dtype=bool)
    for c in np.unique(m.cls):
        rows = np.flatnonzero(m.cls == c)  # in descending score order
        hits = np.flatnonzero(m.tp[rows] > 0)
        keep[rows[(hits[-1] + 1) if len(hits) else 0:]] = False
    return Matches(m.image[keep], m.cls[keep], m.tp[keep], m.gt)


def _percentiles(samples: np.ndarray) -> tuple[float, float]:
    tail = (1 - LEVEL) / 2 * 100
    low, high = np.percentile(samples, [tail, 100 - tail])
    return float(low), float(high)


def method_gains(
    matches: Mapping[str, Mapping[str, Matches]],
    baseline: str,
    methods: Sequence[str],
    *,
    draws: int = DRAWS,
    seed: int = 0,
) -> dict[str, dict]:
    """Each method's mAP50 gain over ``baseline`` with its paired bootstrap interval.

    Every method is scored on the same resamples: each split's images are drawn ``draws`` times once
    (``bootstrap.resample_weights``, one generator seeded ``seed``, splits in order, as
    ``bootstrap.paired_interval`` draws its groups), the baseline's mAP50 on them computed once, and each method's
    gain on a resample is its mAP50 there minus the baseline's (``bootstrap.map50_gain``).

    Args:
      matches: ``{split: {method: Matches}}``, every method on the same images of each split.
      baseline: the method the gains are taken over (e.g. ``bn``).
      methods: the methods to compare (those missing from a split, or ``baseline`` itself, are left out; all of
        them when the baseline did not run).
      draws: bootstrap resamples; ``seed``: the generator's seed.
    Returns:
      ``{method: {"value", "low", "high", "level", "draws", "splits": {split: {"value", "low", "high"}}}}``, in
      mAP50 (fractions, not points): the mean over splits of the gain and its percentile interval (the mean of
      the splits' gains on each draw, every split resampled independently), and each split's own.
    """
    splits = list(matches)
    chosen = [m for m in methods if m != baseline and all(m in matches[s] and baseline in matches[s] for s in splits)]
    if not chosen:  # nothing to compare, or no baseline run
        return {}
    rng = np.random.default_rng(seed)
    weights = {s: resample_weights(matches[s][baseline].gt.shape[0], draws, rng) for s in splits}
    ones = {s: np.ones((1, w.shape[1])) for s, w in weights.items()}
    base = {s: trimmed(matches[s][baseline]) for s in splits}
    base_full = {s: weighted_map50(base[s], ones[s])[0] for s in splits}
    base_draws = {s: weighted_map50(base[s], weights[s]) for s in splits}
    out = {}
    for method in chosen:
        values, samples, per_split = [], [], {}
        for s in splits:
            m = trimmed(matches[s][method])
            value = float(weighted_map50(m, ones[s])[0] - base_full[s])
            drawn = weighted_map50(m, weights[s]) - base_draws[s]
            low, high = _percentiles(drawn)
            per_split[s] = {"value": value, "low": low, "high": high}
            values.append(value)
            samples.append(drawn)
        low, high = _percentiles(np.mean(samples, axis=0))
        out[method] = {"value": float(np.mean(values)), "low": low, "high": high, "level": LEVEL, "draws": draws,
                       "splits": per_split}
    return out


def save_matches(path: Path, matches: Mapping[str, Mapping[str, Matches]]) -> Path:
    """Write ``{split: {method: Matches}}`` to a compressed ``.npz`` (keys ``split/method/field``)."""
    arrays = {f"{split}/{method}/{field}": np.asarray(value)
              for split, by_method in matches.items() for method, m in by_method.items()
              for field, value in m._asdict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        np.savez_compressed(f, **arrays)
    return path


def load_matches(path: Path) -> dict[str, dict[str, Matches]]:
    """The ``{split: {method: Matches}}`` ``save_matches`` wrote."""
    found: dict[str, dict[str, dict]] = {}
    with np.load(path) as data:
        for key in data.files:
            split, method, field = key.rsplit("/", 2)
            found.setdefault(split, {}).setdefault(method, {})[field] = data[key]
    return {split: {method: Matches(**fields) for method, fields in by_method.items()}
            for split, by_method in found.items()}
