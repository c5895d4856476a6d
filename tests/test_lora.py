"""LoRA at test time (``yolozu.adapters.lora``, the export's ``--lora-*`` flags): an injected model predicts as the
plain one, ``lora_only`` selects exactly the adapters and a Tent step moves only them, merged weights predict as the
unmerged adapters do, on the built-in detector and a torchvision FCOS; the export runs and refuses bad flags."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from tv_zoo import BUILDS, build, write_images, zoo_folder

from yolozu.adapters.detector import DetectorAdapter
from yolozu.adapters.lora import (
    LoRAConv2d,
    LoRALinear,
    LoRASettings,
    freeze_base,
    inject_lora,
    lora_targets,
    merge_lora,
)
from yolozu.adapters.tv_adapter import TorchvisionAdapter
from yolozu.cli.export import main
from yolozu.functional import filters
from yolozu.tta.config import TTTConfig
from yolozu.tta.engine import Adaptation


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("lora-images"), n=2, size=64)


def _detector():
    adapter = DetectorAdapter(batch_size=2)
    return adapter, adapter.get_model()


def _fcos(tmp_path_factory):
    """A private copy of the test zoo's FCOS (the zoo's adapter is shared with other tests)."""
    reference = build("fcos", zoo_folder(tmp_path_factory)).reference
    adapter = TorchvisionAdapter(copy.deepcopy(reference), batch_size=2)
    return adapter, adapter.get_model()


def _outputs(model, x):
    """Every tensor a model's eval forward returns (the detections' tensors included), flattened in order."""
    model.eval()
    with torch.no_grad():
        out = model(x)
    found = []

    def walk(value):
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, dict):
            for key in sorted(value):
                walk(value[key])
        elif isinstance(value, (list, tuple)):
            for item in value:
                walk(item)

    walk(out)
    return found


def _same(first, second, exact=False):
    assert len(first) == len(second) and first
    for a, b in zip(first, second):
        assert a.shape == b.shape
        assert torch.equal(a, b) if exact else torch.allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["detector", "fcos"])
def test_injected_adapters_predict_as_before_train_alone_under_tent_and_merge(kind, records, tmp_path_factory):
    adapter, model = _detector() if kind == "detector" else _fcos(tmp_path_factory)
    x = adapter.load_batch(records)
    plain = _outputs(model, x)
    keys = list(model.state_dict())
    own_lora = [n for n, _ in model.named_parameters() if ".lora." in n]  # the built-in detector's own branches

    names = inject_lora(model, LoRASettings(r=2, alpha=4.0), seed=0)
    assert names and all("head" in n for n in names)
    wrapped = {n: m for n, m in model.named_modules() if isinstance(m, (LoRALinear, LoRAConv2d))}
    assert sorted(wrapped) == sorted(names)
    _same(_outputs(model, x), plain, exact=True)  # B = 0: the injected model predicts as the plain one

    injected = [f"{n}.{p}" for n in names for p in ("lora_A", "lora_B")]
    assert sorted(filters.select(model, "lora_only")) == sorted(own_lora + injected)
    assert set(injected) <= set(filters.select(model, "adapter_only"))
    norms = set(filters.select(model, "norm_only"))
    assert set(filters.select(model, "lora_norm_only")) == norms | set(own_lora + injected)

    before = {n: t.clone() for n, t in model.state_dict().items()}
    config = TTTConfig(enabled=True, method="tent", update_filter="lora_only", lr=1e-2, bn_mode="batch", seed=0)
    adaptation = Adaptation(model, config, adapter.ttt_readout())
    (row,) = adaptation.adapt(x, 0, 1)
    assert not row["rolled_back"] and row["update_norm"] > 0
    adaptation.write_back()
    changed = {n for n, t in model.state_dict().items() if not torch.equal(t, before[n])}
    assert changed and changed <= set(own_lora + injected)
    assert any(n.endswith("lora_B") for n in changed)  # the injected adapters moved
    adapted = _outputs(model, x)

    merged = copy.deepcopy(model)
    assert sorted(merge_lora(merged)) == sorted(names)
    assert list(merged.state_dict()) == keys  # the original module tree
    assert not any(isinstance(m, (LoRALinear, LoRAConv2d)) for m in merged.modules())
    _same(_outputs(merged, x), adapted)


def test_merge_at_init_is_the_plain_model_and_merge_folds_scale_b_a():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3, stride=2, padding=2, dilation=2), torch.nn.Flatten(),
                                torch.nn.Linear(5 * 4 * 4, 3))
    model.head = torch.nn.Identity()  # nothing is under a "head": target head wraps no layer
    with pytest.raises(ValueError, match="finds no linear or conv layer"):
        inject_lora(model, LoRASettings(r=2, target="head"))
    del model.head
    plain = copy.deepcopy(model)
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    settings = LoRASettings(r=2, alpha=6.0, target="all_linear")
    assert inject_lora(model, settings, seed=3) == ["2"]
    both = LoRASettings(r=2, target="all_linear_conv1x1")
    assert lora_targets(plain, "all_conv1x1") == [] and lora_targets(plain, both.target) == ["2"]
    merged = copy.deepcopy(model)
    merge_lora(merged)
    assert all(torch.equal(a, b) for a, b in zip(merged.state_dict().values(), plain.state_dict().values()))
    with torch.no_grad():
        model[2].lora_B.normal_()
    base, a, b = model[2].base, model[2].lora_A, model[2].lora_B
    expected = base.weight + 3.0 * b @ a  # scale = alpha / r
    merged = copy.deepcopy(model)
    merge_lora(merged)
    assert torch.allclose(merged[2].weight, expected) and torch.allclose(merged(x), model(x), atol=1e-6)
    # the same seed draws the same A; another seed another
    again = copy.deepcopy(plain)
    inject_lora(again, settings, seed=3)
    assert torch.equal(again[2].lora_A, a)
    inject_lora(other := copy.deepcopy(plain), settings, seed=4)
    assert not torch.equal(other[2].lora_A, a)


def test_a_kxk_conv_adapter_merges_exactly_and_freeze_base_keeps_only_adapters():
    torch.manual_seed(0)
    model = torch.nn.Module()
    model.box_head = torch.nn.Sequential(torch.nn.Conv2d(4, 6, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(6, 2, 1))
    x = torch.rand(1, 4, 7, 7, generator=torch.Generator().manual_seed(2))
    names = inject_lora(model, LoRASettings(r=3, freeze_base=True, train_bias="all"))
    assert names == ["box_head.0", "box_head.2"] and model.box_head[0].lora_A.shape == (3, 4, 3, 3)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == [f"box_head.{i}.{p}" for i in (0, 2) for p in ("lora_A", "lora_B", "base.bias")]
    assert freeze_base(model) == [f"box_head.{i}.{p}" for i in (0, 2) for p in ("lora_A", "lora_B")]
    with torch.no_grad():
        for i in (0, 2):
            model.box_head[i].lora_B.normal_()
    merged = copy.deepcopy(model)
    merge_lora(merged)
    assert torch.allclose(merged.box_head(x), model.box_head(x), atol=1e-5)


def test_settings_are_validated():
    for field, value in (("r", -1), ("alpha", 0.0), ("dropout", 1.0), ("target", "neck"), ("train_bias", "some")):
        with pytest.raises(ValueError, match=f"^{field}: "):
            LoRASettings(**{field: value})
    assert LoRASettings(r=4).scale == 1.0 and LoRASettings(r=4, alpha=2.0).scale == 0.5


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-data")
    write_images(root / "images" / "val", 2, size=64)
    return root


def _export(dataset, out, *extra):
    return main(["--adapter", "detector", "--dataset", str(dataset), "--output", str(out), "--quiet", *extra])


def test_export_with_lora_and_lora_only_ttt_writes_predictions_and_meta(dataset, tmp_path):
    out = tmp_path / "p.json"
    ttt = ["--ttt", "--ttt-update-filter", "lora_only", "--ttt-steps", "1", "--ttt-batch-size", "2"]
    assert _export(dataset, out, "--wrap", "--lora-r", "4", *ttt) == 0
    doc = json.loads(out.read_text())
    assert len(doc["predictions"]) == 2
    lora, report = doc["meta"]["lora"], doc["meta"]["ttt"]["report"]
    heads = DetectorAdapter().get_model()
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in [*heads.cls_head, *heads.box_head])
    assert lora["enabled"] and lora["r"] == 4 and lora["target"] == "head" and lora["report"]["replaced"] == convs
    assert report["steps_run"] == 1 and report["updated_param_count"] > 0
    plain = tmp_path / "plain.json"
    assert _export(dataset, plain, "--wrap") == 0
    assert json.loads(plain.read_text())["meta"]["lora"] == {**lora, "enabled": False, "r": 0, "report": None}


def test_export_on_a_torchvision_detector_trains_exactly_the_injected_adapters(dataset, tmp_path, tmp_path_factory):
    """Faster R-CNN's heads are linear (box head, predictor) and convolutional (RPN head): both get adapters."""
    name = BUILDS["two_stage"][0]
    folder = zoo_folder(tmp_path_factory)
    build("two_stage", folder)
    out = tmp_path / "tv.json"
    model = ["--adapter", "torchvision", "--model", name, "--checkpoint", str(folder / f"{name}.pt")]
    ttt = ["--ttt", "--ttt-update-filter", "lora_only", "--ttt-batch-size", "2"]
    code = main([*model, "--dataset", str(dataset), "--output", str(out), "--quiet", "--wrap", "--lora-r", "4", *ttt])
    assert code == 0
    doc = json.loads(out.read_text())
    injected, report = doc["meta"]["lora"]["report"], doc["meta"]["ttt"]["report"]
    assert len(doc["predictions"]) == 2 and injected["replaced"] > 0
    assert report["steps_run"] == 1 and report["updated_param_count"] == injected["lora_params"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--lora-r", "-1"], "argument --lora-r: must be an integer >= 0"),
        (["--lora-r", "2", "--lora-dropout", "1.5"], "argument --lora-dropout: must be in [0, 1)"),
        (["--lora-r", "2", "--lora-alpha", "nan"], "argument --lora-alpha: must be > 0"),
        (["--lora-r", "two"], "argument --lora-r: invalid int value: 'two'"),
        (["--lora-r", "2", "--lora-target", "neck"], "argument --lora-target: invalid choice: 'neck'"),
        (["--lora-alpha", "8"], "--lora-alpha applies with --lora-r > 0"),
        (["--lora-r", "2", "--lora-train-bias", "all"], "--lora-train-bias all applies with --lora-freeze-base"),
        (["--lora-r", "2", "--adapter", "dummy"], "--adapter dummy has none"),
        (["--lora-r", "2", "--lora-target", "all_linear"], "finds no linear or conv layer"),
        (["--lora-r", "2", "--lora-freeze-base", "--ttt", "--ttt-update-filter", "norm_only"], "froze"),
    ],
)
def test_bad_lora_flags_are_usage_errors_and_write_nothing(dataset, tmp_path, capsys, extra, message):
    out = tmp_path / "p.json"
    try:
        code = _export(dataset, out, *extra)
    except SystemExit as e:  # argparse's own check of a value
        code = e.code
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert code == 2 and err.startswith("usage: yolozu export") and "error: " in last and message in last
    assert not out.exists()
