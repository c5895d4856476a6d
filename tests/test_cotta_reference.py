"""CoTTA's reference rule, setting by setting: random strong views (never the clean one), logits averaged, the
threshold once per batch and derived from the source model, predictions with the teacher before the update;
YOLOZU's rule stays the default."""

import pytest
import torch
from torch import nn
from toy import TinyClassifier, seeded

from yolozu.bridge import make_apply
from yolozu.functional import augment, filters, optim, rng, streams
from yolozu.functional.mean_teacher import SOURCE_MARGIN, SOURCE_QUANTILE
from yolozu.functional.methods import cotta
from yolozu.functional.methods.cotta import CoTTANoise, CoTTASettings
from yolozu.functional.readout import Readout
from yolozu.functional.step import make_update
from yolozu.tta.config import TTTConfig


def _images(seed: int, shape=(4, 3, 12, 12)) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def test_yolozus_rule_stays_the_default():
    s = CoTTASettings()
    assert (s.views, s.aggregation, s.threshold_scope, s.threshold_data, s.predict_with) == (
        "fixed", "confidence_weighted_mean", "sample", None, "teacher"
    )
    assert (s.augmentations, s.confidence_threshold, s.random_views) == (("identity", "hflip"), 0.92, 32)
    c = TTTConfig.from_preset("cotta_paper")
    assert (c.cotta_views, c.cotta_random_views, c.cotta_aggregation, c.cotta_threshold_scope) == (
        "random", 32, "logit_mean", "batch"
    )
    assert (c.cotta_predict_with, c.optimizer, c.lr, c.update_filter, c.bn_mode) == (
        "teacher_before_update", "adam", 1e-3, "all", "batch"
    )


def test_logit_mean_averages_logits_before_the_probabilities():
    g = torch.Generator().manual_seed(0)
    views = [torch.randn(5, 4, generator=g) for _ in range(3)]
    plain = torch.randn(5, 4, generator=g)
    source = torch.zeros(5, 4)  # confidence 1/4: below any threshold above it
    for kind, prob in (("softmax", lambda z: torch.softmax(z, 1)), ("sigmoid", torch.sigmoid)):
        out = cotta.teacher_targets(views, source, score_kind=kind, aggregation="logit_mean", threshold=0.9,
                                    plain_logits=plain)
        torch.testing.assert_close(out, prob(torch.stack(views).mean(0)))
        mean_of_probs = cotta.teacher_targets(views, source, score_kind=kind, aggregation="mean", threshold=0.9,
                                              plain_logits=plain)
        assert not torch.allclose(out, mean_of_probs)


def test_the_batch_scope_decides_once_on_the_mean_source_confidence():
    views, plain = [torch.full((2, 2), 3.0) * torch.tensor([1.0, -1.0])], torch.zeros(2, 2)
    # the source is sure of sample 0 (confidence ~0.95) and unsure of sample 1 (0.5): mean ~0.73
    source = torch.tensor([[3.0, 0.0], [0.0, 0.0]])
    averaged, flat = torch.softmax(views[0], 1), torch.softmax(plain, 1)
    kwargs = dict(score_kind="softmax", aggregation="mean", plain_logits=plain)
    per_sample = cotta.teacher_targets(views, source, threshold=0.8, **kwargs)
    torch.testing.assert_close(per_sample, torch.stack([flat[0], averaged[1]]))
    torch.testing.assert_close(cotta.teacher_targets(views, source, threshold=0.8, scope="batch", **kwargs), averaged)
    torch.testing.assert_close(cotta.teacher_targets(views, source, threshold=0.7, scope="batch", **kwargs), flat)


class Recording(nn.Module):
    """TinyClassifier that records every input it sees."""

    def __init__(self):
        super().__init__()
        self.inner = seeded(TinyClassifier)
        self.seen: list[torch.Tensor] = []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return self.inner(x)


def test_random_views_are_strong_views_never_the_clean_one_and_their_logits_are_averaged():
    model = Recording()
    settings = CoTTASettings(views="random", random_views=5, aggregation="logit_mean", confidence_threshold=1.0)
    method = cotta.cotta_method(make_apply(model), optim.sgd(0.0), settings)
    state = method.init_state(model, filters.select(model, "norm_only"))
    x = _images(1)
    noise = method.draw(rng.key(3), state.source, x)
    assert isinstance(noise, CoTTANoise) and noise.views.noise.shape == (5, 3, 12, 12)
    assert torch.equal(noise.views.brightness, method.draw(rng.key(3), state.source, x).views.brightness)
    model.seen.clear()
    targets = method.prepare(state, x, noise)
    views, clean = model.seen[:5], model.seen[5:]
    assert len(views) == 5 and len(clean) == 2 and all(torch.equal(v, x) for v in clean)  # teacher's and source's
    assert not any(torch.allclose(v, x, atol=1e-3) for v in views)
    for i, v in enumerate(views):
        torch.testing.assert_close(v, augment.augment(x, noise.views, i))
    with torch.no_grad():
        logits = torch.stack([model.inner(v) for v in views]).mean(0)  # a classifier: no frame to map back
    torch.testing.assert_close(targets, torch.softmax(logits, 1))


def test_a_flipped_random_view_is_mapped_back_into_the_original_frame():
    x = _images(2, (2, 3, 8, 8))
    views = augment.draw_views(rng.key(0), 1, (3, 8, 8), "cpu")
    zero = views._replace(noise=torch.zeros_like(views.noise))
    flipped, unflipped = (zero._replace(flip=torch.tensor([f])) for f in (True, False))
    torch.testing.assert_close(augment.augment(x, flipped, 0), augment.augment(x, unflipped, 0).flip(-1))
    model = nn.Conv2d(3, 2, 1)  # a dense scorer, exactly flip-equivariant
    readout = Readout(scores=lambda out: out, score_kind="sigmoid", spatial=True)
    settings = CoTTASettings(views="random", random_views=1, aggregation="logit_mean", confidence_threshold=1.0)
    method = cotta.cotta_method(make_apply(model), optim.sgd(0.0), settings, readout=readout)
    state = method.init_state(model, [n for n, _ in model.named_parameters()])
    restore = cotta.restore_draws(state.source, rng.key(0))
    a = method.prepare(state, x, CoTTANoise(restore, flipped))
    b = method.prepare(state, x, CoTTANoise(restore, unflipped))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_the_threshold_is_derived_from_the_source_model_on_in_distribution_data():
    model = seeded(TinyClassifier)
    settings = CoTTASettings(threshold_data="val")
    method = cotta.cotta_method(make_apply(model), optim.sgd(0.1), settings, bn="running")
    state = method.init_state(model, filters.select(model, "norm_only"))
    assert float(state.method_state.threshold) == pytest.approx(0.92)
    batches = [_images(5), _images(6)]
    calibrated = method.calibrate(state, iter(batches))
    reference = seeded(TinyClassifier).train()  # test-batch statistics, as the teacher's views
    with torch.no_grad():
        confidences = torch.cat([torch.softmax(reference(b), 1).amax(1) for b in batches])
    expected = torch.quantile(confidences, SOURCE_QUANTILE) - SOURCE_MARGIN
    torch.testing.assert_close(calibrated.method_state.threshold, expected)
    with pytest.raises(ValueError, match="at least one batch"):
        method.calibrate(state, iter([]))
    assert TTTConfig(method="cotta", cotta_threshold_data="val").calibration_split() == "val"


def test_the_reference_predicts_with_the_teacher_before_the_update():
    model = seeded(TinyClassifier)
    settings = CoTTASettings(predict_with="teacher_before_update", ema_momentum=0.5, restore_prob=0.0)
    method = cotta.cotta_method(make_apply(model), optim.sgd(0.5), settings)
    state = method.init_state(model, filters.select(model, "norm_only"))
    update = make_update(method)
    first, _ = update(state, _images(7), cotta.restore_draws(state.source, rng.key(0)))
    second, _ = update(first, _images(8), cotta.restore_draws(state.source, rng.key(1)))
    for name, source in state.source.items():
        assert torch.equal(method.predict_params(first)[name], source)
        assert torch.equal(method.predict_params(second)[name], first.method_state.teacher[name])
        assert not torch.equal(second.method_state.teacher[name], first.method_state.teacher[name])
    default = cotta.cotta_method(make_apply(model), optim.sgd(0.5), CoTTASettings(ema_momentum=0.5))
    after, _ = make_update(default)(state, _images(7), cotta.restore_draws(state.source, rng.key(0)))
    assert after.method_state.previous == {} and default.predict_params(after) is after.method_state.teacher


def test_random_views_vmapped_over_streams_equal_separate_updates():
    model = seeded(TinyClassifier)
    settings = CoTTASettings(views="random", random_views=3, threshold_scope="batch", restore_prob=0.2)
    method = cotta.cotta_method(make_apply(model), optim.sgd(0.1, momentum=0.9), settings)
    source = method.init_state(model, filters.select(model, "norm_only"))
    xs = torch.rand(2, 4, 3, 12, 12, generator=torch.Generator().manual_seed(4))
    noises = [method.draw(rng.key(i), source.source, xs[i]) for i in range(2)]
    loop = [make_update(method)(source, xs[i], noises[i]) for i in range(2)]
    stacked, _ = streams.streams_update(method)(streams.replicate(source, 2), xs, streams.stack(noises))
    for (single, _m), streamed in zip(loop, streams.unstack_states(stacked, 2)):
        for name in single.trainable:
            torch.testing.assert_close(streamed.trainable[name], single.trainable[name], rtol=1e-5, atol=1e-6)


def test_bad_reference_settings_are_errors():
    with pytest.raises(ValueError, match="views must be one of fixed, random"):
        CoTTASettings(views="all")
    with pytest.raises(ValueError, match="random_views"):
        CoTTASettings(random_views=0)
    with pytest.raises(ValueError, match="threshold_scope must be one of sample, batch"):
        CoTTASettings(threshold_scope="image")
    with pytest.raises(ValueError, match="threshold_data must be a split name or None"):
        CoTTASettings(threshold_data="")


def test_the_reference_rule_runs_through_the_captured_path():
    model = seeded(TinyClassifier)
    settings = CoTTASettings(views="random", random_views=3, aggregation="logit_mean", threshold_scope="batch",
                             predict_with="teacher_before_update", restore_prob=0.1)
    method = cotta.cotta_method(make_apply(model), optim.adam(1e-2), settings)
    state = method.init_state(model, filters.select(model, "norm_only"))
    x = _images(9)
    noise = method.draw(rng.key(5), state.source, x)
    eager, eager_metrics = make_update(method)(state, x, noise)
    captured, captured_metrics = make_update(method, capture="rerun")(state, x, noise)
    for name in eager.trainable:
        assert torch.equal(captured.trainable[name], eager.trainable[name])
        assert torch.equal(captured.method_state.previous[name], eager.method_state.previous[name])
    assert torch.equal(captured_metrics["loss"], eager_metrics["loss"])
