"""The YOLOZU-compatible shell: run_ttt, TentRunner, run_ttt_mim, guards and rollback."""

import math

import pytest
import torch
import torch.nn.functional as F
from toy import TensorAdapter, TinyAutoencoder, TinyClassifier, same_tensors, seeded, snapshot

from yolozu.adapter import DummyAdapter, ModelAdapter
from yolozu.functional import filters
from yolozu.functional.filters import EmptySelectionError
from yolozu.tta import TentConfig, TentRunner, TTTConfig, TTTReport, run_ttt, run_ttt_mim
from yolozu.tta.ttt_mim import filter_parameters, reconstruction_loss


def _images(n, seed=0, size=12):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3, size, size, generator=g) for _ in range(n)]


def _tent(**kw):
    return TTTConfig(enabled=True, method="tent", lr=1e-2, **kw)


class NoLoader(ModelAdapter):
    def predict(self, records):
        return []

    def get_model(self):
        return TinyClassifier()


def test_adapter_without_hooks_raises_runtime_error_naming_the_hook():
    with pytest.raises(RuntimeError, match=r"DummyAdapter has no get_model\(\)"):
        run_ttt(DummyAdapter(), [], _tent())
    with pytest.raises(RuntimeError, match=r"NoLoader has no build_loader\(\)"):
        run_ttt(NoLoader(), [], _tent())
    assert not DummyAdapter().supports_ttt()


def test_disabled_config_does_nothing():
    model = seeded(TinyClassifier)
    before = snapshot(model)
    report = run_ttt(TensorAdapter(model), _images(2), TTTConfig())
    assert report.enabled is False and report.steps_run == 0
    assert same_tensors(snapshot(model), before)


@pytest.mark.parametrize("filt", filters.FILTERS)
def test_run_ttt_tent_reports_and_adapts(filt):
    model = seeded(TinyClassifier)
    before = snapshot(model)
    config = _tent(steps=5, batch_size=2, max_batches=2, update_filter=filt)
    report = run_ttt(TensorAdapter(model), _images(6), config)
    assert isinstance(report, TTTReport)
    assert (report.enabled, report.method, report.reset) == (True, "tent", "stream")
    assert (report.steps_requested, report.steps_run, report.batches_used) == (5, 5, 2)  # steps in all, cycling
    assert [row["batch"] for row in report.step_metrics] == [0, 1, 0, 1, 0]
    assert len(report.losses) == 5 and all(math.isfinite(v) for v in report.losses)
    selected = filters.select(model, filt)
    assert report.updated_param_count == sum(dict(model.named_parameters())[n].numel() for n in selected)
    assert report.mask_ratio is None and not report.stopped_early and report.stop_reason is None
    row = report.step_metrics[0]
    assert {"step", "loss", "grad_norm", "update_norm", "total_update_norm", "rolled_back"} <= row.keys()
    after = snapshot(model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed & set(selected)
    assert not changed - set(selected) - {n for n, _ in model.named_buffers()}
    d = report.to_dict()
    assert d["loss_summary"]["first"] == report.losses[0] and d["updated_param_count"] == report.updated_param_count


def test_a_full_source_pull_leaves_the_weights_one_step_from_the_source():
    # source_pull 1: every update starts from the source, so after any number of plain SGD steps the weights sit
    # one step (lr x that step's gradient) from it; without the pull the steps add up
    distances = {}
    for pull in (0.0, 1.0):
        config = TTTConfig(enabled=True, method="tent", steps=4, batch_size=2, max_batches=2, optimizer="sgd",
                           momentum=0.0, lr=0.5, source_pull=pull)
        report = run_ttt(TensorAdapter(seeded(TinyClassifier)), _images(4), config)
        last = report.step_metrics[-1]
        distances[pull] = (last["total_update_norm"], 0.5 * last["grad_norm"])
    pulled, one_step = distances[1.0]
    assert pulled == pytest.approx(one_step, rel=1e-4) and pulled > 0
    assert distances[0.0][0] > 1.5 * distances[0.0][1]


@pytest.mark.parametrize("filt", filters.FILTERS)
def test_run_ttt_mim_updated_param_count_and_mask_ratio(filt):
    model = seeded(TinyAutoencoder)
    model.top_block = "dec"  # norm_but_top: the model names its top block (it has no numbered blocks)
    config = TTTConfig(
        enabled=True, method="mim", lr=1e-2, update_filter=filt, mim_patch_size=4, mim_mask_prob=0.5, batch_size=2,
        max_batches=None, steps=2,
    )
    report = run_ttt(TensorAdapter(model), [x.sigmoid() for x in _images(4)], config)
    expected = sum(p.numel() for n, p in model.named_parameters() if n in filters.select(model, filt))
    assert report.updated_param_count == expected
    ratios = [row["mask_ratio"] for row in report.step_metrics]
    assert 0.0 < report.mask_ratio < 1.0 and report.mask_ratio == pytest.approx(sum(ratios) / len(ratios))
    assert report.batches_used == 2


def test_empty_selection_is_an_error_and_leaves_the_model():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1), torch.nn.Flatten(), torch.nn.LazyLinear(2))
    model(torch.zeros(1, 3, 4, 4))
    with pytest.raises(EmptySelectionError, match="norm_only"):
        run_ttt(TensorAdapter(model), _images(1, size=4), _tent(update_filter="norm_only"))


def _confident_then_uniform():
    """Batch 1 gives confident logits (low entropy); batch 2 (zeros) gives uniform logits (max entropy)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.BatchNorm1d(12), torch.nn.Linear(12, 4))
    with torch.no_grad():
        model[2].weight.zero_()
        model[2].weight[0, 0] = 8.0
        model[2].bias.zero_()
    confident = [torch.zeros(3, 2, 2) for _ in range(2)]
    confident[0][0, 0, 0], confident[1][0, 0, 0] = 10.0, -10.0
    return model, confident + [torch.zeros(3, 2, 2)] * 2


GUARD_CASES = [
    ({"max_update_norm": 1e-12}, "max_update_norm_exceeded", 1),
    ({"max_total_update_norm": 1e-12}, "max_total_update_norm_exceeded", 1),
    ({"max_loss_ratio": 1.5}, "max_loss_ratio_exceeded", 2),
    ({"max_loss_increase": 0.1}, "max_loss_increase_exceeded", 2),
]


@pytest.mark.parametrize("limits,reason,trip_step", GUARD_CASES)
def test_each_guard_trips_rolls_back_bitwise_and_reports(limits, reason, trip_step):
    model, records = _confident_then_uniform()
    reference, _ = _confident_then_uniform()
    base = dict(batch_size=2, max_batches=2, steps=2, update_filter="all", bn_mode="running")
    kept_steps = trip_step - 1
    if kept_steps:
        run_ttt(TensorAdapter(reference), records[:2], _tent(**{**base, "steps": 1}))  # what the kept step leaves
    expected = snapshot(reference)
    report = run_ttt(TensorAdapter(model), records, _tent(**base, **limits))
    assert report.stopped_early and report.stop_reason == reason
    assert report.steps_run == kept_steps == len(report.losses)
    assert report.step_metrics[-1]["rolled_back"] is True and report.step_metrics[-1]["stop_reason"] == reason
    assert same_tensors(snapshot(model), expected)  # params and buffers, bitwise


def test_non_finite_loss_trips_and_rolls_back():
    model = seeded(TinyClassifier)
    before = snapshot(model)
    bad = [torch.full((3, 12, 12), float("nan"))] * 2
    report = run_ttt(TensorAdapter(model), bad, _tent(batch_size=2))
    assert report.stop_reason == "non_finite_metrics" and report.steps_run == 0
    assert same_tensors(snapshot(model), before)


def test_with_rollback_off_the_stopped_step_is_kept():
    model = seeded(TinyClassifier)
    before = snapshot(model)
    report = run_ttt(
        TensorAdapter(model), _images(2), _tent(batch_size=2, max_update_norm=1e-12, rollback_on_stop=False)
    )
    assert report.stop_reason == "max_update_norm_exceeded" and report.steps_run == 1
    assert report.step_metrics[0]["rolled_back"] is False
    assert not same_tensors(snapshot(model), before)


def test_an_error_mid_run_leaves_the_model_untouched():
    model = seeded(TinyClassifier)
    before = snapshot(model)

    class Breaking(TensorAdapter):
        def build_loader(self, records, *, batch_size):
            yield torch.randn(2, 3, 12, 12)
            raise OSError("image 3 unreadable")

    with pytest.raises(OSError):
        run_ttt(Breaking(model), [], _tent(steps=3, max_batches=None))
    assert same_tensors(snapshot(model), before)


def test_tent_runner_steps_logs_and_resets_bitwise():
    model = seeded(TinyClassifier)
    before = snapshot(model)
    runner = TentRunner(model, config=TentConfig(lr=1e-2, update_filter="norm_only"))
    for x in _images(3):
        metrics = runner.adapt_step(torch.stack([x, -x]))
    assert {"loss_entropy", "grad_norm", "update_norm", "total_update_norm"} <= metrics.keys()
    log = runner.maybe_log()
    bn = sum(p.numel() for n, p in model.named_parameters() if n.startswith("bn"))
    assert log["updated_param_count"] == bn and log["steps"] == 3
    assert not same_tensors(snapshot(model), before)
    runner.reset(source=True)
    assert same_tensors(snapshot(model), before)
    again = TentRunner(model, config=TentConfig(lr=1e-2, update_filter="norm_only"))
    for x in _images(3):
        metrics_again = again.adapt_step(torch.stack([x, -x]))
    assert metrics_again["loss"] == metrics["loss"]  # reset restored the optimiser state too


def test_tent_config_is_validated():
    with pytest.raises(ValueError, match="TentConfig.lr must be a finite number > 0"):
        TentConfig(lr=0)
    with pytest.raises(ValueError, match="TentConfig.method must be one of tent"):
        TentConfig(method="mim")


def test_run_ttt_mim_compat_api():
    model = seeded(TinyAutoencoder)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    result = run_ttt_mim(
        model,
        x,
        steps=3,
        lr=1e-2,
        mask_prob=0.5,
        patch_size=4,
        mask_value=0.0,
        update_filter="lora_only",
        include=None,
        exclude=None,
        seed=0,
    )
    assert len(result.losses) == 3 and 0 < result.mask_ratio < 1
    assert result.updated_param_count == sum(p.numel() for n, p in model.named_parameters() if "lora" in n)


def test_compat_filter_parameters_and_reconstruction_loss():
    model = seeded(TinyClassifier)
    named = list(model.named_parameters())
    kept = filter_parameters(named, include=["bn"], exclude=["bias"], allowed=[n for n, _ in named][:4])
    assert len(kept) == 1 and kept[0] is model.bn1.weight  # tensors, as YOLOZU returns them
    model.bn1.weight.requires_grad_(False)
    assert filter_parameters(named, include=["bn1"]) == [model.bn1.bias]
    pred, target = torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2)
    mask = torch.tensor([[True, False], [False, False]])
    assert reconstruction_loss(pred, target, mask=mask).item() == 1.0
    assert reconstruction_loss(pred, target, mask=mask, reduction="sum").item() == 1.0
    assert reconstruction_loss(pred, target).item() == 1.0
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    per_image = torch.rand(2, 1, 4, 4, generator=g) > 0.5
    none = reconstruction_loss(pred, target, mask=per_image, reduction="none")
    assert none.shape == pred.shape  # torch's mse_loss(reduction="none") shape, zero outside the mask
    assert torch.equal(none, F.mse_loss(pred, target, reduction="none") * per_image)
    assert torch.equal(reconstruction_loss(pred, target, reduction="none"), F.mse_loss(pred, target, reduction="none"))
    with pytest.raises(ValueError, match="reduction"):
        reconstruction_loss(pred, target, reduction="max")


def test_cotta_rows_carry_the_yolozu_step_metric_keys():
    model = seeded(TinyClassifier)
    config = TTTConfig(enabled=True, method="cotta", lr=1e-2, batch_size=2, steps=2, cotta_restore_prob=0.5)
    report = run_ttt(TensorAdapter(model), _images(2), config)
    row = report.step_metrics[-1]
    assert {"step", "loss", "grad_norm", "update_norm", "total_update_norm", "rolled_back"} <= row.keys()
    assert {"ema_momentum", "restored_count", "aug", "consistency_loss"} <= row.keys()
    assert row["ema_momentum"] == 0.999 and row["restored_count"] > 0
    assert row["aug"] == {"augmentations": ["identity", "hflip"], "aggregation": "confidence_weighted_mean",
                          "branches": 2}
    assert row["consistency_loss"] == row["loss"]


def test_tent_runner_logs_its_counters_every_log_every_steps(caplog):
    model = seeded(TinyClassifier)
    runner = TentRunner(model, config=TentConfig(lr=1e-2, update_filter="norm_only", log_every=2))
    with caplog.at_level("INFO", logger="yolozu.tta.tent"):
        for x in _images(5):
            runner.adapt_step(torch.stack([x, -x]))
    logged = [r.getMessage() for r in caplog.records if r.name == "yolozu.tta.tent"]
    assert [m.split(":")[0] for m in logged] == ["tent step 2", "tent step 4"]
    assert "'updated_param_count': 32" in logged[0] and runner.maybe_log()["steps"] == 5


def test_run_ttt_mim_keys_come_from_batch_zero_and_the_step():
    from yolozu.functional import rng
    from yolozu.functional.masking import block_mask

    model = seeded(TinyAutoencoder)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    result = run_ttt_mim(model, x, steps=2, lr=1e-2, mask_prob=0.5, patch_size=4, seed=3)
    masks = [block_mask(rng.step_key(rng.key(3), 0, s), 2, 16, 16, patch_size=4, mask_prob=0.5) for s in range(2)]
    assert result.mask_ratio == pytest.approx(float(torch.stack(masks).float().mean()))
