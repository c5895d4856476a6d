"""tools/tune_continual.py's stream rule: the segments a candidate loses outside their interval, and the pick."""

from __future__ import annotations

import numpy as np
import pytest
from tool_modules import load_tool

from yolozu.demo.bench.bootstrap import Matches

IMAGES = 40


@pytest.fixture(scope="module")
def tool():
    return load_tool("tune_continual")


def one_box_per_image(hits: np.ndarray) -> Matches:
    """One class, one object and one detection per image; ``hits[i]`` says whether image i's detection matches."""
    image = np.arange(IMAGES)
    return Matches(image, np.zeros(IMAGES, int), hits.astype(float), np.ones((IMAGES, 1)))


def test_below_bn_lists_only_the_segments_lost_outside_their_interval(tool):
    every = np.ones(IMAGES, bool)
    half = np.arange(IMAGES) % 2 == 0
    bn = {"0": one_box_per_image(every), "1": one_box_per_image(every), "2": one_box_per_image(half)}
    # level on segment 0 (a zero-width interval is not below), far below on 1, above on 2
    candidate = {"0": one_box_per_image(every), "1": one_box_per_image(half), "2": one_box_per_image(every)}
    assert tool.below_bn(bn, candidate) == [1]
    assert tool.below_bn(bn, bn) == []


def row(method: str, over_bn: float, *per: tuple[float, list[int]]) -> dict:
    """A scored candidate: its mean gain and, per dataset, its lowest segment's gain and the segments below BN."""
    datasets = {f"d{i}": {"lowest_over_bn": low, "below_bn": below} for i, (low, below) in enumerate(per)}
    return {"ttt": {"method": method}, "over_bn": over_bn, "datasets": datasets}


def test_the_rule_picks_the_best_mean_of_the_candidates_never_below_bn(tool):
    best_but_deep = row("mim", 0.9, (-0.31, []), (0.0, []))  # one segment past the shortfall on one seed
    best_but_outside = row("mim", 0.8, (-0.1, []), (-0.05, [3]))  # within the shortfall, outside the interval
    kept = row("mim", 0.2, (-0.3, []), (-0.1, []))  # the shortfall itself is allowed
    worse = row("mim", 0.1, (0.0, []), (0.0, []))
    never = row("sar", 0.5, (-0.1, [2]), (0.0, []))
    picks = tool.rule_picks([best_but_deep, best_but_outside, worse, kept, never])
    assert picks["mim"] is kept and picks["sar"] is None
    assert list(picks) == ["mim", "sar"]
