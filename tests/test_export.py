"""tools/export_predictions.py: flags, the no-TTT path, TTT schedules, TTA, determinism and errors."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from yolozu.adapters.detector import DetectorAdapter
from yolozu.cli.export import build_parser, main
from yolozu.data import build_manifest
from yolozu.demo.data import write_corrupted_split
from yolozu.demo.synth import SynthSpec, render_sample, write_split
from yolozu.io.predictions import validate_predictions
from yolozu.tta.methods import METHODS

ROOT = Path(__file__).resolve().parents[1]

SPEC_FLAGS = [
    "--ttt",
    "--ttt-method",
    "--ttt-steps",
    "--ttt-lr",
    "--ttt-batch-size",
    "--ttt-max-batches",
    "--ttt-update-filter",
    "--ttt-mask-prob",
    "--ttt-patch-size",
    "--ttt-mask-value",
    "--ttt-log-out",
]
ISSUE_FLAGS = [
    "--adapter",
    "--checkpoint",
    "--model",
    "--num-classes",
    "--frozen-bn-eps",
    "--image-size",
    "--dataset",
    "--split",
    "--output",
    "--wrap",
    "--max-images",
    "--batch-size",
    "--device",
    "--workers",
    "--deterministic",
    "--seed",
    "--quiet",
    "--tta",
    "--tta-log-out",
    "--tta-seed",
    "--tta-flip-prob",
    "--tta-norm-only",
    "--ttt-preset",
    "--ttt-reset",
    "--ttt-schedule",
    "--ttt-seed",
    "--ttt-include",
    "--ttt-exclude",
    "--ttt-max-grad-norm",
    "--ttt-max-update-norm",
    "--ttt-max-total-update-norm",
    "--ttt-max-loss-ratio",
    "--ttt-max-loss-increase",
    "--ttt-stop-on-non-finite",
    "--no-ttt-stop-on-non-finite",
    "--ttt-rollback-on-stop",
    "--no-ttt-rollback-on-stop",
    "--ttt-cotta-ema-momentum",
    "--ttt-cotta-augmentations",
    "--ttt-cotta-aggregation",
    "--ttt-cotta-restore-prob",
    "--ttt-cotta-restore-interval",
]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """Four demo images and a fog-5 copy of them."""
    root = tmp_path_factory.mktemp("demo")
    write_split(root, "val", 4, seed=3, spec=SynthSpec(image_size=160))
    write_corrupted_split(root, "fog", 5, seed=0)
    return root


def _export(tmp_path, dataset, *args, name="p.json"):
    out = tmp_path / name
    code = main(
        [
            "--adapter",
            "detector",
            "--dataset",
            str(dataset),
            "--split",
            "val-fog-5",
            "--output",
            str(out),
            "--quiet",
            *args,
        ]
    )
    return code, out


def test_help_lists_every_flag():
    text = build_parser().format_help()
    for flag in SPEC_FLAGS + ISSUE_FLAGS:
        assert flag in text, flag
    assert {"tent", "mim", "cotta", "eata", "sar"} <= set(METHODS)
    for choices in (
        ",".join(METHODS),
        "all,norm_only,adapter_only,lora_only,lora_norm_only,norm_but_top",
        "stream,sample",
        "pre,online",
        "adapter_only,cotta_paper,cotta_safe,depth_safe,detector_response_safe,eata_paper,eata_safe,keypoints_safe,"
        "mim_safe,pose_mim,pose_safe,safe,sar_safe,seg_safe",
    ):
        assert "{" + choices + "}" in text, choices
    assert "detector, dummy, torchvision" in text and "package.module:factory" in text


def test_tools_script_and_console_command_run(tmp_path, dataset):
    script = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "export_predictions.py"), "--help"], capture_output=True, text=True
    )
    assert script.returncode == 0 and "--ttt-update-filter" in script.stdout
    from yolozu.cli import main as cli

    out = tmp_path / "cli.json"
    assert cli(["export", "--dataset", str(dataset), "--split", "val", "--output", str(out), "--quiet"]) == 0
    assert len(json.loads(out.read_text())) == 4


def test_dummy_smoke_wraps_with_ttt_disabled(tmp_path, dataset):
    out = tmp_path / "dummy.json"
    assert (
        main(
            [
                "--adapter",
                "dummy",
                "--dataset",
                str(dataset),
                "--split",
                "val",
                "--output",
                str(out),
                "--wrap",
                "--quiet",
            ]
        )
        == 0
    )
    doc = json.loads(out.read_text())
    assert set(doc) == {"schema_version", "predictions", "meta"}
    assert doc["meta"]["ttt"]["enabled"] is False and doc["meta"]["ttt"]["report"] is None
    assert doc["meta"]["tta"]["enabled"] is False
    assert [p["detections"] for p in doc["predictions"]] == [[]] * 4


def test_dummy_with_ttt_fails_clearly_and_writes_nothing(tmp_path, dataset, capsys):
    out = tmp_path / "never.json"
    code = main(
        ["--adapter", "dummy", "--dataset", str(dataset), "--split", "val", "--output", str(out), "--ttt", "--quiet"]
    )
    err = capsys.readouterr().err
    assert code != 0
    assert err.startswith("TTT failed:") and "get_model()" in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_without_ttt_output_is_the_adapters_plain_predict_and_the_model_is_untouched(tmp_path, dataset):
    code, out = _export(tmp_path, dataset)
    assert code == 0
    adapter = DetectorAdapter()
    before = {k: v.clone() for k, v in adapter.get_model().state_dict().items()}
    plain = adapter.predict(build_manifest(dataset, "val-fog-5"))
    assert out.read_bytes() == (json.dumps(plain, allow_nan=False) + "\n").encode()
    assert all(torch.equal(v, before[k]) for k, v in adapter.get_model().state_dict().items())


SCHEDULES = [
    ("tent", ["--ttt-schedule", "pre", "--ttt-batch-size", "2"]),
    ("tent", ["--ttt-schedule", "online", "--ttt-batch-size", "2"]),
    ("tent", ["--ttt-schedule", "online", "--ttt-batch-size", "2", "--ttt-online-predict", "adapt_forward"]),
    ("tent", ["--ttt-reset", "sample"]),
    ("mim", ["--ttt-schedule", "pre", "--ttt-batch-size", "2", "--ttt-patch-size", "8"]),
    ("mim", ["--ttt-schedule", "online", "--ttt-batch-size", "2", "--ttt-patch-size", "8"]),
    ("mim", ["--ttt-reset", "sample", "--ttt-patch-size", "8"]),
]


@pytest.fixture(scope="module")
def plain_predictions(dataset):
    return DetectorAdapter().predict(build_manifest(dataset, "val-fog-5"))


@pytest.mark.parametrize("method,flags", SCHEDULES)
def test_ttt_schedules_give_the_schema_report_and_change_predictions(
    tmp_path, dataset, plain_predictions, method, flags
):
    log = tmp_path / "log.json"
    code, out = _export(
        tmp_path,
        dataset,
        "--wrap",
        "--ttt",
        "--ttt-method",
        method,
        "--ttt-lr",
        "1e-3",
        "--ttt-log-out",
        str(log),
        *flags,
    )
    assert code == 0
    doc = json.loads(out.read_text())
    validate_predictions(doc["predictions"])
    ttt = doc["meta"]["ttt"]
    assert ttt["enabled"] and ttt["method"] == method
    report = ttt["report"]
    assert report["updated_param_count"] > 0 and report["steps_run"] > 0 and report["losses"]
    assert (report["mask_ratio"] is not None) == (method == "mim")
    assert doc["predictions"] != plain_predictions
    logged = json.loads(log.read_text())
    assert logged.pop("timestamp").endswith("+00:00") and logged == {"output": str(out), "ttt": ttt}


def test_same_seed_gives_byte_identical_predictions(tmp_path, dataset):
    args = [
        "--ttt",
        "--ttt-method",
        "mim",
        "--ttt-schedule",
        "online",
        "--ttt-batch-size",
        "2",
        "--ttt-lr",
        "1e-3",
        "--ttt-patch-size",
        "8",
        "--ttt-seed",
        "5",
    ]
    _, first = _export(tmp_path, dataset, *args, name="a.json")
    _, second = _export(tmp_path, dataset, *args, name="b.json")
    assert first.read_bytes() == second.read_bytes()
    _, other = _export(tmp_path, dataset, *args[:-1], "6", name="c.json")
    assert other.read_bytes() != first.read_bytes()


def test_a_preset_sets_the_core_settings_and_fills_only_the_unset_guards(tmp_path, dataset):
    # YOLOZU's rule: --ttt-preset overrides the core knobs (lr here); an explicit guard is kept
    args = ("--wrap", "--ttt", "--ttt-preset", "safe", "--ttt-lr", "1e-3", "--ttt-max-update-norm", "2")
    code, out = _export(tmp_path, dataset, *args)
    assert code == 0
    ttt = json.loads(out.read_text())["meta"]["ttt"]
    assert (ttt["preset"], ttt["update_filter"], ttt["lr"], ttt["max_batches"]) == ("safe", "norm_only", 1e-4, 1)
    assert ttt["max_update_norm"] == 2.0 and ttt["max_grad_norm"] == 1.0 and ttt["report"]["batches_used"] == 1


def _confident_boxes_match(first, second, score=0.3):
    """Every confident box of each list has a same-class box in the other with IoU > 0.5 and a close score."""
    from yolozu.inference.flip import iou

    def covered(xs, ys):
        return all(
            any(
                y["class_id"] == x["class_id"]
                and iou(x["bbox"], y["bbox"]) > 0.5
                and abs(x["score"] - y["score"]) < 0.1
                for y in ys
            )
            for x in xs
            if x["score"] > score
        )

    return covered(first, second) and covered(second, first)


def _tta_vs_plain(tmp_path, image: np.ndarray):
    root = tmp_path / "one"
    (root / "images" / "val").mkdir(parents=True)
    Image.fromarray(image).save(root / "images" / "val" / "img.png")
    outs = {}
    for name, extra in (("plain", []), ("tta", ["--tta"])):
        out = tmp_path / f"{name}.json"
        assert main(["--adapter", "detector", "--dataset", str(root), "--output", str(out), "--quiet", *extra]) == 0
        outs[name] = json.loads(out.read_text())[0]["detections"]
    assert any(d["score"] > 0.3 for d in outs["plain"]), "the detector should find digits here"
    return outs["plain"], outs["tta"]


def test_tta_on_a_mirror_symmetric_image_gives_the_same_boxes(tmp_path):
    # A strided CNN trained with flips is flip-equivariant only approximately, hence IoU and score tolerances.
    image, _ = render_sample(np.random.default_rng(0), SynthSpec(image_size=160), "val")
    half = image[:, :80]
    plain, tta = _tta_vs_plain(tmp_path, np.ascontiguousarray(np.concatenate([half, half[:, ::-1]], axis=1)))
    assert _confident_boxes_match(plain, tta)


def test_tta_maps_the_flipped_branch_back_on_an_asymmetric_image(tmp_path):
    image, _ = render_sample(np.random.default_rng(2), SynthSpec(image_size=160), "val")
    image[:, 80:] = 127  # digits on the left only: a missing or double mirroring would put boxes on the right
    plain, tta = _tta_vs_plain(tmp_path, image)
    assert _confident_boxes_match(plain, tta)
    assert all(d["bbox"]["cx"] < 0.55 for d in tta if d["score"] > 0.3)


def test_tta_and_bn_stats_paths_write_their_logs(tmp_path, dataset):
    log = tmp_path / "tta.json"
    code, out = _export(
        tmp_path, dataset, "--tta", "--tta-merge", "nms", "--tta-log-out", str(log), "--bn-stats", "batch"
    )
    assert code == 0
    assert json.loads(log.read_text())["tta"] == {
        "enabled": True,
        "mode": "model",
        "keypoint_swap_pairs": None,
        "flip_keypoints": True,
        "flip_pose_offsets": True,
        "augmentations": ["identity", "hflip"],
        "merge": "nms",
        "iou": 0.55,
        "max_detections": 100,
        "flip_prob": 1.0,
        "seed": 0,
        "norm_only": False,
    }
    validate_predictions(json.loads(out.read_text()))


def test_tta_flip_prob_gives_each_image_the_flip_branch_by_its_seeded_draw(tmp_path, dataset):
    from yolozu.inference.flip import FlipTTAConfig

    names = [Path(r["image"]).name for r in build_manifest(dataset, "val-fog-5")]
    seed = next(s for s in range(50) if len({FlipTTAConfig(flip_prob=0.5, seed=s).flips(n) for n in names}) == 2)
    runs = {}
    half = ["--tta", "--tta-flip-prob", "0.5", "--tta-seed", str(seed), "--tta-norm-only"]
    for name, extra in (("plain", []), ("all", ["--tta"]), ("none", ["--tta", "--tta-flip-prob", "0"]), ("half", half)):
        code, out = _export(tmp_path, dataset, *extra, name=f"{name}.json")
        assert code == 0
        runs[name] = {p["image"]: p["detections"] for p in json.loads(out.read_text())}
    assert runs["none"] == runs["plain"] and runs["all"] != runs["plain"]
    draw = FlipTTAConfig(flip_prob=0.5, seed=seed)  # a seed that gives the fixture's images both outcomes
    chosen = {image: draw.flips(image) for image in runs["half"]}
    assert draw.flips("/elsewhere/" + names[0]) == draw.flips(names[0])  # the file name draws, not the folder
    for image, detections in runs["half"].items():
        assert detections == runs["all" if chosen[image] else "plain"][image]


def test_workers_change_nothing_in_the_output(tmp_path, dataset, capsys):
    outputs = []
    for workers in ("0", "2"):
        code, out = _export(tmp_path, dataset, "--batch-size", "1", "--workers", workers, name=f"w{workers}.json")
        assert code == 0
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1]
    code, out = _export(tmp_path, dataset, "--workers", "-1", name="bad.json")
    assert code == 2 and not out.exists() and "--workers must be >= 0, got -1" in capsys.readouterr().err


def test_flip_draw_is_seeded_per_image_and_near_its_probability():
    from yolozu.inference.flip import FlipTTAConfig

    images = [f"img{i}.png" for i in range(2000)]
    half = [FlipTTAConfig(flip_prob=0.3, seed=1).flips(i) for i in images]
    assert 0.27 < sum(half) / len(images) < 0.33
    assert half == [FlipTTAConfig(flip_prob=0.3, seed=1).flips(i) for i in images]
    assert half != [FlipTTAConfig(flip_prob=0.3, seed=2).flips(i) for i in images]
    assert not any(FlipTTAConfig(flip_prob=0.0).flips(i) for i in images)
    assert all(FlipTTAConfig(flip_prob=1.0).flips(i) for i in images)
    with pytest.raises(ValueError, match=r"flip_prob must be in \[0, 1\]"):
        FlipTTAConfig(flip_prob=1.5)


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--tta-seed", "0"], "--tta-seed applies to --tta only"),
        (["--tta-norm-only"], "--tta-norm-only applies to --tta only"),
        (["--tta", "--tta-flip-prob", "1.5"], r"--tta-flip-prob must be in \[0, 1\]"),
    ],
)
def test_tta_flags_misused_are_usage_errors(tmp_path, dataset, capsys, extra, message):
    code, out = _export(tmp_path, dataset, *extra)
    assert code == 2 and not out.exists()
    assert re.search(message, capsys.readouterr().err)


@pytest.mark.parametrize(
    "case,expected",
    [
        ("missing_dataset", "error:"),
        ("empty_split", "error:"),
        ("unreadable_image", "cannot read image"),
        ("unwritable_output", "error:"),
        ("empty_selection", "TTT failed:"),
        ("bad_ttt_value", "error: --ttt-lr must be"),
        ("no_cuda", "no CUDA device"),
        ("reuse_with_tta", "TTT failed: online_predict='adapt_forward'"),
    ],
)
def test_errors_are_clear_nonzero_and_leave_no_output(tmp_path, dataset, capsys, case, expected):
    out = tmp_path / "out" / "p.json"
    base = ["--adapter", "detector", "--dataset", str(dataset), "--split", "val-fog-5", "--output", str(out), "--quiet"]
    if case == "missing_dataset":
        base[3] = str(tmp_path / "nowhere")
    elif case == "empty_split":
        (tmp_path / "d" / "images" / "val").mkdir(parents=True)
        base[3], base[5] = str(tmp_path / "d"), "val"
    elif case == "unreadable_image":
        bad = tmp_path / "bad"
        (bad / "images" / "val").mkdir(parents=True)
        (bad / "images" / "val" / "x.png").write_bytes(b"not a png")
        base[3], base[5] = str(bad), "val"
    elif case == "unwritable_output":
        blocker = tmp_path / "file"
        blocker.write_text("")
        out = blocker / "p.json"
        base[7] = str(out)
    elif case == "empty_selection":
        base += ["--ttt", "--ttt-update-filter", "norm_only", "--ttt-include", "no_such_parameter"]
    elif case == "bad_ttt_value":
        base += ["--ttt", "--ttt-lr", "-1"]
    elif case == "reuse_with_tta":
        base += ["--ttt", "--ttt-schedule", "online", "--ttt-online-predict", "adapt_forward", "--tta"]
    elif case == "no_cuda":
        if torch.cuda.is_available():
            pytest.skip("this machine has a CUDA device")
        base += ["--device", "cuda"]
    code = main(base)
    err = capsys.readouterr().err
    assert code != 0
    assert expected in err
    assert not out.exists()
    assert not any(p.name.endswith(".tmp") for p in tmp_path.rglob("*"))


def test_eata_reads_its_fisher_data_split_and_sar_runs_online(tmp_path, dataset):
    fisher = ["--ttt-method", "eata", "--ttt-eata-fisher-data", "val", "--ttt-eata-e-margin", "2.0"]
    flags = ["--wrap", "--ttt", "--ttt-update-filter", "norm_only", "--ttt-lr", "1e-3", "--ttt-batch-size", "2",
             "--ttt-max-batches", "none"]
    code, out = _export(tmp_path, dataset, *flags, *fisher, "--ttt-schedule", "online")
    assert code == 0
    ttt = json.loads(out.read_text())["meta"]["ttt"]
    assert ttt["eata"]["fisher_data"] == "val" and ttt["report"]["steps_run"] == 2
    assert {"selected", "selected_ratio", "skipped"} <= ttt["report"]["step_metrics"][0].keys()
    code, out = _export(tmp_path, dataset, *flags, "--ttt-method", "sar", "--ttt-sar-e-margin", "2.0",
                        "--ttt-sar-adaptive", "--ttt-schedule", "online", name="sar.json")
    report = json.loads(out.read_text())["meta"]["ttt"]["report"]
    assert code == 0 and report["steps_run"] == 2 and "ema_loss" in report["step_metrics"][0]
    code, out = _export(tmp_path, dataset, *flags, *fisher[:3], "nosuchsplit", name="bad.json")
    assert code == 1 and not out.exists()
