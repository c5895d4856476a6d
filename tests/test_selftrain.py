"""Detection self-training: the targets, thresholds and ignored band in closed form, the shared focal loss, the
teacher, and the refusal of a readout without sigmoid scores."""

import pytest
import torch
from toy import TinyClassifier, TinyHeatmap, seeded

from yolozu.bridge import make_apply
from yolozu.functional import filters, optim
from yolozu.functional.losses import centernet_focal_loss
from yolozu.functional.methods import selftrain
from yolozu.functional.methods.selftrain import SelfTrainSettings
from yolozu.functional.readout import Readout
from yolozu.functional.step import make_update

SETTINGS = SelfTrainSettings(threshold_min=0.2, threshold_max=0.6, negative_below=0.1, top_k=1)
HEATMAP = Readout(score_kind="sigmoid", spatial=True)


def _map(values: dict, classes: int = 2, size: int = 5) -> torch.Tensor:
    probs = torch.full((1, classes, size, size), 0.01)
    for (c, i, j), v in values.items():
        probs[0, c, i, j] = v
    return probs


def test_targets_positives_at_confident_peaks_the_band_ignored_the_rest_negative():
    probs = _map({(0, 1, 1): 0.9, (0, 1, 2): 0.7, (0, 3, 3): 0.3, (1, 2, 2): 0.15})
    heatmap, mask = selftrain.pseudo_targets(probs, torch.tensor([0.5, 0.5]), SETTINGS)
    positives = (heatmap == 1) & mask
    assert positives.nonzero().tolist() == [[0, 0, 1, 1]]  # (0, 1, 2) is confident but not a peak
    assert not mask[0, 0, 1, 2] and not mask[0, 0, 3, 3] and not mask[0, 1, 2, 2]  # the ignored band
    assert mask[0, 0, 0, 0] and heatmap[0, 0, 0, 0] == pytest.approx(0.01)  # a negative with its soft target


def test_class_thresholds_scale_the_level_by_each_class_mean_over_the_best_and_clip():
    probs = _map({(0, 1, 1): 0.8, (1, 3, 3): 0.4})
    thresholds = selftrain.class_thresholds(probs, torch.tensor(0.5), SETTINGS)
    torch.testing.assert_close(thresholds, torch.tensor([0.5, 0.25]))
    clipped = selftrain.class_thresholds(probs, torch.tensor(0.9), SETTINGS)
    torch.testing.assert_close(clipped, torch.tensor([0.6, 0.45]))
    low = selftrain.class_thresholds(_map({(0, 1, 1): 0.8, (1, 3, 3): 0.05}), torch.tensor(0.5), SETTINGS)
    assert float(low[1]) == pytest.approx(0.2)  # threshold_min


def test_the_level_starts_at_the_first_batch_then_moves_as_an_ema():
    probs = _map({(0, 1, 1): 0.8, (1, 3, 3): 0.4})
    first = selftrain.next_level(probs, torch.tensor(float("nan")), SETTINGS)
    assert float(first) == pytest.approx(0.8)  # top_k 1: the best detection's score
    second = selftrain.next_level(probs * 0.5, first, SETTINGS)
    assert float(second) == pytest.approx(0.9 * 0.8 + 0.1 * 0.4)


def test_the_focal_loss_counts_only_the_masked_cells():
    logits = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    heatmap = torch.rand(2, 3, 6, 6, generator=torch.Generator().manual_seed(1)) * 0.9
    heatmap[0, 1, 2, 2] = 1.0
    assert torch.equal(centernet_focal_loss(logits, heatmap, mask=torch.ones_like(logits, dtype=torch.bool)),
                       centernet_focal_loss(logits, heatmap))
    mask = torch.ones_like(logits, dtype=torch.bool)
    mask[1, 0, 4, 4] = False
    moved = logits.clone()
    moved[1, 0, 4, 4] += 5.0
    masked = [centernet_focal_loss(x, heatmap, mask=mask) for x in (logits, moved)]
    assert torch.equal(*masked)
    assert not torch.equal(centernet_focal_loss(logits, heatmap), centernet_focal_loss(moved, heatmap))


def test_a_step_trains_the_student_and_the_teacher_follows_it():
    model = seeded(TinyHeatmap)
    settings = SelfTrainSettings(ema_momentum=0.5, threshold_min=0.0, negative_below=0.0)
    method = selftrain.selftrain_method(make_apply(model), optim.sgd(0.5), settings, readout=HEATMAP)
    state = method.init_state(model, filters.select(model, "norm_only"))
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    level = method.prepare(state, x, None)[2].level
    new, metrics = make_update(method)(state, x, None)
    assert float(metrics["positives"]) > 0 and torch.isfinite(metrics["loss"])
    assert torch.equal(metrics["level"], level) and torch.equal(new.method_state.level, level)
    assert any(not torch.equal(new.trainable[n], state.trainable[n]) for n in state.trainable)
    for name in state.trainable:
        expected = torch.lerp(new.trainable[name], state.method_state.teacher[name], 0.5)
        torch.testing.assert_close(new.method_state.teacher[name], expected)


def test_a_softmax_readout_is_refused_with_the_reason():
    model = seeded(TinyClassifier)
    with pytest.raises(ValueError, match="selftrain needs a detector's class scores with independent sigmoids"):
        selftrain.selftrain_method(make_apply(model), optim.sgd(0.1), SelfTrainSettings(), readout=Readout())
