"""FCOS-small (``yolozu.demo.tv_detector``): the builder's norms are what ``norm_only`` adapts, the plug-in factory
exports the model's own predictions by ``module:factory``, a Tent step moves only the selected tensors, and the
trainer writes a checkpoint the factory loads. Random weights and a few small images written here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tool_modules import load_tool
from torch import nn
from tv_zoo import TORCHVISION, randomise_norms, write_images  # skips (or fails: make test) without torchvision

from yolozu.adapters.tv_adapter import TorchvisionAdapter, to_predictions
from yolozu.cli.export import main as export
from yolozu.demo.tv_detector import DEFAULT_CHECKPOINT, adapter, build_fcos_small
from yolozu.functional import filters
from yolozu.tta.config import TTTConfig
from yolozu.tta.engine import Adaptation

SPEC = "yolozu.demo.tv_detector:adapter"
NUM_CLASSES = 4
SMALL = 64  # the tests' images (the model's transform resizes them to its 160 px)


def small_model(seed: int = 0) -> nn.Module:
    """FCOS-small with random weights and random BatchNorm statistics, in eval mode."""
    torch.manual_seed(seed)
    return randomise_norms(build_fcos_small(NUM_CLASSES), seed).eval()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """Three images with labels in a val split."""
    root = tmp_path_factory.mktemp("fcos-data")
    (root / "labels" / "val").mkdir(parents=True)
    for record in write_images(root / "images" / "val", 3, size=SMALL):
        (root / "labels" / "val" / f"{Path(record['image']).stem}.txt").write_text("2 0.5 0.5 0.3 0.3\n")
    return root


def test_the_builder_makes_an_fcos_whose_norm_only_selection_is_exactly_its_norm_affine():
    model = build_fcos_small(NUM_CLASSES)
    assert isinstance(model, TORCHVISION.models.detection.FCOS)
    batch_norms = [n for n, m in model.named_modules() if type(m) is nn.BatchNorm2d]
    assert len(batch_norms) >= 10  # plain, trainable BatchNorm in the backbone, not frozen
    view = TorchvisionAdapter(model).get_model()
    norms = [n for n, m in view.named_modules() if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm))]
    selected = set(filters.select(view, "norm_only"))
    assert selected == {f"{n}.{p}" for n in norms for p in ("weight", "bias")}
    assert all(view.get_parameter(n).requires_grad for n in selected)
    assert TorchvisionAdapter(model).num_classes == NUM_CLASSES


def test_the_factory_exports_the_models_own_predictions_by_module_and_factory(dataset, tmp_path):
    model = small_model()
    checkpoint = tmp_path / "fcos.pt"
    torch.save(model.state_dict(), checkpoint)
    out = tmp_path / "p.json"
    args = ["--adapter", SPEC, "--checkpoint", str(checkpoint), "--dataset", str(dataset), "--split", "val"]
    assert export([*args, "--output", str(out), "--image-size", str(SMALL), "--quiet"]) == 0
    exported = json.loads(out.read_text())
    records = [{"image": p["image"], "labels": []} for p in exported]
    x = adapter(checkpoint=checkpoint, image_size=SMALL).load_batch(records)
    with torch.no_grad():
        own = model(list(x))
    assert exported == to_predictions(own, records, (SMALL, SMALL), 0)
    assert any(p["detections"] for p in exported)


def test_the_factory_refuses_another_class_count_and_another_model(tmp_path):
    checkpoint = tmp_path / "fcos.pt"
    torch.save(small_model().state_dict(), checkpoint)
    with pytest.raises(ValueError, match=f"has {NUM_CLASSES} classes; num_classes=9"):
        adapter(checkpoint=checkpoint, num_classes=9)
    with pytest.raises(ValueError, match="builds fcos_small only"):
        adapter(checkpoint=checkpoint, model="fcos_resnet50_fpn")


def test_a_tent_step_changes_only_the_selected_tensors(dataset):
    fcos = TorchvisionAdapter(small_model(1), image_size=SMALL)
    view = fcos.get_model()
    before = {n: t.clone() for n, t in view.state_dict().items()}
    selected = set(filters.select(view, "norm_only"))
    records = [{"image": str(p), "labels": []} for p in sorted((dataset / "images" / "val").iterdir())]
    config = TTTConfig(enabled=True, method="tent", update_filter="norm_only", lr=1e-2, bn_mode="batch", seed=0)
    adaptation = Adaptation(view, config, fcos.ttt_readout())
    (row,) = adaptation.adapt(fcos.load_batch(records), 0, 1)
    assert not row["rolled_back"] and row["update_norm"] > 0
    params, buffers = adaptation.prediction_tensors()
    changed = {n for n, t in {**params, **buffers}.items() if not torch.equal(t, before[n])}
    assert changed and changed <= selected


def load_trainer():
    """tools/train_torchvision.py as a module."""
    return load_tool("train_torchvision")


def test_the_trainer_writes_a_checkpoint_the_factory_loads_and_a_sidecar(tmp_path):
    trainer = load_trainer()
    data = tmp_path / "data"
    (data / "labels" / "train").mkdir(parents=True)
    for record in write_images(data / "images" / "train", 2, size=SMALL, seed=3):
        (data / "labels" / "train" / f"{Path(record['image']).stem}.txt").write_text("3 0.4 0.4 0.4 0.4\n")
    images, labels = trainer.load_split(data, "train")
    xs, targets = trainer.make_batch(images, labels, np.array([0, 1]), np.array([True, False]), torch.device("cpu"))
    assert torch.equal(xs[0], images[0].float().div(255).flip(-1)) and targets[1]["labels"].tolist() == [3]
    torch.testing.assert_close(targets[0]["boxes"], torch.tensor([[25.6, 12.8, 51.2, 38.4]]))  # mirrored
    out = tmp_path / "ckpt" / "fcos.pt"
    argv = ["--data", str(data), "--epochs", "1", "--batch-size", "2", "--warmup-steps", "1", "--no-eval",
            "--threads", str(torch.get_num_threads())]
    assert trainer.main([*argv, "--out", str(out)]) == 0
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["train"]["epochs"] == 1 and sidecar["checkpoint_bytes"] == out.stat().st_size
    assert sidecar["torchvision"] == TORCHVISION.__version__ and len(sidecar["history"]) == 1
    assert sorted(p.name for p in out.parent.iterdir()) == ["fcos.json", "fcos.pt"]  # no temporary file left
    assert out.stat().st_mode & 0o777 == 0o644
    assert adapter(checkpoint=out).num_classes == 4  # class ids 0-3 seen: four classes


@pytest.mark.skipif(not DEFAULT_CHECKPOINT.is_file(), reason="no committed FCOS-small checkpoint")
def test_the_committed_checkpoint_loads_and_its_sidecar_describes_it():
    sidecar = json.loads(DEFAULT_CHECKPOINT.with_suffix(".json").read_text())
    assert sidecar["checkpoint_bytes"] == DEFAULT_CHECKPOINT.stat().st_size
    fcos = adapter()
    assert fcos.num_classes == 10 and fcos.describe()["model"] == "fcos_small"
    assert sidecar["parameters"] == sum(p.numel() for p in fcos.detector.parameters())


def test_the_committed_fcos_small_aligns_its_named_layers_with_the_statistics_beside_it(dataset):
    fcos = adapter()  # the committed checkpoint and detector.align-style statistics beside it
    readout = fcos.ttt_readout()
    assert readout.layers and set(readout.layers) <= set(readout.source_stats)
    records = [{"image": str(p), "labels": []} for p in sorted((dataset / "images" / "val").iterdir())]
    config = TTTConfig(enabled=True, method="align", update_filter="norm_only", lr=1e-2, bn_mode="batch", seed=0)
    adaptation = Adaptation(fcos.get_model(), config, readout)
    (row,) = adaptation.adapt(fcos.load_batch(records), 0, 1)
    assert not row["rolled_back"] and row["update_norm"] > 0 and row["mean_gap"] > 0
