"""BatchNorm's ``shrink`` mode: the batch's statistics soft-thresholded towards the stored ones at k standard
errors (Gong et al. 2022's instance-aware BatchNorm), in the pure core and the bridge (the episodic schedule and
the export's ``--bn-stats shrink``: tests/test_bn_prior.py, with ``mix``)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_bn_prior import _norm_model

from yolozu.bridge import make_apply
from yolozu.functional.norm_stats import shrunk_stats, soft_threshold
from yolozu.functional.state import extract

floats = st.floats(-10.0, 10.0, allow_nan=False)


@settings(max_examples=50, deadline=None)
@given(x=floats, threshold=st.floats(0.0, 10.0))
def test_soft_threshold_zeroes_within_and_shrinks_beyond(x, threshold):
    out = soft_threshold(torch.tensor([x], dtype=torch.float64), torch.tensor([threshold], dtype=torch.float64))
    if abs(x) <= threshold:
        assert out.item() == 0.0
    else:
        assert out.item() == pytest.approx(x - threshold if x > 0 else x + threshold)


@settings(max_examples=30, deadline=None)
@given(k=st.floats(0.0, 20.0), count=st.integers(2, 5000), seed=st.integers(0, 1000))
def test_shrunk_stats_keep_the_source_within_k_standard_errors_and_move_by_the_excess(k, count, seed):
    g = torch.Generator().manual_seed(seed)
    source_mean, source_var = torch.randn(6, generator=g, dtype=torch.float64), torch.rand(6, generator=g) + 0.5
    source_var = source_var.double()
    mean = source_mean + torch.randn(6, generator=g, dtype=torch.float64)
    var = source_var * (torch.rand(6, generator=g, dtype=torch.float64) * 3)
    got_mean, got_var = shrunk_stats(mean, var, source_mean, source_var, count=count, size=count, k=k)
    mean_t = k * torch.sqrt(source_var / count)
    var_t = k * source_var * (2.0 / (count - 1)) ** 0.5
    for got, batch, source, t in ((got_mean, mean, source_mean, mean_t), (got_var, var, source_var, var_t)):
        inside = (batch - source).abs() <= t
        assert torch.equal(got[inside], source[inside])
        excess = (batch - source).abs() - t
        torch.testing.assert_close((got - source).abs()[~inside], excess[~inside])
        assert torch.all(torch.sign(got - source)[~inside] == torch.sign(batch - source)[~inside])


def test_shrink_runs_from_batch_statistics_to_stored_ones():
    model = _norm_model()
    params, buffers = extract(model)
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    batch = make_apply(model)(params, buffers, x, bn_mode="batch")[0]
    stored = make_apply(model)(params, buffers, x, bn_mode="eval")[0]
    torch.testing.assert_close(make_apply(model, bn_shrink=0.0)(params, buffers, x, bn_mode="shrink")[0], batch)
    far, new_buffers = make_apply(model, bn_shrink=1e9)(params, buffers, x, bn_mode="shrink")
    torch.testing.assert_close(far, stored)
    assert new_buffers is buffers  # nothing updated
    between = make_apply(model, bn_shrink=2.0)(params, buffers, x, bn_mode="shrink")[0]
    assert not torch.allclose(between, batch, atol=1e-4) and not torch.allclose(between, stored, atol=1e-4)
