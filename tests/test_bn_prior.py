"""BatchNorm's ``mix`` mode (the stored statistics as a prior of N images mixed with the batch's, Schneider et al.
2020) in the bridge, and both modes that combine the stored statistics with a batch's (``mix``, ``shrink``) in the
TTT config, the episodic schedule and the export's ``--bn-stats``."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from toy import TinyClassifier, seeded

from yolozu.bridge import BN_PRIOR, BN_SHRINK, make_apply
from yolozu.cli.export import main
from yolozu.demo.synth import SynthSpec, write_split
from yolozu.functional.state import extract
from yolozu.functional.streams import replicate, streams_update
from yolozu.tta.config import TTTConfig
from yolozu.tta.engine import build_method


def _norm_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    model[1].running_mean.uniform_(-1, 1)
    model[1].running_var.uniform_(0.5, 2.0)
    model[1].weight.data.uniform_(0.5, 1.5)
    model[1].bias.data.uniform_(-0.5, 0.5)
    return model


def _by_hand(model: nn.Module, x: torch.Tensor, prior: float) -> torch.Tensor:
    """Schneider et al.'s normalisation written out: mean and variance mixed with weights N/(N+n), n/(N+n)."""
    h = model[0](x)
    bn = model[1]
    var, mean = torch.var_mean(h, dim=(0, 2, 3), unbiased=False)
    w = prior / (prior + x.shape[0])
    mean = w * bn.running_mean + (1 - w) * mean
    var = w * bn.running_var + (1 - w) * var
    y = (h - mean[None, :, None, None]) / torch.sqrt(var[None, :, None, None] + bn.eps)
    return y * bn.weight[None, :, None, None] + bn.bias[None, :, None, None]


@settings(max_examples=20, deadline=None)
@given(prior=st.floats(0.0, 100.0), n=st.integers(1, 4))
def test_mix_is_the_weighted_mean_of_stored_and_batch_statistics(prior, n):
    model = _norm_model()
    params, buffers = extract(model)
    x = torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(n))
    out, new_buffers = make_apply(model, bn_prior=prior)(params, buffers, x, bn_mode="mix")
    with torch.no_grad():
        torch.testing.assert_close(out, _by_hand(model, x, prior), rtol=1e-4, atol=1e-5)
    assert new_buffers is buffers  # nothing updated


def test_mix_runs_from_batch_statistics_to_stored_ones():
    model = _norm_model()
    params, buffers = extract(model)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    apply = make_apply(model, bn_prior=0.0)
    mixed, batch = (apply(params, buffers, x, bn_mode=mode)[0] for mode in ("mix", "batch"))
    torch.testing.assert_close(mixed, batch)
    far = make_apply(model, bn_prior=1e12)(params, buffers, x, bn_mode="mix")[0]
    torch.testing.assert_close(far, apply(params, buffers, x, bn_mode="eval")[0], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(apply(params, buffers, x, bn_mode="batch")[0], far, atol=1e-3)


@pytest.mark.parametrize("mode, strength", [("mix", {"bn_prior": 4.0}), ("shrink", {"bn_shrink": 2.0})])
def test_episodic_streams_normalise_one_image_each_with_the_stored_statistics_and_adapt(mode, strength):
    model = seeded(TinyClassifier)
    config = TTTConfig(enabled=True, method="tent", lr=1e-2, update_filter="norm_only", bn_mode=mode, **strength)
    assert config.prediction_bn == mode
    method, names = build_method(model, config)
    state = replicate(method.init_state(model, names), 3)
    xs = torch.rand(3, 1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    new, metrics = streams_update(method)(state, xs)
    assert torch.isfinite(metrics["loss"]).all() and (metrics["update_norm"] > 0).all()
    for k in state.buffers:  # neither mode updates running statistics
        assert torch.equal(new.buffers[k], state.buffers[k])


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("bn_prior")
    write_split(root, "val", 4, seed=5, spec=SynthSpec(image_size=160))
    return root


def _export(dataset, out, *flags) -> int:
    args = ["--adapter", "detector", "--dataset", str(dataset), "--output", str(out), "--quiet", "--wrap"]
    return main([*args, *flags])


@pytest.mark.parametrize("mode, key, default", [("mix", "bn_prior", BN_PRIOR), ("shrink", "bn_shrink", BN_SHRINK)])
def test_export_prior_modes_sit_between_running_and_batch_and_are_recorded(tmp_path, dataset, mode, key, default):
    flag = "--" + key.replace("_", "-")
    scores = {}
    for name, flags in {
        "running": [],
        "batch": ["--bn-stats", "batch", "--batch-size", "1"],
        "zero": ["--bn-stats", mode, flag, "0", "--batch-size", "1"],  # no weight on the stored statistics
        "default": ["--bn-stats", mode, "--batch-size", "1"],
    }.items():
        out = tmp_path / f"{name}.json"
        assert _export(dataset, out, *flags) == 0
        doc = json.loads(out.read_text())
        scores[name] = [d["score"] for p in doc["predictions"] for d in p["detections"]]
        if name == "default":
            assert doc["meta"]["bn_stats"] == mode and doc["meta"][key] == default
            assert ({"bn_prior", "bn_shrink"} - {key}).isdisjoint(doc["meta"])  # only its own strength
    assert scores["zero"] == pytest.approx(scores["batch"], abs=1e-5)
    assert scores["default"] != scores["batch"] and scores["default"] != scores["running"]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--bn-prior", "8"], "--bn-prior applies to --bn-stats mix"),
        (["--bn-stats", "shrink", "--bn-prior", "8"], "--bn-prior applies to --bn-stats mix"),
        (["--bn-shrink", "8"], "--bn-shrink applies to --bn-stats shrink"),
        (["--bn-stats", "mix", "--bn-shrink", "8"], "--bn-shrink applies to --bn-stats shrink"),
        (["--bn-stats", "shrink", "--bn-shrink", "-1"], "--bn-shrink applies to --bn-stats shrink"),
    ],
)
def test_a_strength_without_its_mode_or_negative_is_a_usage_error(tmp_path, dataset, capsys, flags, message):
    assert _export(dataset, tmp_path / "p.json", *flags) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "p.json").exists()
