"""The paired bootstrap over images: resampled mAP50 as image weights, and the interval of a paired gain."""

import numpy as np
import pytest

from yolozu.demo.bench.bootstrap import Matches, image_matches, paired_interval, weighted_map50
from yolozu.metrics import evaluate


def _records():
    """Two 100 px images, one object each (class 0)."""
    box = {"class_id": 0, "cx": 0.3, "cy": 0.3, "w": 0.2, "h": 0.2}
    return [{"image": f"i{i}.png", "width": 100, "height": 100, "labels": [box]} for i in range(2)]


def _predictions(scores_hits):
    """Per image a list of (score, hit): a hit is the object's box, a miss a box far from it."""
    out = []
    for i, dets in enumerate(scores_hits):
        detections = [{"class_id": 0, "score": s, "bbox": {"cx": 0.3 if hit else 0.8, "cy": 0.3 if hit else 0.8,
                                                         "w": 0.2, "h": 0.2}} for s, hit in dets]
        out.append({"image": f"i{i}.png", "detections": detections})
    return out


def test_full_weights_give_cocos_map50_and_the_hand_computed_ap():
    records = _records()
    predictions = _predictions([[(0.9, True), (0.8, False)], [(0.7, True)]])
    m = image_matches(predictions, records)
    # ranked: hit, miss, hit: precision 1 up to recall 0.5, then 2/3 up to recall 1 (COCO's 101 points)
    want = (51 * 1.0 + 50 * 2 / 3) / 101
    assert weighted_map50(m, np.ones((1, 2)))[0] == pytest.approx(want)
    assert weighted_map50(m, np.ones((1, 2)))[0] == pytest.approx(evaluate(predictions, records)["map50"])
    # image 0 drawn twice, image 1 never: both hits (0.9) rank above both misses (0.8): AP 1
    assert weighted_map50(m, np.array([[2.0, 0.0]]))[0] == pytest.approx(1.0)
    # image 0 once, image 1 twice: hit 0.9, miss 0.8, hit 0.7 x2 -> precision 1 to recall 1/3, then 3/4
    assert weighted_map50(m, np.array([[1.0, 2.0]]))[0] == pytest.approx((34 * 1.0 + 67 * 3 / 4) / 101)


def test_the_interval_of_a_mean_difference_matches_the_normal_approximation():
    rng = np.random.default_rng(3)
    n = 400
    a = rng.normal(0.0, 1.0, n)
    b = a + rng.normal(0.2, 0.5, n)  # paired: the difference has sd 0.5, far less than either score's
    d = b - a

    def gain(weights):
        return weights @ d / weights.sum(axis=1)

    value, low, high = paired_interval([gain], [n], draws=2000, seed=0)
    half = 1.96 * d.std() / np.sqrt(n)
    assert value == pytest.approx(d.mean())
    assert low == pytest.approx(d.mean() - half, abs=0.25 * half)
    assert high == pytest.approx(d.mean() + half, abs=0.25 * half)
    # two groups: the mean of their gains, with an interval narrower by about sqrt(2)
    value2, low2, high2 = paired_interval([gain, gain], [n, n], draws=2000, seed=0)
    assert value2 == pytest.approx(d.mean()) and (high2 - low2) == pytest.approx((high - low) / np.sqrt(2), rel=0.2)


def test_no_detections_score_zero():
    m = Matches(np.zeros(0, int), np.zeros(0, int), np.zeros(0), np.ones((3, 1)))
    assert weighted_map50(m, np.ones((1, 3)))[0] == 0.0
