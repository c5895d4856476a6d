"""The Python API takes what a numpy user passes and says clearly what an adapter got wrong."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from toy import TensorAdapter, TinyClassifier, seeded

from yolozu.tta import TTTConfig, run_ttt
from yolozu.tta.schedules import adapt_and_predict


def test_numpy_scalars_are_accepted_as_plain_numbers():
    config = TTTConfig(enabled=True, lr=np.float32(1e-3), steps=np.int64(2), max_update_norm=np.float64(0.5))
    assert (config.lr, config.steps, config.max_update_norm) == (pytest.approx(1e-3), 2, 0.5)
    assert (type(config.lr), type(config.steps), type(config.max_update_norm)) == (float, int, float)
    json.dumps(config.to_dict())  # what the export writes into meta.ttt


@pytest.mark.parametrize(
    "field,value,expected",
    [
        ("lr", np.float32("nan"), "a finite number > 0"),
        ("steps", np.float32(2.0), "an integer >= 1"),
        ("lr", np.bool_(True), "a finite number > 0"),
        ("steps", True, "an integer >= 1"),
    ],
)
def test_numpy_scalars_are_judged_like_python_numbers(field, value, expected):
    with pytest.raises(ValueError, match=f"TTTConfig.{field} must be {expected}"):
        TTTConfig(**{field: value})


class NoLoader(TensorAdapter):
    """An adapter that can predict with adapted weights but whose build_loader forgets to return its batches."""

    def build_loader(self, records, *, batch_size):
        del records, batch_size

    def load_batch(self, records):
        return torch.stack(list(records))

    def decode(self, output, records):
        return [{"image": str(i), "detections": []} for i, _ in enumerate(records)]


def test_a_loader_hook_returning_none_is_an_error_naming_the_adapter():
    adapter = NoLoader(seeded(TinyClassifier))
    records = [torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0))]
    expected = r"adapter NoLoader's build_loader\(records, batch_size=1\) returned NoneType, not an iterable"
    with pytest.raises(RuntimeError, match=expected):
        run_ttt(adapter, records, TTTConfig(enabled=True))
    with pytest.raises(RuntimeError, match=expected):
        adapt_and_predict(adapter, records, TTTConfig(enabled=True, schedule="online"))
