"""The detector network, its box parametrisation, targets, decoding, NMS and checkpoints."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from yolozu.models import (
    DEFAULT_CHECKPOINT,
    CenterNetDetector,
    batched_nms,
    build_detector,
    count_parameters,
    decode,
    load_detector,
    nms,
    save_detector,
)
from yolozu.models.targets import build_targets

SMALL = {"image_size": 64, "widths": (8, 8, 16, 16, 16), "neck_channels": 8, "head_channels": 8, "decoder_channels": 8}


def _model(seed: int = 0, **config) -> CenterNetDetector:
    torch.manual_seed(seed)
    return build_detector({**SMALL, **config}).eval()


def test_output_shapes_and_dtypes():
    model = _model()
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = model(x)
        with_recon = model(x, recon=True)
    assert set(plain) == {"logits", "boxes"}
    assert plain["logits"].shape == (2, 10, 16, 16) and plain["logits"].dtype == torch.float32
    assert plain["boxes"].shape == (2, 4, 16, 16) and plain["boxes"].dtype == torch.float32
    assert with_recon["recon"].shape == (2, 3, 64, 64) and with_recon["recon"].dtype == torch.float32
    assert float(with_recon["recon"].min()) >= 0.0 and float(with_recon["recon"].max()) <= 1.0
    torch.testing.assert_close(with_recon["logits"], plain["logits"])


def test_default_architecture_is_compact():
    n = count_parameters(CenterNetDetector())
    assert 300_000 <= n <= 1_500_000


def test_image_size_must_be_a_multiple_of_32():
    with pytest.raises(ValueError, match="multiple of 32"):
        CenterNetDetector(image_size=100)


def test_lora_parameters_exist_and_start_at_zero():
    model = _model()
    lora = {name: p for name, p in model.named_parameters() if "lora" in name}
    assert any(name.endswith("lora.up.weight") for name in lora)
    assert any(name.endswith("lora.down.weight") for name in lora)
    for name, p in lora.items():
        if name.endswith("up.weight"):
            assert torch.count_nonzero(p) == 0, name


def test_zero_initialised_lora_leaves_outputs_unchanged():
    model = _model()
    without = copy.deepcopy(model)
    for module in without.modules():
        if hasattr(module, "lora"):
            module.lora = None
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = model(x, recon=True), without(x, recon=True)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)
    # and the branch is live: a non-zero `up` changes the output
    with torch.no_grad():
        next(m for n, m in model.named_modules() if n.endswith("lora.up")).weight.fill_(0.1)
        assert not torch.equal(model(x)["logits"], a["logits"])


def test_committed_checkpoint_loads_with_zero_lora():
    model = load_detector()
    assert DEFAULT_CHECKPOINT.is_file()
    ups = [p for n, p in model.named_parameters() if n.endswith("lora.up.weight")]
    assert ups and all(torch.count_nonzero(p) == 0 for p in ups)
    assert not model.training


def test_same_seed_same_outputs():
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b, c = _model(3)(x), _model(3)(x), _model(4)(x)
    assert torch.equal(a["logits"], b["logits"]) and torch.equal(a["boxes"], b["boxes"])
    assert not torch.equal(a["logits"], c["logits"])


def test_checkpoint_round_trip(tmp_path):
    model = _model(5)
    path = tmp_path / "sub" / "det.pt"
    save_detector(model, path)
    blob = torch.load(path, weights_only=True)
    assert blob["config"]["image_size"] == 64
    loaded = load_detector(path)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)["logits"], model(x)["logits"], rtol=0, atol=0)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_detector(tmp_path / "nope.pt")


def test_forward_composes_with_vmap_over_stacked_models():
    models = [_model(s) for s in (0, 1)]
    params, buffers = torch.func.stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    x = torch.rand(2, 3, 64, 64)

    def run(p, b):
        return torch.func.functional_call(base, (p, b), (x,), {"recon": True})

    out = torch.func.vmap(run)(params, buffers)
    assert out["logits"].shape == (2, 2, 10, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(out["recon"][1], models[1](x, recon=True)["recon"], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------- decoding
def _one_object_output(cls: int, i: int, j: int, offset: tuple[float, float], size: tuple[float, float]):
    logits = torch.full((1, 10, 16, 16), -8.0)
    logits[0, cls, i, j] = 3.0
    logits[0, cls, i, j + 1] = 1.0  # a shoulder next to the peak: not a local maximum
    boxes = torch.zeros(1, 4, 16, 16)
    boxes[0, 0, i, j] = math.log(offset[0] / (1 - offset[0]))
    boxes[0, 1, i, j] = math.log(offset[1] / (1 - offset[1]))
    boxes[0, 2, i, j] = math.log(size[0])
    boxes[0, 3, i, j] = math.log(size[1])
    return {"logits": logits, "boxes": boxes}


def test_decode_hand_made_heatmap_gives_the_expected_box():
    out = _one_object_output(cls=7, i=5, j=9, offset=(0.25, 0.75), size=(4.0, 2.0))
    (dets,) = decode(out, score_threshold=0.1)
    assert len(dets) == 1
    det = dets[0]
    assert det["class_id"] == 7
    assert det["score"] == pytest.approx(1 / (1 + math.exp(-3.0)), rel=1e-6)
    assert det["bbox"]["cx"] == pytest.approx(9.25 / 16, abs=1e-6)
    assert det["bbox"]["cy"] == pytest.approx(5.75 / 16, abs=1e-6)
    assert det["bbox"]["w"] == pytest.approx(4.0 / 16, abs=1e-6)
    assert det["bbox"]["h"] == pytest.approx(2.0 / 16, abs=1e-6)


def test_decode_clips_boxes_to_the_image_and_respects_limits():
    out = _one_object_output(cls=0, i=0, j=0, offset=(0.5, 0.5), size=(4.0, 4.0))
    (dets,) = decode(out, score_threshold=0.1)
    box = dets[0]["bbox"]
    assert box["cx"] - box["w"] / 2 == pytest.approx(0.0, abs=1e-6)
    assert box["cx"] + box["w"] / 2 == pytest.approx(2.5 / 16, abs=1e-6)
    noisy = {"logits": torch.randn(2, 10, 16, 16), "boxes": torch.randn(2, 4, 16, 16)}
    for dets in decode(noisy, score_threshold=0.0, max_detections=7):
        assert len(dets) <= 7
        assert [d["score"] for d in dets] == sorted((d["score"] for d in dets), reverse=True)


def test_nms_removes_an_overlapping_lower_score_duplicate():
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.05, 0.0, 1.05, 1.0], [2.0, 2.0, 3.0, 3.0]])
    scores = torch.tensor([0.6, 0.9, 0.5])
    assert nms(boxes, scores, 0.5).tolist() == [1, 2]
    assert nms(boxes, scores, 0.99).tolist() == [1, 0, 2]
    # class-wise: the same boxes in different classes both survive
    assert sorted(batched_nms(boxes, scores, torch.tensor([0, 1, 0]), 0.5).tolist()) == [0, 1, 2]


def test_targets_decode_back_to_the_labels():
    labels = [
        [{"class_id": 3, "cx": 0.30, "cy": 0.40, "w": 0.20, "h": 0.30}],
        [
            {"class_id": 1, "cx": 0.71, "cy": 0.22, "w": 0.10, "h": 0.12},
            {"class_id": 9, "cx": 0.2, "cy": 0.8, "w": 0.3, "h": 0.2},
        ],
    ]
    t = build_targets(labels, num_classes=10, height=16, width=16)
    assert int(t.box_mask.sum()) == 3 and int((t.heatmap == 1).sum()) == 3
    offsets = t.box[:, :2].clamp(1e-5, 1 - 1e-5)
    out = {
        "logits": torch.where(t.heatmap == 1, 9.0, -9.0),
        "boxes": torch.cat([torch.logit(offsets), t.box[:, 2:]], 1),
    }
    for want, got in zip(labels, decode(out, score_threshold=0.5)):
        assert len(got) == len(want)
        for obj in want:
            match = next(d for d in got if d["class_id"] == obj["class_id"])
            assert np.allclose(
                [match["bbox"][k] for k in ("cx", "cy", "w", "h")], [obj[k] for k in ("cx", "cy", "w", "h")], atol=2e-4
            )
