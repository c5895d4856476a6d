"""``yolozu export --adapter torchvision``: the model's own predictions without --ttt, adaptation with it, and
clear errors (unsupported model, missing file, uncached weights, wrong class count, MIM, K streams)."""

from __future__ import annotations

import functools
import json

import pytest
import torch
from tv_zoo import BUILDS, TORCHVISION, build, build_named, write_images, zoo_folder

from tests.toy import UNGUARDED
from yolozu.adapters.tv_adapter import TorchvisionAdapter
from yolozu.cli.export import main


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """Faster R-CNN (MobileNetV3 320) saved with frozen norms, as a fine-tuned pretrained model saves it."""
    folder = zoo_folder(tmp_path_factory)
    build("two_stage", folder)
    return folder / f"{BUILDS['two_stage'][0]}.pt"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("tv-data")
    records = write_images(root / "images" / "val", 2)
    (root / "labels" / "val").mkdir(parents=True)
    for record in records:
        (root / "labels" / "val" / f"{record['image'].rsplit('/', 1)[1][:-4]}.txt").write_text("4 0.5 0.5 0.3 0.3\n")
    return root


def _export(dataset, out, checkpoint, *extra, model=BUILDS["two_stage"][0]):
    args = ["--adapter", "torchvision", "--model", model, "--checkpoint", str(checkpoint)]
    return main([*args, "--dataset", str(dataset), "--output", str(out), "--quiet", *extra])


def test_without_ttt_the_export_is_the_models_own_predictions(dataset, checkpoint, tmp_path):
    out = tmp_path / "p.json"
    assert _export(dataset, out, checkpoint, "--wrap") == 0
    doc = json.loads(out.read_text())
    records = [{"image": p["image"], "labels": []} for p in doc["predictions"]]
    adapter = TorchvisionAdapter.from_checkpoint(BUILDS["two_stage"][0], checkpoint)
    assert doc["predictions"] == adapter.predict(records)
    assert any(p["detections"] for p in doc["predictions"])
    meta = doc["meta"]["adapter"]
    assert meta["family"] == "two_stage" and meta["num_classes"] == 5 and meta["frozen_norms_made_adaptable"] > 0


def test_a_checkpoint_dict_holding_the_model_loads_and_frozen_bn_eps_is_applied(dataset, checkpoint, tmp_path):
    """The references' training scripts save {"model": state_dict, ...}; --frozen-bn-eps changes the arithmetic."""
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"model": torch.load(checkpoint, weights_only=True), "epoch": 3}, wrapped)
    outs = {name: tmp_path / f"{name}.json" for name in ("plain", "wrapped", "eps0")}
    assert _export(dataset, outs["plain"], checkpoint) == 0
    assert _export(dataset, outs["wrapped"], wrapped) == 0
    assert _export(dataset, outs["eps0"], checkpoint, "--frozen-bn-eps", "0.0") == 0
    plain = json.loads(outs["plain"].read_text())
    assert json.loads(outs["wrapped"].read_text()) == plain
    assert json.loads(outs["eps0"].read_text()) != plain


def test_with_ttt_the_export_adapts_its_norms(dataset, checkpoint, tmp_path):
    plain, adapted = tmp_path / "plain.json", tmp_path / "adapted.json"
    assert _export(dataset, plain, checkpoint) == 0
    ttt = ["--ttt", "--ttt-method", "tent", "--ttt-schedule", "online", "--ttt-batch-size", "2", "--ttt-lr", "0.01"]
    assert _export(dataset, adapted, checkpoint, *ttt, *UNGUARDED, "--wrap") == 0
    doc = json.loads(adapted.read_text())
    report = doc["meta"]["ttt"]["report"]
    assert report["steps_run"] == 1 and report["updated_param_count"] > 0
    assert doc["predictions"] != json.loads(plain.read_text())


def test_a_frozen_norm_retinanet_state_dict_exports_with_tent_on_norm_only(dataset, tmp_path, monkeypatch):
    """A random-weight retinanet_resnet50_fpn whose norms are FrozenBatchNorm2d, saved as a state dict, exports with
    --ttt --ttt-method tent --ttt-update-filter norm_only and updates parameters (torchvision's own builder, at
    64 px instead of its 800 to keep the test short)."""
    name, kwargs = BUILDS["retinanet"]
    detection = TORCHVISION.models.detection
    monkeypatch.setattr(detection, name, functools.partial(getattr(detection, name), **kwargs))
    reference, _ = build_named(name, {}, 0.0, tmp_path)
    frozen = TORCHVISION.ops.FrozenBatchNorm2d
    assert any(isinstance(m, frozen) for m in reference.backbone.body.modules())
    out = tmp_path / "retinanet.json"
    ttt = ["--ttt", "--ttt-method", "tent", "--ttt-update-filter", "norm_only", "--wrap"]
    assert _export(dataset, out, tmp_path / f"{name}.pt", *ttt, model=name) == 0
    doc = json.loads(out.read_text())
    assert doc["meta"]["adapter"]["family"] == "retinanet" and doc["meta"]["adapter"]["frozen_norms_made_adaptable"]
    assert doc["meta"]["ttt"]["report"]["updated_param_count"] > 0


@pytest.mark.parametrize(
    "case,code,expected",
    [
        ("missing_file", 1, "no such file, and not a torchvision weights name"),
        ("uncached_weights", 1, "not in the torch hub cache"),
        ("class_count", 1, "has 6 classes; num_classes=11 does not match"),
        ("mim", 1, "TTT failed: this model has no reconstruction head; use tent/cotta"),
        ("streams", 1, "TTT failed: a torchvision detector cannot adapt K vmapped streams"),
        ("wrong_model", 1, "does not fit ssdlite320_mobilenet_v3_large"),
        ("not_a_state_dict", 1, "not a state dict (save model.state_dict()"),
    ],
)
def test_errors_are_clear_and_write_nothing(case, code, expected, dataset, checkpoint, tmp_path, monkeypatch, capsys):
    out = tmp_path / "p.json"
    extra, model = [], BUILDS["two_stage"][0]
    if case == "missing_file":
        checkpoint = tmp_path / "nowhere.pt"
    elif case == "uncached_weights":
        monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
        checkpoint, model = "FasterRCNN_MobileNet_V3_Large_320_FPN_Weights.COCO_V1", BUILDS["two_stage"][0]
    elif case == "class_count":
        extra = ["--num-classes", "11"]
    elif case == "mim":
        extra = ["--ttt", "--ttt-method", "mim", "--ttt-update-filter", "norm_only"]
    elif case == "streams":
        extra = ["--ttt", "--ttt-reset", "sample", "--ttt-streams", "2", "--ttt-max-batches", "none"]
    elif case == "wrong_model":
        model = "ssdlite320_mobilenet_v3_large"
    elif case == "not_a_state_dict":
        checkpoint = tmp_path / "list.pt"
        torch.save([torch.zeros(2)], checkpoint)
    assert _export(dataset, out, checkpoint, *extra, model=model) == code
    assert expected in capsys.readouterr().err and not out.exists()
