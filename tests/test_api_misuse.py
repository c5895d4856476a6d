"""The Python API fails loud and early: wrong config types for ``TentRunner`` and ``run_ttt`` raise TypeError or
ValueError before any weight is written, ``TentRunner`` refuses a method other than Tent, and
``TentConfig(enabled=False)`` leaves the model as it is."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from yolozu.adapter import DummyAdapter
from yolozu.tta import TentConfig, TentRunner, TTTConfig, run_ttt


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(5))


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture()
def model_and_batch():
    model = _model()
    batch = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    model(batch)  # materialise the lazy layer
    return model, batch


def test_a_tentconfig_adapts(model_and_batch):
    model, batch = model_and_batch
    before = _weights(model)
    row = TentRunner(model, TentConfig(lr=1e-2, update_filter="all")).adapt_step(batch)
    assert "loss_entropy" in row
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    "config, error",
    [(TTTConfig(method="mim"), ValueError), (TTTConfig(lr=1e-2), TypeError), ({"lr": 1e-3}, TypeError),
     ("tent", TypeError)],
    ids=["another-method", "tttconfig", "dict", "str"],
)
def test_a_wrong_config_is_refused_before_any_weight_is_written(model_and_batch, config, error):
    model, batch = model_and_batch
    before = _weights(model)
    with pytest.raises(error, match="TentRunner"):
        TentRunner(model, config).adapt_step(batch)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_tent_runner_needs_a_module_and_a_tensor(model_and_batch):
    model, _ = model_and_batch
    with pytest.raises(TypeError, match="torch.nn.Module"):
        TentRunner("model")
    with pytest.raises(TypeError, match="batch tensor"):
        TentRunner(model).adapt_step([1, 2, 3])


def test_tent_config_enabled_false_leaves_the_model_as_it_is(model_and_batch):
    model, batch = model_and_batch
    before = _weights(model)
    row = TentRunner(model, TentConfig(enabled=False, lr=1e-2, update_filter="all")).adapt_step(batch)
    assert row["skipped"] and row["enabled"] is False
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("config", [{"enabled": True}, None, "safe"])
def test_run_ttt_refuses_a_config_that_is_not_a_tttconfig(config):
    with pytest.raises(TypeError, match="run_ttt's config must be a TTTConfig"):
        run_ttt(DummyAdapter(), [{"image": "a.png"}], config)


def test_run_ttt_refuses_records_that_are_not_a_sequence():
    with pytest.raises(TypeError, match="records must be a sequence"):
        run_ttt(DummyAdapter(), "a.png", TTTConfig(enabled=True))
