"""YOLOZU 4.12's test-time training surface: cli_options, method profiles, presets and their rules, the new
TTTConfig fields, detector-response selection, the TTA base names and modes, and an export per preset."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import types

import attrs
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from yolozu.cli.export import build_parser, main
from yolozu.functional import optim
from yolozu.tta.config import POSITIONAL_TAIL, SUPPORTED_TTT_METHODS, TTTConfig

YOLOZU_412_PRESETS = ("safe", "adapter_only", "mim_safe", "cotta_safe", "eata_safe", "sar_safe",
                      "detector_response_safe", "pose_safe", "keypoints_safe", "depth_safe", "seg_safe",
                      "pose_mim")  # fmt: skip
"""YOLOZU 4.12's presets (the project adds the papers' own)."""


def _ns(*flags):
    parser = argparse.ArgumentParser(add_help=False)
    from yolozu.tta.cli_options import add_ttt_arguments

    add_ttt_arguments(parser, include_enable_flag=True)
    return parser.parse_args(list(flags))


def test_cli_options_builders_round_trip_through_the_export_flags():
    from yolozu.tta.cli_options import (
        TTT_PRESET_CHOICES,
        build_ttt_cli_args,
        build_ttt_config_from_args,
        build_ttt_settings_from_args,
    )

    ns = _ns("--ttt", "--ttt-method", "eata", "--ttt-sdft-task", "depth", "--ttt-aux-seg-weight", "0.5",
             "--ttt-response-min-selected", "3", "--ttt-eata-conf-min", "0.3")  # fmt: skip
    config = build_ttt_config_from_args(ns)
    assert (config.enabled, config.method, config.sdft_task, config.aux_seg_weight) == (True, "eata", "depth", 0.5)
    settings = build_ttt_settings_from_args(ns)
    assert settings["aux"]["seg_weight"] == 0.5 and settings["detector_response"]["min_selected"] == 3
    assert settings["eata"]["conf_min"] == 0.3 and settings["include"] is None
    argv = build_ttt_cli_args(ns)
    again = build_ttt_config_from_args(_ns(*argv))
    assert again == config
    assert set(YOLOZU_412_PRESETS) <= set(TTT_PRESET_CHOICES) and build_ttt_cli_args(_ns()) == []
    # the export's flags are the same declaration: every cli_options flag is an export flag
    export_flags = {a.dest for a in build_parser()._actions}
    assert set(vars(_ns())) <= export_flags


def test_new_fields_in_yolozus_order_validated_and_in_meta_groups():
    names = [f.name for f in attrs.fields(TTTConfig)]
    start = names.index("aux_pose_weight")
    assert tuple(names[start : start + len(POSITIONAL_TAIL)]) == POSITIONAL_TAIL
    assert names.index("sar_first_step_scale") < start < names.index("preset")
    for field, value in (("aux_pose_weight", -1.0), ("sdft_task", "legs"), ("response_conf_min", 1.5),
                         ("response_min_selected", 0), ("aux_temperature", 0.0)):  # fmt: skip
        with pytest.raises(ValueError, match=field):
            TTTConfig(**{field: value})
    with pytest.raises(ValueError, match="response_topk"):
        TTTConfig(response_topk=1, response_min_selected=2).method_settings()
    grouped = TTTConfig(detector_response=True, aux_depth_weight=0.25).grouped()
    assert grouped["tent"]["detector_response"] is True and grouped["tent"]["aux_depth_weight"] == 0.25
    assert set(SUPPORTED_TTT_METHODS) >= {"tent", "mim", "cotta", "eata", "sar"}


def test_method_profiles_are_copies_and_unknown_fails_closed():
    from yolozu.tta.method_profiles import TTT_METHOD_PROFILES, get_ttt_method_profile

    profile = get_ttt_method_profile("tent")
    profile["loss"]["detector_logits"]["scope"] = "changed"
    assert TTT_METHOD_PROFILES["tent"]["loss"]["detector_logits"]["scope"] != "changed"
    assert get_ttt_method_profile("tent", detector_response=True)["abstention"]["report_fields"]
    assert TTT_METHOD_PROFILES["mim"]["efficacy"] == "no_gain_measured"
    with pytest.raises(ValueError, match="unknown TTT method profile"):
        get_ttt_method_profile("nope")
    with pytest.raises(ValueError, match="only for tent"):
        get_ttt_method_profile("sar", detector_response=True)


def _plain(**over):
    values = dict(ttt=True, ttt_preset=None, ttt_method=None, ttt_steps=None, ttt_batch_size=None, ttt_lr=None,
                  ttt_update_filter=None, ttt_max_batches=None, ttt_max_grad_norm=None, ttt_max_update_norm=None,
                  ttt_max_total_update_norm=None, ttt_max_loss_ratio=None, ttt_max_loss_increase=None)  # fmt: skip
    values.update(over)
    return types.SimpleNamespace(**values)


@pytest.mark.parametrize(
    "over,preset,method,filt",
    [
        ({}, "safe", "tent", "norm_only"),
        ({"ttt_method": "sar"}, "sar_safe", "sar", "lora_only"),
        ({"ttt_method": "eata"}, "eata_safe", "eata", "lora_norm_only"),
        ({"ttt_sdft_task": "pose"}, "pose_safe", "tent", "lora_norm_only"),
        ({"ttt_sdft_task": "pose", "ttt_method": "mim"}, "pose_mim", "mim", "adapter_only"),
        ({"ttt_update_filter": "adapter_only"}, None, None, "adapter_only"),
    ],
)
def test_a_plain_ttt_picks_task_then_method_then_filter(over, preset, method, filt):
    from yolozu.tta.presets import apply_ttt_preset_args

    args = apply_ttt_preset_args(_plain(**over))
    assert (args.ttt_preset, args.ttt_method, args.ttt_update_filter) == (preset, method, filt)
    assert args.ttt_max_grad_norm is not None and args.ttt_max_loss_ratio == 3.0


def test_customised_core_knobs_keep_theirs_and_get_the_guards_and_a_preset_sets_the_core():
    from yolozu.tta.presets import apply_ttt_preset_args

    args = apply_ttt_preset_args(_plain(ttt_steps=5))
    assert (args.ttt_preset, args.ttt_steps, args.ttt_max_update_norm, args.ttt_max_loss_ratio) == (None, 5, 1.0, 3.0)
    args = apply_ttt_preset_args(_plain(ttt_preset="detector_response_safe", ttt_lr=1e-2, ttt_max_update_norm=0.5))
    assert (args.ttt_lr, args.ttt_steps, args.ttt_detector_response, args.ttt_max_update_norm) == (5e-5, 3, True, 0.5)


def test_requirements_fail_before_the_model_with_an_example():
    from yolozu.tta.presets import validate_ttt_lora_requirements, validate_ttt_requirements

    with pytest.raises(ValueError, match="--lora-r 4 --ttt --ttt-preset sar_safe"):
        validate_ttt_lora_requirements(_plain(ttt_update_filter="lora_only"))
    validate_ttt_lora_requirements(_plain(ttt_update_filter="lora_only", lora_r=4))
    with pytest.raises(ValueError, match="top-k 0 or >= min-selected"):
        validate_ttt_requirements(_plain(ttt_detector_response=True, ttt_response_topk=1, ttt_response_min_selected=2))


def test_foreground_selection_and_response_loss_with_abstention():
    from yolozu.response_selection import detector_response_loss, select_foreground_queries

    teacher = torch.tensor([[[4.0, 0.0, -1.0], [0.0, 0.0, 3.0], [2.0, 1.0, 0.0]]])
    assert select_foreground_queries(teacher, confidence_min=0.5, topk=1).mask.tolist() == [[True, False, False]]
    assert select_foreground_queries(teacher, confidence_min=0.5, topk=0).mask.tolist() == [[True, False, True]]
    student = {"logits": torch.zeros(1, 3, 3, requires_grad=True), "bbox": torch.ones(1, 3, 4, requires_grad=True)}
    loss, m = detector_response_loss(student, {"logits": teacher, "bbox": torch.zeros(1, 3, 4)}, confidence_min=0.5,
                                     topk=5, class_weight=1.0, bbox_weight=1.0, entropy_weight=0.05)  # fmt: skip
    loss.backward()
    assert m["response_selected_queries"] == 2.0 and m["response_abstained"] == 0.0 and loss.item() > 0
    assert student["bbox"].grad.abs().sum() > 0
    loss, m = detector_response_loss(student, {"logits": teacher}, confidence_min=0.5, topk=5, min_selected=3,
                                     class_weight=1.0, bbox_weight=1.0, entropy_weight=0.05)  # fmt: skip
    assert loss.item() == 0.0 and m["response_abstained"] == 1.0


class _Queries(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.BatchNorm1d(4)
        self.cls = nn.Linear(4, 3)
        self.box = nn.Linear(4, 4)

    def forward(self, x):
        hidden = self.norm(x).unsqueeze(1).repeat(1, 2, 1)
        return {"logits": self.cls(hidden) + torch.tensor([3.0, 0.0, 0.0], device=x.device), "bbox": self.box(hidden)}


def test_tent_detector_response_adapts_and_abstains_keeping_weights_and_buffers():
    from yolozu.tta.tent import TentConfig, TentRunner

    torch.manual_seed(0)
    model = _Queries()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 4)
    runner = TentRunner(model, TentConfig(lr=1e-2, update_filter="all", detector_response=True, response_conf_min=1.0))
    row = runner.adapt_step(x)
    assert row["update_abstained"] == 1.0 and row["buffers_restored_on_abstention"] == 1.0
    assert (row["forward_calls"], row["backward_calls"], row["optimizer_steps"]) == (2, 0, 0)  # no backward run
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    runner = TentRunner(model, TentConfig(lr=1e-2, update_filter="all", detector_response=True))
    row = runner.adapt_step(x)
    assert row["update_abstained"] == 0.0 and row["response_selected_queries"] > 0
    assert (row["forward_calls"], row["backward_calls"], row["optimizer_steps"]) == (2, 1, 1)
    assert not torch.equal(model.cls.weight, before["cls.weight"])


def test_tent_detector_response_on_the_built_in_detectors_top_k_peaks():
    from yolozu.adapters.detector import DetectorAdapter
    from yolozu.tta.tent import TentConfig, TentRunner

    adapter = DetectorAdapter()
    model = adapter.get_model()
    runner = TentRunner(model, TentConfig(update_filter="norm_only", detector_response=True, response_conf_min=0.0),
                        readout=adapter.ttt_readout())  # fmt: skip
    row = runner.adapt_step(torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)))
    assert 0 < row["response_selected_queries"] <= 20 and row["update_abstained"] == 0.0


def test_tta_base_mirror_is_seeded_per_detection_and_lazy_package():
    code = "import sys, yolozu.tta as t; t.TTTConfig; print('yolozu.tta.tent' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
    from yolozu.tta import TTAConfig, TTARunner, apply_tta_transform

    entry = {"image": "x.jpg", "image_size": [100, 50], "detections": [
        {"bbox": {"cx": 0.2, "cy": 0.3, "w": 0.1, "h": 0.1}, "bbox_abs": {"cx": 20.0}, "offsets": [1.0, 2.0],
         "keypoints": [[0.1, 0.5], [0.7, 0.5]]}] * 20}  # fmt: skip
    config = TTAConfig(enabled=True, seed=3, flip_prob=0.5, keypoint_swap_pairs=[(0, 1)])
    out = apply_tta_transform([entry], config=config)
    again = apply_tta_transform([entry], config=TTAConfig(enabled=True, seed=3, flip_prob=0.5))
    mask = out.entries[0]["tta_mask"]
    assert mask == again.entries[0]["tta_mask"] and 0 < sum(mask) < 20
    flipped = out.entries[0]["detections"][mask.index(True)]
    assert flipped["bbox"]["cx"] == pytest.approx(0.8) and flipped["bbox_abs"]["cx"] == 80.0
    assert flipped["offsets"] == [-1.0, 2.0] and flipped["keypoints"][1][0] == pytest.approx(0.9)
    assert entry["detections"][0]["bbox"]["cx"] == 0.2
    with pytest.raises(NotImplementedError):
        TTARunner().adapt_step(None)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    (root / "images" / "val").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(root / "images" / "val" / "a.png")
    return root


def _run(tmp_path, tiny, *flags):
    out = tmp_path / "p.json"
    code = main(["--adapter", "detector", "--dataset", str(tiny), "--output", str(out), "--wrap", "--quiet",
                 "--workers", "0", *flags])  # fmt: skip
    return code, out


YOLOZU_412_FLAGS = ("--ttt-sdft-task", "depth", "--ttt-aux-depth-weight", "0.1", "--ttt-aux-temperature", "1.0",
                    "--ttt-response-topk", "20", "--ttt-response-min-selected", "1", "--ttt-response-conf-min", "0.2",
                    "--tta", "--tta-mode", "model", "--tta-model-merge-iou", "0.5", "--tta-flip-keypoints",
                    "--tta-flip-pose-offsets", "--tta-keypoint-swap-pairs", "1:2")  # fmt: skip


@pytest.mark.parametrize("preset", YOLOZU_412_PRESETS)
def test_export_runs_each_preset_with_yolozu_412s_flags(tmp_path, tiny, preset, capsys):
    lora = ["--lora-r", "4"] if any("--lora-r" in a.option_strings for a in build_parser()._actions) else []
    code, out = _run(tmp_path, tiny, "--ttt", "--ttt-preset", preset, *lora, *YOLOZU_412_FLAGS)
    if preset == "sar_safe" and not lora:  # lora_only needs LoRA: refused before the model is built
        assert code != 0 and "--lora-r" in capsys.readouterr().err and not out.exists()
        return
    assert code == 0, capsys.readouterr().err
    meta = json.loads(out.read_text())["meta"]
    assert (meta["ttt"]["preset"], meta["ttt"]["sdft_task"], meta["ttt"]["tent"]["aux_depth_weight"]) == (
        preset, "depth", 0.1
    )
    assert meta["ttt"]["tent"]["detector_response"] == (preset == "detector_response_safe")
    assert meta["tta"]["mode"] == "model" and meta["tta"]["keypoint_swap_pairs"] == [[1, 2]]


def test_export_postprocess_mode_mirrors_detections_with_yolozus_default(tmp_path, tiny):
    code, out = _run(tmp_path, tiny, "--tta", "--tta-mode", "postprocess", "--tta-seed", "1")
    assert code == 0
    tta = json.loads(out.read_text())["meta"]["tta"]
    assert (tta["mode"], tta["flip_prob"]) == ("postprocess", 0.5) and "applied_ratio" in tta
    with pytest.raises(SystemExit) as exit_:
        _run(tmp_path, tiny, "--tta", "--tta-keypoint-swap-pairs", "1-2")
    assert exit_.value.code == 2


def _images(n, size=8):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(3, size, size, generator=g) for _ in range(n)]


@pytest.mark.parametrize(
    "method,extra,calls,keys",
    [
        ("tent", {}, (1, 1), ("loss_total",)),
        ("cotta", {"cotta_restore_prob": 0.0}, (4, 1), ("consistency_mse", "ema_momentum", "restored_count", "aug")),
        ("eata", {"eata_conf_min": 0.0, "eata_entropy_min": 0.0, "eata_e_margin": 10.0, "eata_min_valid_dets": 0},
         (1, 1),
         ("selected_count", "batch_count", "skip_reason", "skip_streak", "adapt_loss", "anchor_loss", "mean_conf",
          "mean_entropy")),
        ("sar", {"sar_e_margin": 10.0}, (2, 2), ("loss_first", "loss_second", "sar_rho", "sar_rho_applied")),
        ("mim", {"mim_patch_size": 4, "mim_mask_prob": 0.5}, (1, 1), ("mim_loss", "mask_ratio")),
    ],
)  # fmt: skip
def test_report_counts_passes_and_steps_and_rows_carry_yolozus_keys(method, extra, calls, keys):
    from tests.toy import TensorAdapter, TinyAutoencoder, TinyClassifier, seeded
    from yolozu.tta.integration import run_ttt

    config = TTTConfig(enabled=True, method=method, steps=3, lr=1e-2, batch_size=2, seed=0, **extra)
    model = seeded(TinyAutoencoder if method == "mim" else TinyClassifier)
    report = run_ttt(TensorAdapter(model), _images(2), config)
    assert (report.forward_calls, report.backward_calls) == (3 * calls[0], 3 * calls[1])
    assert report.optimizer_steps == 3 and report.update_ratio == 1.0 and report.abstained_steps == 0
    assert report.method_profile["paper"] and report.memory["metric"] in ("peak_rss_bytes", "peak_allocated_bytes")
    for row in report.step_metrics:
        assert set(keys) <= set(row)
        assert all(v is None or not isinstance(v, float) or v == v for v in row.values()), row  # no NaN
    summary = report.to_dict()
    assert summary["loss_summary"]["count"] == 3 and summary["abstention_ratio"] == 0.0


def test_an_unstepped_sar_row_has_no_nan_and_zero_steps_keep_yolozus_loss_summary():
    from tests.toy import TensorAdapter, TinyClassifier, seeded
    from yolozu.tta.integration import run_ttt
    from yolozu.tta.report import TTTReport

    # a tiny e_margin: no sample is reliable, so the steps are taken on zero gradients (the reference's) and the
    # loss average is never set
    config = TTTConfig(enabled=True, method="sar", steps=2, lr=1e-2, batch_size=2, seed=0, sar_e_margin=1e-9)
    report = run_ttt(TensorAdapter(seeded(TinyClassifier)), _images(2), config)
    first = report.step_metrics[0]
    assert first["ema_loss"] is None and "ema_loss" not in first["non_finite_fields"]
    assert report.optimizer_steps == 2 and report.update_ratio == 1.0 and report.forward_calls == 4
    empty = TTTReport(enabled=True, method="tent", reset="stream").to_dict()["loss_summary"]
    assert empty == {"count": 0, "min": None, "mean": None, "max": None, "last": None, "first": None}


def test_the_sample_mode_report_lists_each_adapted_image(tmp_path, tiny):
    code, out = _run(tmp_path, tiny, "--ttt", "--ttt-reset", "sample", "--ttt-steps", "2", "--ttt-lr", "1e-3")
    assert code == 0
    report = json.loads(out.read_text())["meta"]["ttt"]["report"]
    assert (report["mode"], report["samples_total"], report["samples_kept"]) == ("sample", 1, 1)
    (only,) = report["per_sample"]
    assert only["index"] == 0 and only["image"].endswith("a.png")
    assert only["report"]["steps_run"] == len(only["report"]["losses"]) >= 1


class _MultiTask(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(4)
        self.cls = nn.Linear(4, 3)
        self.pose = nn.Linear(4, 6)
        self.calls = []

    def forward(self, x):
        self.calls.append((self.bn.training, x.detach().clone()))
        h = self.bn(x)
        return {"logits": self.cls(h), "rot6d": self.pose(h)}


def test_tent_runner_keys_aux_consistency_on_the_current_batch_and_both_resets():
    from yolozu.tta.tent import TentConfig, TentRunner

    torch.manual_seed(0)
    model = _MultiTask()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    runner = TentRunner(model, config=TentConfig(lr=1e-2, aux_pose_weight=1.0))
    assert runner._has_aux and not TentRunner(_MultiTask())._has_aux
    first, second = torch.full((2, 4), 0.2) + torch.eye(2, 4), torch.full((2, 4), 0.8) - torch.eye(2, 4)
    rows = [runner.adapt_step(first), runner.adapt_step(second)]
    for row in rows:
        assert row["loss_aux_consistency"] > 0 and row["aux_rot6d"] > 0 and row["aux_target_current_batch"] == 1.0
        assert (row["forward_calls"], row["backward_calls"], row["optimizer_steps"]) == (2, 1, 1.0)
        assert row["loss_total"] == row["loss"] and row["update_abstained"] == 0.0
    # the target is the frozen model on this very batch (stored statistics: eval), the student the weak view
    assert [training for training, _ in model.calls] == [False, True, False, True]
    assert torch.equal(model.calls[0][1], first) and torch.equal(model.calls[2][1], second)
    assert not torch.equal(model.calls[1][1], first) and model.calls[1][1].shape == first.shape
    adapted = {k: v.clone() for k, v in model.state_dict().items()}
    runner.reset()  # YOLOZU's: the adapted weights stay
    assert all(torch.equal(v, adapted[k]) for k, v in model.state_dict().items())
    runner.reset(source=True)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_benchmark_recipes_export_flags_give_the_recipes_config_under_the_preset_rules():
    from yolozu.cli.export import ttt_config
    from yolozu.demo.bench import recipes
    from yolozu.tta.presets import apply_ttt_preset_args

    for name, recipe in recipes.RECIPES.items():
        if recipe.ttt is None:
            continue
        args = apply_ttt_preset_args(build_parser().parse_args(["--dataset", "d", "--output", "o",
                                                                *recipes.export_flags(name)]))  # fmt: skip
        assert ttt_config(args) == TTTConfig(**{"enabled": True, "seed": 0, **recipe.ttt}), name


def test_a_plain_ttt_with_customised_steps_exports_guarded(tmp_path, tiny):
    code, out = _run(tmp_path, tiny, "--ttt", "--ttt-steps", "2")
    assert code == 0
    ttt = json.loads(out.read_text())["meta"]["ttt"]
    assert (ttt["preset"], ttt["steps"], ttt["update_filter"]) == (None, 2, "all")  # the core knobs as given
    assert (ttt["max_grad_norm"], ttt["max_update_norm"], ttt["max_total_update_norm"], ttt["max_loss_ratio"]) == (
        1.0, 1.0, 1.0, 3.0
    )  # safe's guards


def test_tent_detector_response_on_a_torchvision_detectors_candidates(tmp_path):
    from yolozu.adapters.tv_adapter import TorchvisionAdapter
    from yolozu.demo.tv_detector import build_fcos_small
    from yolozu.tta.engine import Adaptation

    torch.manual_seed(0)
    model = build_fcos_small(6).eval()
    fcos = TorchvisionAdapter(model, image_size=64)
    view, readout = fcos.get_model(), fcos.ttt_readout()
    config = TTTConfig(enabled=True, update_filter="norm_only", lr=1e-3, detector_response=True, response_conf_min=0.0,
                       response_topk=5, seed=0)  # fmt: skip
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    # an untrained FCOS scores every candidate near its 0.01 prior: no foreground, so the step abstains
    (row,) = Adaptation(view, config, readout).adapt(x, 0, 1)
    assert (row["response_selected_queries"], row["update_abstained"], row["update_norm"]) == (0.0, 1.0, 0.0)
    with torch.no_grad():  # confident candidates (sigmoid 0.88): the teacher's five best are selected
        model.head.classification_head.cls_logits.bias.fill_(2.0)
    (row,) = Adaptation(view, config, readout).adapt(x, 0, 1)
    assert row["response_selected_queries"] == 5 and row["update_abstained"] == 0.0 and row["update_norm"] > 0


@pytest.mark.parametrize("abstain", [True, False])
def test_an_abstaining_eager_update_runs_no_backward(abstain):
    from yolozu.functional.step import LossOutput, Method, make_update

    model = nn.Linear(3, 2)
    backwards = []

    def loss_fn(params, buffers, batch, extra):
        loss = torch.func.functional_call(model, params, (batch,)).square().mean()
        loss.register_hook(lambda grad: backwards.append(1))
        return loss, LossOutput(buffers, {"abstain": torch.tensor(abstain)}, loss.detach())

    method = Method(loss_fn, optim.sgd(0.1), metric_names=("abstain",), abstains=lambda m: m["abstain"])
    state = method.init_state(model, ["weight"])
    _, metrics = make_update(method)(state, torch.ones(4, 3))
    assert (len(backwards), float(metrics["backward_passes"])) == ((0, 0.0) if abstain else (1, 1.0))
    make_update(method, differentiate="func")(state, torch.ones(4, 3))  # a transform cannot branch: it runs
    assert len(backwards) == (1 if abstain else 2)


def test_process_memory_is_unavailable_without_the_resource_module(monkeypatch):
    from yolozu.tta import memory

    monkeypatch.setattr(memory, "resource", None)
    assert memory._process_peak_rss_bytes() is None
    assert memory._memory_start(nn.Linear(1, 1)) == {
        "backend": "unavailable", "metric": None, "reason": "resource_module_unavailable"}


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_on_cuda_the_report_reads_the_allocator_and_an_abstained_step_runs_no_backward():
    from tests.toy import TensorAdapter, TinyClassifier, seeded
    from yolozu.tta.integration import run_ttt

    images = [x.cuda() for x in _images(2)]
    config = TTTConfig(enabled=True, method="tent", steps=2, lr=1e-2, batch_size=2, seed=0)
    report = run_ttt(TensorAdapter(seeded(TinyClassifier).cuda()), images, config)
    memory = report.memory
    assert (memory["backend"], memory["metric"]) == ("torch_cuda", "peak_allocated_bytes")
    assert memory["peak_allocated_bytes"] >= memory["start_allocated_bytes"] > 0
    from yolozu.tta.tent import TentConfig, TentRunner

    config = TentConfig(update_filter="all", detector_response=True, response_conf_min=1.0)
    runner = TentRunner(_Queries().cuda(), config)
    row = runner.adapt_step(torch.randn(4, 4, device="cuda"))
    assert (row["update_abstained"], row["backward_calls"], row["optimizer_steps"]) == (1.0, 0, 0)
