"""EATA and SAR: each piece against a closed form or a hand-computed case, and the methods end to end."""

import math

import pytest
import torch
from torch import nn
from toy import TensorAdapter, TinyClassifier, seeded

from yolozu.bridge import make_apply
from yolozu.functional import filters, optim, rng, streams
from yolozu.functional.driver import make_driver, start
from yolozu.functional.guards import GuardLimits
from yolozu.functional.methods import eata, sar
from yolozu.functional.readout import Readout
from yolozu.functional.step import make_update
from yolozu.tta import TTTConfig, run_ttt


def _rows(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_eata_selection_by_entropy_confidence_and_redundancy():
    s = eata.EATASettings(conf_min=0.0, entropy_min=0.0)
    probs = _rows([0.9, 0.05, 0.05], [1 / 3, 1 / 3, 1 / 3], [0.05, 0.9, 0.05])
    entropy = -(probs * probs.log()).sum(1)
    e0 = 0.4 * math.log(3)  # 0.44: the two confident rows (H = 0.39) pass, the uniform one (H = 1.10) does not
    nan = torch.tensor(float("nan"))
    assert eata.selection(probs, entropy, nan, e0, s).tolist() == [True, False, True]
    moving = _rows([0.9, 0.05, 0.05])[0]  # |cos| with row 0 is 1: redundant; with row 2 it is 0.12
    narrow = eata.EATASettings(conf_min=0, entropy_min=0, d_margin=0.2)
    assert eata.selection(probs, entropy, moving, e0, narrow).tolist() == [False, False, True]
    for strict in (eata.EATASettings(conf_min=0.95, entropy_min=0), eata.EATASettings(conf_min=0, entropy_min=0.5)):
        assert eata.selection(probs, entropy, nan, e0, strict).tolist() == [False] * 3


def test_eata_moving_probabilities_closed_form():
    probs = _rows([0.6, 0.4], [0.2, 0.8])
    first = eata.moving_probs(torch.tensor(float("nan")), probs, torch.tensor([True, True]))
    torch.testing.assert_close(first, torch.tensor([0.4, 0.6]))
    second = eata.moving_probs(first, probs, torch.tensor([True, False]))
    torch.testing.assert_close(second, 0.9 * first + 0.1 * torch.tensor([0.6, 0.4]))
    assert torch.equal(eata.moving_probs(first, probs, torch.tensor([False, False])), first)


def test_eata_penalty_closed_form_with_and_without_fisher():
    theta, source = {"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([0.0, 1.0])}
    fisher = {"w": torch.tensor([0.5, 2.0])}
    s = eata.EATASettings(fisher_alpha=10.0, anchor_lambda=0.1)
    assert float(eata.anchor_penalty(theta, source, fisher, s)) == pytest.approx(10.0 * (0.5 + 2.0))
    assert float(eata.anchor_penalty(theta, source, {}, s)) == pytest.approx(0.1 * 2.0)


class Linear(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x)


def test_eata_loss_is_the_reweighted_entropy_of_the_kept_samples():
    model = seeded(Linear)
    s = eata.EATASettings(e_margin=5.0, conf_min=0.0, entropy_min=0.0, anchor_lambda=0.0)
    method = eata.eata_method(make_apply(model), optim.sgd(0.0), s, bn="eval")
    state = method.init_state(model, ["fc.weight", "fc.bias"])
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    _, metrics = make_update(method)(state, x, None)
    with torch.no_grad():
        p = torch.softmax(model(x), 1)
    h = -(p * p.log()).sum(1)
    assert float(metrics["loss"]) == pytest.approx(float((h * torch.exp(5.0 - h)).mean()), rel=1e-5)
    assert float(metrics["selected"]) == 6 and not bool(metrics["skipped"])


def test_diagonal_fisher_is_the_mean_squared_gradient_of_the_argmax_cross_entropy():
    model = seeded(Linear)
    method = eata.eata_method(make_apply(model), optim.sgd(0.1), bn="eval")
    state = method.init_state(model, ["fc.weight", "fc.bias"])
    batches = [torch.randn(5, 4, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    fisher = method.calibrate(state, batches).method_state.fisher
    expected = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for x in batches:
        out = model(x)
        grads = torch.autograd.grad(nn.functional.cross_entropy(out, out.argmax(1)), list(model.parameters()))
        for (n, _), g in zip(model.named_parameters(), grads):
            expected[n] += g.square() / 2
    for n in expected:
        torch.testing.assert_close(fisher[n], expected[n])
    with pytest.raises(ValueError, match="at least one batch"):
        method.calibrate(state, [])


def test_eata_skips_steps_without_samples_and_stops_after_the_streak():
    model = seeded(TinyClassifier)
    images = [torch.randn(3, 12, 12, generator=torch.Generator().manual_seed(i)) for i in range(12)]
    before = {n: p.clone() for n, p in model.named_parameters()}
    config = TTTConfig(
        enabled=True, method="eata", lr=1e-2, batch_size=2, update_filter="norm_only", eata_min_valid_dets=100,
        eata_max_skip_streak=2, steps=6, max_batches=None,
    )
    report = run_ttt(TensorAdapter(model), images, config)
    assert [row["skipped"] for row in report.step_metrics] == [1.0, 1.0, 1.0]
    assert report.stop_reason == "eata_max_skip_streak_exceeded" and report.step_metrics[-1]["rolled_back"]
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())  # no step was taken
    ratio = TTTConfig(
        enabled=True, method="eata", batch_size=2, eata_selected_ratio_min=0.9, eata_e_margin=1e-6, steps=2
    )
    assert run_ttt(TensorAdapter(seeded(TinyClassifier)), images, ratio).stop_reason == "eata_selected_ratio_below_min"


def test_eata_without_a_skip_stop_keeps_skipping_and_the_paper_preset_sets_the_papers_eata():
    model = seeded(TinyClassifier)
    images = [torch.randn(3, 12, 12, generator=torch.Generator().manual_seed(i)) for i in range(12)]
    config = TTTConfig(
        enabled=True, method="eata", lr=1e-2, batch_size=2, update_filter="norm_only", eata_min_valid_dets=100,
        eata_max_skip_streak=None, steps=6, max_batches=None,
    )
    report = run_ttt(TensorAdapter(model), images, config)
    assert [row["skipped"] for row in report.step_metrics] == [1.0] * 6 and report.stop_reason is None
    paper = TTTConfig.from_preset("eata_paper")
    s = paper.method_settings()
    assert (s.conf_min, s.entropy_min, s.max_skip_streak, s.selected_ratio_min, s.min_valid_dets) == (0, 0, None, 0, 1)
    assert (s.e_margin, s.d_margin, s.fisher_alpha, s.anchor_lambda) == (None, 0.05, 2000.0, 0.0)
    assert (paper.optimizer, paper.lr, paper.momentum, paper.batch_size) == ("sgd", 0.00025, 0.9, 64)
    assert (paper.update_filter, paper.bn_mode, paper.schedule) == ("norm_only", "batch", "online")
    assert (paper.max_batches, paper.online_predict) == (None, "adapt_forward")
    assert paper.guard_limits().max_update_norm is None and paper.max_grad_norm is None
    assert TTTConfig(method="eata").eata_max_skip_streak == 3  # YOLOZU's default stays


def test_sam_perturbation_closed_form():
    grads = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([4.0])}
    params = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.5])}
    e = sar.sam_perturbation(grads, params, 0.5, adaptive=False)
    torch.testing.assert_close(e["a"], torch.tensor([0.3, 0.0]))
    torch.testing.assert_close(e["b"], torch.tensor([0.4]))
    scaled_norm = math.sqrt((1.0 * 3.0) ** 2 + (0.5 * 4.0) ** 2)
    e = sar.sam_perturbation(grads, params, 0.5, adaptive=True)
    torch.testing.assert_close(e["a"], torch.tensor([1.0 * 3.0 * 0.5 / scaled_norm, 0.0]))
    torch.testing.assert_close(e["b"], torch.tensor([0.25 * 4.0 * 0.5 / scaled_norm]))


@pytest.mark.parametrize("adaptive", [False, True])
def test_sar_step_descends_the_gradient_taken_at_the_perturbed_weights(adaptive):
    model = seeded(Linear)
    s = sar.SARSettings(rho=0.3, adaptive=adaptive, e_margin=10.0, reset_constant=0.0)
    method = sar.sar_method(make_apply(model), optim.sgd(0.1), s, bn="eval")
    state = method.init_state(model, ["fc.weight", "fc.bias"])
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    new, _ = make_update(method)(state, x, None)

    def entropy(params):
        p = torch.softmax(torch.func.functional_call(model, params, (x,)), 1)
        return -(p * p.log()).sum(1).mean()

    theta = {n: p.detach() for n, p in model.named_parameters()}
    g1 = torch.func.grad(entropy)(theta)
    norms = [((theta[n].abs() if adaptive else 1) * g).norm() for n, g in g1.items()]
    norm = torch.linalg.vector_norm(torch.stack(norms))
    e = {n: (theta[n].square() if adaptive else 1) * g * 0.3 / (norm + 1e-12) for n, g in g1.items()}
    g2 = torch.func.grad(entropy)({n: theta[n] + e[n] for n in theta})
    for n in theta:
        torch.testing.assert_close(new.trainable[n], theta[n] - 0.1 * g2[n])


def test_sar_recovers_the_source_when_the_loss_average_falls_below_the_constant():
    model = seeded(Linear)
    settings = sar.SARSettings(e_margin=10.0, reset_constant=100.0)
    method = sar.sar_method(make_apply(model), optim.adam(0.1), settings, bn="eval")
    state = method.init_state(model, ["fc.weight", "fc.bias"])
    new, metrics = make_update(method)(state, torch.randn(6, 4), None)
    assert bool(metrics["recovered"]) and torch.isnan(new.method_state.ema_loss)
    assert all(torch.equal(new.trainable[n], state.source[n]) for n in state.source)
    assert int(new.opt_state.count) == 0 and all(torch.equal(m, torch.zeros_like(m)) for m in new.opt_state.mu.values())


def test_sar_steps_on_zero_gradients_without_a_reliable_sample_as_the_reference():
    model = seeded(Linear)
    optimizer = optim.sgd(0.1, momentum=0.9)
    everything = sar.sar_method(make_apply(model), optimizer, sar.SARSettings(e_margin=10.0), bn="eval")
    nothing = sar.sar_method(make_apply(model), optimizer, sar.SARSettings(e_margin=1e-9), bn="eval")
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    first, _ = make_update(everything)(everything.init_state(model, ["fc.weight", "fc.bias"]), x, None)
    second, metrics = make_update(nothing)(first, x, None)
    assert float(metrics["selected"]) == 0 and float(metrics["loss"]) == 0 and not bool(metrics["recovered"])
    for n, p in first.trainable.items():  # zero gradient: momentum SGD moves by lr x 0.9 x the trace
        torch.testing.assert_close(second.trainable[n], p - 0.1 * 0.9 * first.opt_state.trace[n])
        assert not torch.equal(second.trainable[n], p)
    assert int(second.opt_state.count) == 2
    assert torch.equal(second.method_state.ema_loss, first.method_state.ema_loss)  # the average keeps its value
    assert sar.sar_row({"selected": 0.0, "recovered": False, "loss": 0.0}, 0.05)["update_skipped"] is False


@pytest.mark.parametrize("name", ["eata", "sar"])
def test_k_streams_equal_separate_drives(name):
    model = seeded(TinyClassifier)
    tx = optim.sgd(0.05, momentum=0.9)
    if name == "eata":
        method = eata.eata_method(make_apply(model), tx, eata.EATASettings(e_margin=2.0, conf_min=0.0, entropy_min=0.0))
    else:
        method = sar.sar_method(make_apply(model), tx, sar.SARSettings(e_margin=2.0))
    source = method.init_state(model, filters.select(model, "norm_only"))
    xs = 2 * torch.randn(3, 4, 3, 12, 12, generator=torch.Generator().manual_seed(2))
    drive = make_driver(method, GuardLimits())
    carry, _ = drive(start(source, 3), xs, [0, 1, 2], 3, rng.key(0))
    for k, streamed in enumerate(streams.unstack_states(carry.state, 3)):
        alone, _ = drive(start(source), xs[k : k + 1], [k], 3, rng.key(0))
        (single,) = streams.unstack_states(alone.state, 1)
        for n in single.trainable:
            torch.testing.assert_close(streamed.trainable[n], single.trainable[n], rtol=1e-4, atol=1e-5)


def test_sigmoid_samples_are_read_as_their_normalised_class_distribution():
    """RetinaNet and FCOS score classes with independent sigmoids: EATA and SAR read a sample's scores p_c as the
    class distribution p_c / sum p, so their entropy margins keep their meaning."""
    logits = torch.tensor([[-6.0, -6.0, 6.0], [0.0, 0.0, 0.0], [-1.0, 2.0, 0.5]])
    rows = Readout(score_kind="sigmoid").class_rows(logits)
    p = logits.sigmoid()
    torch.testing.assert_close(rows.softmax(dim=1), p / p.sum(dim=1, keepdim=True))
    assert torch.equal(Readout().class_rows(logits), logits)
    model = seeded(Linear)
    readout = Readout(score_kind="sigmoid")
    x = 3 * torch.randn(6, 4, generator=torch.Generator().manual_seed(1))
    settings = eata.EATASettings(e_margin=2.0, conf_min=0.0, entropy_min=0.0)
    for method in (
        sar.sar_method(make_apply(model), optim.sgd(0.1), sar.SARSettings(e_margin=2.0), readout=readout, bn="eval"),
        eata.eata_method(make_apply(model), optim.sgd(0.1), settings, readout=readout, bn="eval"),
    ):
        state = method.init_state(model, ["fc.weight"])
        new, metrics = make_update(method)(state, x, None)
        assert float(metrics["selected"]) > 0 and torch.isfinite(metrics["loss"])
        assert not torch.equal(new.trainable["fc.weight"], state.trainable["fc.weight"])
