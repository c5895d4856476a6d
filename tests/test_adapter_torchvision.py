"""The torchvision adapter on real torchvision detectors with random weights, one of each family (Faster R-CNN,
RetinaNet, FCOS, SSD) on a light backbone and the ResNet-50 builders and SSD300, at a small input size: its
predictions are the model's own, its frozen norms adapt, every method but MIM steps on it, only the selected
tensors change, and a rolled-back step leaves it bitwise as it was."""

from __future__ import annotations

import copy

import attrs
import pytest
import torch
from torch import nn
from tv_zoo import FAMILIES, FROZEN_EPS, KIND, NUM_CLASSES, TORCHVISION, UPDATE, build, write_images, zoo_folder

from yolozu.adapters.norms import AdaptableBatchNorm2d, adaptable_copy, freeze_norms
from yolozu.adapters.tv_adapter import TorchvisionAdapter, to_predictions
from yolozu.adapters.tv_forward import dense_flip_index
from yolozu.adapters.tv_models import FAMILIES as BUILDER_FAMILIES
from yolozu.adapters.tv_models import SUPPORTED, num_classes_in
from yolozu.functional import filters
from yolozu.inference.predictor import Predictor
from yolozu.tta.config import TTTConfig
from yolozu.tta.engine import Adaptation

FrozenBatchNorm2d = TORCHVISION.ops.FrozenBatchNorm2d
NORM_TYPES = (nn.BatchNorm2d, nn.GroupNorm)


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("tv-images"))


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return zoo_folder(tmp_path_factory)


@pytest.fixture(scope="module", params=FAMILIES)
def built(request, zoo):
    return build(request.param, zoo)


def norm_affine(view: nn.Module) -> set[str]:
    """The affine parameters of the norm layers, found independently of ``filters``."""
    modules = [name for name, module in view.named_modules() if isinstance(module, NORM_TYPES)]
    found = {f"{name}.{p}" for name in modules for p in ("weight", "bias")}
    found |= {n for n, _ in view.named_parameters() if n.endswith("backbone.scale_weight")}  # SSD300's L2 norm
    return found


@pytest.mark.parametrize("name", SUPPORTED)
def test_every_builder_adapts_exactly_its_norm_affine_once_frozen_norms_are_converted(name):
    """Built as a pretrained checkpoint has them (frozen norms): norm_only selects every norm's affine, none left
    frozen; the class count is read back from the state dict."""
    with torch.device("meta"):  # names and shapes only: fast, no memory
        model = getattr(TORCHVISION.models.detection, name)(weights=None, weights_backbone=None, num_classes=7)
        norms = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
        freeze_norms(model, norms, 1e-5)
        assert not filters.base_selection(model, "norm_only") & {f"{n}.weight" for n in norms}
        adapter = TorchvisionAdapter(model, device="meta")
    view = adapter.get_model()
    selected = filters.select(view, "norm_only")
    assert selected and set(selected) == norm_affine(view)
    assert len(adapter.converted) == len(norms)
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in view.modules())
    assert num_classes_in(model.state_dict(), BUILDER_FAMILIES[name]) == 7
    assert adapter.num_classes == 7 - adapter.class_offset


def test_predict_is_the_models_own_eval_output(built, records):
    adapter = built.adapter
    x = adapter.load_batch(records)
    with torch.no_grad():
        own = built.reference(list(x))
    expected = to_predictions(own, records, tuple(x.shape[-2:]), adapter.class_offset)
    assert any(p["detections"] for p in expected)
    assert adapter.predict(records) == expected
    # the view TTT predicts through reads the same detections with the stored statistics
    assert Predictor(adapter).predict(records, bn="eval") == expected
    if FROZEN_EPS[built.family] is not None:
        eps = {m.eps for m in adapter.detector.modules() if isinstance(m, AdaptableBatchNorm2d)}
        assert len(adapter.converted) > 0 and eps == {FROZEN_EPS[built.family]}


def test_the_readout_matches_the_family(built, records):
    adapter = built.adapter
    readout = adapter.ttt_readout()
    sigmoid = KIND[built.family] in ("retinanet", "fcos")
    assert readout.score_kind == readout.sample_kind == ("sigmoid" if sigmoid else "softmax")
    with torch.no_grad():
        out = adapter.get_model()(adapter.load_batch(records))
    classes = NUM_CLASSES  # with the background column where the family has one
    samples, kind = readout.class_samples(out)
    assert samples.shape == (2, classes, adapter.view.topk)
    scores = readout.scores(out)
    assert scores.shape[:2] == (2, classes) and readout.flipped_scores(out).shape == scores.shape
    index = out["flip_index"]
    identity = torch.arange(scores.shape[-1])
    assert torch.equal(index.sort().values, identity) and torch.equal(index[index], identity)  # a mirror: involution
    with pytest.raises(ValueError, match="no reconstruction head; use tent/cotta"):
        readout.recon(out)


def _changed(adaptation: Adaptation, before: dict) -> set[str]:
    params, buffers = adaptation.prediction_tensors()
    return {n for n, t in {**params, **buffers}.items() if not torch.equal(t, before[n])}


def test_a_tent_step_changes_only_the_selected_tensors_and_a_rollback_is_bitwise(built, records):
    adapter = built.adapter
    view = adapter.get_model()
    before = {n: t.clone() for n, t in view.state_dict().items()}
    update = UPDATE[built.family]
    selected = set(filters.select(view, **update))
    x = adapter.load_batch(records)
    config = TTTConfig(enabled=True, method="tent", lr=1e-2, bn_mode="batch", seed=0, **update)
    adaptation = Adaptation(view, config, adapter.ttt_readout())
    (row,) = adaptation.adapt(x, 0, 1)
    assert not row["rolled_back"] and row["update_norm"] > 0
    changed = _changed(adaptation, before)
    assert changed and changed <= selected
    # a guard stops a step that also moves running statistics: it is rolled back, bitwise
    guarded = attrs.evolve(config, bn_mode="running", max_update_norm=1e-12)
    stopped = Adaptation(view, guarded, adapter.ttt_readout())
    (row,) = stopped.adapt(x, 0, 1)
    assert row["rolled_back"] and row["stop_reason"] == "max_update_norm_exceeded"
    stopped.write_back()
    assert all(torch.equal(t, before[n]) for n, t in view.state_dict().items())


@pytest.mark.parametrize("method", ["cotta", "eata", "sar"])
@pytest.mark.parametrize("family", ["two_stage", "retinanet", "ssd", "fcos"])
def test_cotta_eata_and_sar_step_on_every_family(family, method, zoo, records):
    """The box head's softmax at proposals (through roi_align, which torch.func cannot differentiate),
    independent sigmoids at dense anchors (RetinaNet), softmax anchors (SSD) and FCOS's
    sigmoid locations with centre-ness."""
    adapter = build(family, zoo).adapter
    view = adapter.get_model()
    before = {n: t.clone() for n, t in view.state_dict().items()}
    selected = set(filters.select(view, **UPDATE[family]))
    margins = {"eata_e_margin": 10.0, "eata_conf_min": 0.0, "eata_entropy_min": 0.0, "eata_entropy_max": 10.0}
    config = TTTConfig(
        enabled=True, method=method, lr=1e-2, bn_mode="batch", seed=0, sar_e_margin=10.0, **margins,
        **UPDATE[family],
    )
    adaptation = Adaptation(view, config, adapter.ttt_readout())
    (row,) = adaptation.adapt(adapter.load_batch(records), 0, 1)
    assert not row["rolled_back"] and row["update_norm"] > 0 and torch.isfinite(torch.tensor(row["loss"]))
    if method != "cotta":
        assert row["selected"] > 0
    changed = _changed(adaptation, before)
    assert changed and changed <= selected


def test_adaptable_batchnorm_computes_what_the_frozen_one_does_bitwise():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 8, 5, 5, generator=gen)
    for eps in (0.0, 1e-5):
        frozen_norm = FrozenBatchNorm2d(8, eps=eps)
        for buffer in ("weight", "bias", "running_mean"):
            getattr(frozen_norm, buffer).copy_(torch.randn(8, generator=gen))
        frozen_norm.running_var.copy_(0.1 + torch.rand(8, generator=gen))
        norm = adaptable_copy(frozen_norm).eval()
        assert torch.equal(norm(x), frozen_norm(x))
        assert {n for n, _ in norm.named_parameters()} == {"weight", "bias"}
        assert {"running_mean", "running_var"} <= {n for n, _ in norm.named_buffers()}
    plain = nn.BatchNorm2d(8, eps=eps)
    plain.load_state_dict(norm.state_dict())
    torch.testing.assert_close(norm.train()(x), plain.train()(x), rtol=0, atol=0)
    assert torch.equal(norm.running_mean, plain.running_mean)  # train mode updates the statistics alike
    assert not torch.equal(adaptable_copy(FrozenBatchNorm2d(8, eps=0.0)).eval()(x), norm.eval()(x))


@pytest.mark.parametrize("anchors", [2, [2, 3, 1]])
def test_dense_flip_index_maps_each_level_to_its_mirror_image(anchors):
    """One anchor count for every level (RetinaNet, FCOS, SSDlite) or one per level (SSD300)."""
    shapes = [(3, 4), (2, 2), (1, 1)]
    counts = [anchors] * 3 if isinstance(anchors, int) else anchors
    maps = [torch.randn(h, w, a) for (h, w), a in zip(shapes, counts)]
    laid_out = torch.cat([m.flatten() for m in maps])
    mirrored = torch.cat([m.flip(1).flatten() for m in maps])  # what the flipped image's anchors see
    index = dense_flip_index(shapes, anchors, torch.device("cpu"))
    assert torch.equal(mirrored[index], laid_out)


def test_images_of_one_batch_share_a_size_or_are_resized(tmp_path, zoo):
    adapter = build("two_stage", zoo).adapter
    records = write_images(tmp_path / "a", 1, size=64) + write_images(tmp_path / "b", 1, size=48)
    with pytest.raises(ValueError, match="differ in size.*image_size=S"):
        adapter.load_batch(records)
    resizing = copy.copy(adapter)
    resizing.image_size = 40
    assert resizing.load_batch(records).shape == (2, 3, 40, 40)
