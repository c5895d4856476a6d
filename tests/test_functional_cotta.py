"""CoTTA's pure pieces: EMA, stochastic restore, teacher targets, consistency, and the full step."""

import pytest
import torch
from torch import nn
from toy import TinyClassifier, seeded

from yolozu.bridge import make_apply
from yolozu.functional import filters, optim, rng, streams
from yolozu.functional.methods import cotta
from yolozu.functional.methods.cotta import CoTTASettings
from yolozu.functional.readout import Readout
from yolozu.functional.step import make_step, make_update


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(4, 3, generator=g), "b": torch.randn(5, generator=g)}


def test_ema_closed_form():
    teacher, student = _params(0), _params(1)
    out = cotta.ema(teacher, student, 0.9)
    for k in teacher:
        torch.testing.assert_close(out[k], 0.9 * teacher[k] + 0.1 * student[k])
    assert all(torch.equal(cotta.ema(teacher, student, 1.0)[k], teacher[k]) for k in teacher)
    assert all(torch.equal(cotta.ema(teacher, student, 0.0)[k], student[k]) for k in teacher)


def test_restore_with_prob_zero_and_one():
    params, source = _params(0), _params(1)
    draws = cotta.restore_draws(params, rng.key(0))
    kept, n0 = cotta.stochastic_restore(params, source, 0.0, draws)
    back, n1 = cotta.stochastic_restore(params, source, 1.0, draws)
    assert all(torch.equal(kept[k], params[k]) for k in params) and int(n0) == 0
    assert all(torch.equal(back[k], source[k]) for k in params) and int(n1) == 17
    idle, n2 = cotta.stochastic_restore(params, source, 1.0, draws, active=torch.tensor(False))
    assert all(torch.equal(idle[k], params[k]) for k in params) and int(n2) == 0


def test_restore_fraction_and_count_match():
    params = {"w": torch.zeros(10000)}
    source = {"w": torch.ones(10000)}
    out, n = cotta.stochastic_restore(params, source, 0.1, cotta.restore_draws(params, rng.key(3)))
    assert int(n) == int(out["w"].sum()) and 800 < int(n) < 1200


def test_restore_touches_only_selected_params():
    model = seeded(TinyClassifier)
    tx = optim.sgd(0.5)
    method = cotta.cotta_method(make_apply(model), tx, CoTTASettings(restore_prob=1.0, confidence_threshold=1.0))
    state = method.init_state(model, filters.select(model, "norm_only"))
    update = make_update(method)
    x = torch.randn(8, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    new, metrics = update(state, x, cotta.restore_draws(state.source, rng.key(0)))
    assert new.trainable.keys() == state.trainable.keys()
    assert all(torch.equal(new.trainable[k], state.source[k]) for k in new.trainable)  # every element restored
    assert int(metrics["restored_count"]) == sum(t.numel() for t in state.trainable.values())
    assert new.frozen is state.frozen


class FlipEquivariant(nn.Module):
    """A dense 'detector' whose score map is exactly flip-equivariant (a symmetric 3x3 kernel per class)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_(self.conv.weight + self.conv.weight.flip(-1))
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x))


def test_teacher_targets_of_a_flip_equivariant_model_equal_the_identity_branch():
    model = seeded(FlipEquivariant)
    readout = Readout(scores=lambda out: out, score_kind="sigmoid", spatial=True)
    tx = optim.adam(1e-3)
    settings = CoTTASettings(confidence_threshold=1.0)  # always average
    method = cotta.cotta_method(make_apply(model), tx, settings, readout=readout)
    state = method.init_state(model, filters.select(model, "all"))
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    targets = method.prepare(state, x, None)
    model.train()  # batch statistics, as the teacher's view uses
    with torch.no_grad():
        identity = torch.sigmoid(model(x))
    torch.testing.assert_close(targets, identity, rtol=1e-5, atol=1e-6)


def test_flip_back_maps_the_flipped_branch_into_the_original_frame():
    """Scores that are not one map (anchors of several levels) come back through the readout's ``flip_back``."""
    model = seeded(FlipEquivariant)
    tx = optim.adam(1e-3)
    settings = CoTTASettings(confidence_threshold=1.0)
    flat = Readout(scores=lambda out: out.flatten(2), score_kind="sigmoid")
    index = torch.arange(64).view(8, 8).flip(1).flatten()
    mapped = Readout(scores=flat.scores, score_kind="sigmoid", flip_back=lambda out: out.flatten(2)[..., index])
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    targets = {}
    for name, readout in (("flat", flat), ("mapped", mapped)):
        method = cotta.cotta_method(make_apply(model), tx, settings, readout=readout)
        targets[name] = method.prepare(method.init_state(model, filters.select(model, "all")), x, None)
    model.train()
    with torch.no_grad():
        identity = torch.sigmoid(model(x)).flatten(2)
    torch.testing.assert_close(targets["mapped"], identity, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(targets["flat"], identity, atol=1e-3)  # unmapped, the flipped branch disagrees


def test_targets_follow_the_source_confidence_rule():
    teacher = [torch.tensor([[4.0, 0.0]]), torch.tensor([[0.0, 4.0]])]  # identity branch says class 0
    confident_source = torch.tensor([[10.0, 0.0]])
    unsure_source = torch.tensor([[0.1, 0.0]])
    kw = {"score_kind": "softmax", "aggregation": "mean", "threshold": 0.9, "plain_logits": teacher[0]}
    sharp = cotta.teacher_targets(teacher, confident_source, **kw)
    blended = cotta.teacher_targets(teacher, unsure_source, **kw)
    torch.testing.assert_close(sharp, torch.softmax(teacher[0], dim=1))
    torch.testing.assert_close(blended, torch.full((1, 2), 0.5))


def test_confident_samples_take_the_plain_view_whatever_the_branch_order():
    """With the branches ("hflip", "identity") a confident sample's target is still the teacher's plain view."""
    model = seeded(FlipEquivariant)
    with torch.no_grad():
        model.conv.weight.add_(torch.linspace(-1, 1, model.conv.weight.numel()).view_as(model.conv.weight))
    readout = Readout(scores=lambda out: out, score_kind="sigmoid", spatial=True)
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    targets = []
    for order in (("hflip", "identity"), ("identity", "hflip")):
        settings = CoTTASettings(confidence_threshold=0.0, augmentations=order)  # every sample confident
        method = cotta.cotta_method(make_apply(model), optim.adam(1e-3), settings, readout=readout)
        targets.append(method.prepare(method.init_state(model, filters.select(model, "all")), x, None))
    model.train()
    with torch.no_grad():
        plain = torch.sigmoid(model(x))
        flipped = torch.sigmoid(model(x.flip(-1))).flip(-1)
    assert not torch.allclose(plain, flipped, atol=1e-3)  # the perturbed model is not flip-equivariant
    torch.testing.assert_close(targets[0], plain, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(targets[1], plain, rtol=1e-5, atol=1e-6)


def test_confidence_weighted_mean_weights_confident_branches():
    probs = [torch.tensor([[0.9, 0.1]]), torch.tensor([[0.5, 0.5]])]
    out = cotta.aggregate(probs, "confidence_weighted_mean")
    torch.testing.assert_close(out, (0.9 * probs[0] + 0.5 * probs[1]) / 1.4)
    torch.testing.assert_close(cotta.aggregate(probs, "mean"), torch.tensor([[0.7, 0.3]]))


def test_unknown_augmentation_or_aggregation_is_an_error():
    with pytest.raises(ValueError, match="augmentations must be a non-empty list drawn from identity, hflip"):
        CoTTASettings(augmentations=("identity", "rotate"))
    with pytest.raises(ValueError, match="augmentations"):
        CoTTASettings(augmentations=())
    with pytest.raises(ValueError, match="aggregation must be one of"):
        CoTTASettings(aggregation="median")


class DenseScores(nn.Module):
    """A dense sigmoid scorer that is not flip-equivariant, with confident (sharp) scores."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        return 6 * self.conv2(torch.relu(self.bn(self.conv1(x))))


def test_cotta_steps_reduce_the_consistency_loss_on_a_shifted_batch():
    # (A flip-invariant classifier would give targets equal to its own prediction: no gradient at all.)
    model = seeded(DenseScores)
    readout = Readout(scores=lambda out: out, score_kind="sigmoid", spatial=True)
    tx = optim.adam(1e-2)
    settings = CoTTASettings(ema_momentum=0.9, restore_prob=0.0, confidence_threshold=1.0)
    step = make_step(cotta.cotta_method(make_apply(model), tx, settings, readout=readout))
    state = cotta.cotta_method(make_apply(model), tx, settings).init_state(model, filters.select(model, "all"))
    x = 2.0 * torch.randn(8, 3, 12, 12, generator=torch.Generator().manual_seed(0)) + 1.0  # shifted inputs
    losses = []
    for i in range(15):
        state, metrics = step(state, x, rng.key(i))
        losses.append(float(metrics["consistency_loss"]))
    assert losses[-1] < 0.9 * losses[0]
    assert float(metrics["ema_momentum"]) == pytest.approx(0.9)


def test_cotta_update_vmapped_over_streams_equals_separate_updates():
    model = seeded(TinyClassifier)
    tx = optim.sgd(0.1, momentum=0.9)
    method = cotta.cotta_method(make_apply(model), tx, CoTTASettings(restore_prob=0.3, confidence_threshold=0.5))
    source = method.init_state(model, filters.select(model, "lora_norm_only"))
    xs = torch.randn(3, 4, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    draws = [cotta.restore_draws(source.source, rng.key(i)) for i in range(3)]
    update = make_update(method)
    loop = [update(source, xs[i], draws[i]) for i in range(3)]
    stacked, metrics = streams.streams_update(method)(streams.replicate(source, 3), xs, streams.stack(draws))
    for (single, _m), streamed in zip(loop, streams.unstack_states(stacked, 3)):
        for name in single.trainable:
            torch.testing.assert_close(streamed.trainable[name], single.trainable[name], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(streamed.method_state.teacher[name], single.method_state.teacher[name])
    torch.testing.assert_close(metrics["restored_count"], torch.stack([m["restored_count"] for _, m in loop]))
