"""A YOLOZU user's code on ours: one test per promise of YOLOZU's documented surface (names, signatures,
defaults, return shapes), written from that documentation."""

import argparse
import json

import attrs
import pytest
import torch
from torch import nn
from toy import TensorAdapter, TinyAutoencoder, TinyClassifier, seeded, snapshot

from yolozu.adapter import DummyAdapter, ModelAdapter
from yolozu.functional import filters, optim
from yolozu.tta import TentConfig, TentRunner, TTTConfig, run_ttt
from yolozu.tta.presets import PRESETS, apply_ttt_preset_args
from yolozu.tta.schedules import adapt_and_predict
from yolozu.tta.ttt_mim import apply_mask, run_ttt_mim, select_parameters, ttt_mim_step


def _images(n, seed=0, size=12):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3, size, size, generator=g) for _ in range(n)]


def test_ttt_config_positional_order_and_defaults():
    c = TTTConfig(True, "mim", "stream", 3, 2, 1e-3)
    assert (c.enabled, c.method, c.reset, c.steps, c.batch_size, c.lr) == (True, "mim", "stream", 3, 2, 1e-3)
    d = TTTConfig()
    defaults = (d.max_batches, d.seed, d.include, d.exclude, d.log_out, d.update_filter)
    assert defaults == (1, None, None, None, None, "all")
    assert (d.mim_mask_prob, d.mim_patch_size, d.mim_mask_value) == (0.6, 16, 0.0)
    assert (d.cotta_ema_momentum, d.cotta_augmentations, d.cotta_aggregation) == (
        0.999, ("identity", "hflip"), "confidence_weighted_mean"
    )
    assert (d.cotta_restore_prob, d.cotta_restore_interval) == (0.01, 1)
    eata = (d.eata_conf_min, d.eata_entropy_min, d.eata_entropy_max, d.eata_min_valid_dets, d.eata_anchor_lambda)
    assert eata == (0.2, 0.05, 3.0, 1, 1e-3) and (d.eata_selected_ratio_min, d.eata_max_skip_streak) == (0.0, 3)
    assert (d.sar_rho, d.sar_adaptive, d.sar_first_step_scale) == (0.05, False, 1.0)
    names = [f.name for f in attrs.fields(TTTConfig)]
    assert names[:6] == ["enabled", "method", "reset", "steps", "batch_size", "lr"]
    assert names.index("log_out") < names.index("mim_mask_prob") < names.index("eata_conf_min") < names.index("sar_rho")


def test_steps_are_the_total_cycling_over_the_batches():
    model = seeded(TinyClassifier)
    config = TTTConfig(enabled=True, steps=5, batch_size=2, max_batches=2, lr=1e-2, seed=0)
    report = run_ttt(TensorAdapter(model), _images(8), config)
    assert (report.steps_requested, report.steps_run, report.batches_used) == (5, 5, 2)
    assert [row["batch"] for row in report.step_metrics] == [0, 1, 0, 1, 0]
    assert run_ttt(TensorAdapter(seeded(TinyClassifier)), _images(8), config.replace(max_batches=1)).batches_used == 1


def test_unseeded_runs_follow_torchs_global_generator():
    def losses(global_seed):
        model = seeded(TinyAutoencoder)
        torch.manual_seed(global_seed)
        config = TTTConfig(enabled=True, method="mim", lr=1e-2, mim_patch_size=4, batch_size=2)
        return run_ttt(TensorAdapter(model), [x.sigmoid() for x in _images(2)], config).losses

    assert losses(1) == losses(1) and losses(1) != losses(2)


def test_a_zero_cap_stops_and_rolls_back_every_moving_step():
    model = seeded(TinyClassifier)
    before = snapshot(model)
    report = run_ttt(TensorAdapter(model), _images(2), TTTConfig(enabled=True, batch_size=2, max_update_norm=0.0))
    assert report.stop_reason == "max_update_norm_exceeded" and report.steps_run == 0
    assert all(torch.equal(before[k], v) for k, v in snapshot(model).items())


def test_report_to_dict_has_yolozus_shape():
    model = seeded(TinyClassifier)
    config = TTTConfig(enabled=True, steps=60, batch_size=2, lr=1e-3, max_grad_norm=1e-3, seed=0)
    d = run_ttt(TensorAdapter(model), _images(2), config).to_dict()
    assert set(d["loss_summary"]) >= {"count", "min", "mean", "max", "last"} and d["loss_summary"]["count"] == 60
    assert (len(d["losses"]), d["losses_total"], d["losses_truncated"]) == (50, 60, True)
    assert (len(d["step_metrics"]), d["step_metrics_total"], d["step_metrics_truncated"]) == (50, 60, True)
    row = d["step_metrics"][0]
    assert row["step"] == 0 and row["grad_norm_clipped"] == pytest.approx(min(row["grad_norm"], 1e-3))
    assert row["non_finite_fields"] == [] and {"loss", "update_norm", "total_update_norm", "rolled_back"} <= row.keys()
    bad = [torch.full((3, 12, 12), float("nan"))]
    nan = run_ttt(TensorAdapter(seeded(TinyClassifier)), bad, TTTConfig(enabled=True))
    assert nan.stop_reason == "non_finite_metrics" and "non_finite_metrics" in nan.warnings
    assert set(nan.to_dict()["step_metrics"][0]["non_finite_fields"]) >= {"loss"}
    config = TTTConfig(enabled=True, method="cotta", batch_size=2)
    cotta = run_ttt(TensorAdapter(seeded(TinyClassifier)), _images(2), config)
    assert (cotta.step_metrics[0]["restore_prob"], cotta.step_metrics[0]["restore_interval"]) == (0.01, 1)


def test_tent_config_defaults_and_runner_params_and_optimizer():
    c = TentConfig()
    assert (c.lr, c.update_filter, c.enabled, c.method) == (1e-4, "all", True, "tent")
    model = seeded(TinyClassifier)
    runner = TentRunner(model, config=TentConfig(update_filter="norm_only"))
    assert [id(p) for p in runner.params] == [id(model.bn1.weight), id(model.bn1.bias), id(model.bn2.weight),
                                              id(model.bn2.bias)]
    assert isinstance(runner.optimizer, optim.GradientTransformation)
    metrics = runner.adapt_step(torch.stack(_images(2)))
    assert {"loss_entropy", "grad_norm"} <= metrics.keys() and runner.maybe_log()["steps"] == 1


class SetPredictor(nn.Module):
    """A DETR-like model: a dict with ``pred_logits`` (B, Q, C), classes on the last dim."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        queries = x.flatten(2)[..., :8].reshape(x.shape[0], -1, 8)
        return {"pred_logits": self.head(self.norm(queries)), "pred_boxes": torch.sigmoid(queries[..., :4])}


def test_dict_outputs_with_classes_on_the_last_dim_and_reconstructions():
    model = seeded(SetPredictor).train()
    with torch.no_grad():
        logits = model(torch.stack(_images(2)))["pred_logits"]
    report = run_ttt(TensorAdapter(model), _images(2), TTTConfig(enabled=True, batch_size=2, lr=1e-2, seed=0))
    assert report.steps_run == 1 and report.losses[0] > 0
    p = torch.softmax(logits, -1)
    assert report.losses[0] == pytest.approx(float(-(p * p.log()).sum(-1).mean()), rel=1e-5)

    class DictAutoencoder(TinyAutoencoder):
        def forward(self, x):
            return {"recon": super().forward(x), "logits": x.mean((2, 3))}

    mim = TTTConfig(enabled=True, method="mim", batch_size=2, lr=1e-2, mim_patch_size=4, seed=0)
    assert run_ttt(TensorAdapter(seeded(DictAutoencoder)), [x.sigmoid() for x in _images(2)], mim).steps_run == 1


def test_run_ttt_mim_optimizer_recon_fn_loss_fn_generator_and_helpers():
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    calls = []

    def recon_fn(module, masked):
        calls.append(masked.shape)
        return module(masked)

    def loss_fn(pred, target, mask):
        return ((pred - target).abs() * mask).sum() / mask.sum().clamp_min(1)

    model = seeded(TinyAutoencoder)
    result = run_ttt_mim(model, x, steps=2, patch_size=4, optimizer="sgd", lr=0.1, recon_fn=recon_fn, loss_fn=loss_fn,
                         generator=torch.Generator().manual_seed(3))
    assert len(result.losses) == 2 and calls and 0 < result.mask_ratio < 1
    again = run_ttt_mim(seeded(TinyAutoencoder), x, steps=2, patch_size=4, optimizer=optim.sgd(0.1), recon_fn=recon_fn,
                        loss_fn=loss_fn, generator=torch.Generator().manual_seed(3))
    assert again.losses == result.losses  # the same generator draws the same masks
    assert isinstance(ttt_mim_step(seeded(TinyAutoencoder), x, patch_size=4, seed=0), float)
    lora = select_parameters(model, "lora_only")
    assert [id(p) for p in lora] == [id(model.lora.down.weight), id(model.lora.up.weight)]
    mask = torch.zeros(2, 16, 16, dtype=torch.bool)
    mask[1, :4, :4] = True
    out = apply_mask(x, mask, mask_value=-1.0)
    assert torch.equal(out[0], x[0]) and bool((out[1, :, :4, :4] == -1).all())
    assert torch.equal(out[1, :, 4:], x[1, :, 4:])


class LoRALinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.base = nn.Linear(4, 4)
        self.lora_A = nn.Linear(4, 2, bias=False)
        self.lora_B = nn.Linear(2, 4, bias=False)


def test_adapter_filters_never_select_the_base_weights_a_lora_wraps():
    model = nn.Sequential()
    model.add_module("proj", LoRALinear())
    for name in ("lora_only", "adapter_only"):
        assert filters.select(model, name) == ["proj.lora_A.weight", "proj.lora_B.weight"]


def _args(*flags):
    from yolozu.cli.export import build_parser

    return build_parser().parse_args(["--dataset", "d", "--output", "o", *flags])


def test_auto_preset_for_a_plain_ttt():
    assert apply_ttt_preset_args(_args("--ttt")).ttt_preset == "safe"
    assert apply_ttt_preset_args(_args("--ttt", "--ttt-method", "mim")).ttt_preset == "mim_safe"
    assert apply_ttt_preset_args(_args("--ttt", "--ttt-method", "eata")).ttt_preset == "eata_safe"
    assert apply_ttt_preset_args(_args("--ttt", "--ttt-method", "sar")).ttt_preset == "sar_safe"
    assert apply_ttt_preset_args(_args("--ttt", "--ttt-lr", "1e-3")).ttt_preset is None
    # a setting only the papers' presets set keeps the auto-preset, as before they existed
    assert apply_ttt_preset_args(_args("--ttt", "--ttt-optimizer", "sgd")).ttt_preset == "safe"
    assert apply_ttt_preset_args(_args("--ttt", "--ttt-preset", "adapter_only")).ttt_preset == "adapter_only"
    assert apply_ttt_preset_args(_args()).ttt_preset is None
    assert {"eata_safe", "sar_safe"} <= set(PRESETS) and isinstance(apply_ttt_preset_args(argparse.Namespace()), object)


def test_adapter_hooks_and_a_yolozu_style_adapter_with_ttt():
    assert ModelAdapter().get_model() is None and not DummyAdapter().supports_ttt()
    with pytest.raises(NotImplementedError, match="build_loader"):
        ModelAdapter().build_loader([], batch_size=1)
    model = seeded(TinyClassifier)
    adapter = TensorAdapter(model)  # predict, get_model and build_loader only
    before = snapshot(model)
    predictions, report = adapt_and_predict(adapter, _images(4), TTTConfig(enabled=True, batch_size=2, lr=1e-2))
    assert len(predictions) == 4 and report.steps_run == 1
    assert any(not torch.equal(before[k], v) for k, v in snapshot(model).items())  # adapted, then its own predict
    with pytest.raises(ValueError, match="no load_batch"):
        adapt_and_predict(adapter, _images(4), TTTConfig(enabled=True, schedule="online"))


def test_cli_flags_of_every_method_and_appending_augmentations():
    from yolozu.cli.export import ttt_config

    flags = ["--ttt", "--ttt-method", "eata", "--ttt-eata-conf-min", "0.3", "--ttt-eata-max-skip-streak", "5",
             "--ttt-sar-rho", "0.1", "--ttt-sar-adaptive", "--ttt-cotta-augmentations", "identity",
             "--ttt-cotta-augmentations", "hflip", "--ttt-mask-prob", "0.4"]
    c = ttt_config(_args(*flags))
    assert (c.eata_conf_min, c.eata_max_skip_streak, c.sar_rho, c.sar_adaptive) == (0.3, 5, 0.1, True)
    assert c.cotta_augmentations == ("identity", "hflip") and c.mim_mask_prob == 0.4


def test_ttt_log_out_needs_ttt_and_carries_a_timestamp(tmp_path):
    from yolozu.cli.export import main

    dataset = tmp_path / "data"
    (dataset / "images" / "val").mkdir(parents=True)
    (dataset / "labels" / "val").mkdir(parents=True)
    from PIL import Image

    Image.new("RGB", (8, 8)).save(dataset / "images" / "val" / "a.png")
    (dataset / "labels" / "val" / "a.txt").write_text("")
    out, log = tmp_path / "p.json", tmp_path / "log.json"
    code = main(["--dataset", str(dataset), "--output", str(out), "--ttt-log-out", str(log), "--quiet"])
    assert code == 2 and not out.exists() and not log.exists()
    code = main(["--adapter", "detector", "--dataset", str(dataset), "--output", str(out), "--ttt", "--ttt-log-out",
                 str(log), "--quiet"])
    assert code == 0 and json.loads(log.read_text())["timestamp"]
    assert json.loads(log.read_text())["ttt"]["preset"] == "safe"  # the auto-preset of a plain --ttt
