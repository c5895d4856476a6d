"""Property-based tests of update filters and of the state helpers (partition, combine, count, copies)."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from yolozu.functional import filters
from yolozu.functional.state import clone_all, combine, copy, count, extract, foreach_ready, partition


class LoRALinear(nn.Linear):
    pass


class AdapterLinear(nn.Linear):
    pass


NORMS = {
    "bn1d": lambda: nn.BatchNorm1d(3),
    "bn2d": lambda: nn.BatchNorm2d(3),
    "ln": lambda: nn.LayerNorm(3),
    "gn": lambda: nn.GroupNorm(1, 3),
    "in2d": lambda: nn.InstanceNorm2d(3, affine=True),
}
OTHERS = {
    "conv": lambda: nn.Conv2d(3, 3, 1),
    "linear": lambda: nn.Linear(3, 3),
    "lora_class": lambda: LoRALinear(3, 3),
    "adapter_class": lambda: AdapterLinear(3, 3),
}
LABELS = ["stem", "head", "lora", "LoRA", "adapter", "down"]


@st.composite
def models(draw):
    """A model plus the parameter names each filter must select, computed from how it was built."""
    entries = draw(
        st.lists(
            st.tuples(st.sampled_from(LABELS), st.sampled_from(sorted(NORMS) + sorted(OTHERS)), st.booleans()),
            min_size=1,
            max_size=7,
        )
    )
    model = nn.Module()
    expected = {name: set() for name in filters.FILTERS}
    for i, (label, kind, nested) in enumerate(entries):
        module = (NORMS | OTHERS)[kind]()
        prefix = f"{label}{i}"
        setattr(model, prefix, nn.Sequential(module) if nested else module)
        inner = f"{prefix}.0" if nested else prefix
        names = {f"{inner}.{p}" for p, _ in module.named_parameters()}
        expected["all"] |= names
        if kind in NORMS:
            expected["norm_only"] |= names
        lora = "lora" in label.lower() or kind == "lora_class"
        if lora:
            expected["lora_only"] |= names
        if lora or "adapter" in label.lower() or kind == "adapter_class":
            expected["adapter_only"] |= names
    expected["lora_norm_only"] = expected["lora_only"] | expected["norm_only"]
    top = f"{entries[draw(st.integers(0, len(entries) - 1))][0]}{len(entries) - 1}"
    model.top_block = top  # the model names its top block: norm_but_top drops that block's norms
    expected["norm_but_top"] = {n for n in expected["norm_only"] if not n.startswith(top + ".")}
    return model, expected


@given(models())
def test_filters_select_what_the_model_was_built_with(built):
    model, expected = built
    for name in filters.FILTERS:
        assert filters.base_selection(model, name) == expected[name]
        if expected[name]:
            assert set(filters.select(model, name)) == expected[name]
        else:
            with pytest.raises(filters.EmptySelectionError, match=name):
                filters.select(model, name)


@given(models())
def test_lora_norm_only_is_the_union(built):
    model, _ = built
    assert filters.base_selection(model, "lora_norm_only") == (
        filters.base_selection(model, "lora_only") | filters.base_selection(model, "norm_only")
    )


@given(
    models(),
    st.sampled_from(filters.FILTERS),
    st.lists(st.sampled_from(["weight", "bias", "0.", "lora", "head"]), max_size=2),
    st.lists(st.sampled_from(["weight", "bias", "0.", "adapter", "stem"]), max_size=2),
)
def test_include_exclude_are_set_operations(built, name, include, exclude):
    model, expected = built
    base = expected[name]
    with_include = {n for n in base if any(s in n for s in include)} if include else base
    want = {n for n in with_include if not any(s in n for s in exclude)}
    if want:
        assert set(filters.select(model, name, include=include, exclude=exclude)) == want
    else:
        with pytest.raises(filters.EmptySelectionError):
            filters.select(model, name, include=include, exclude=exclude)


@given(models(), st.sampled_from(filters.FILTERS))
def test_partition_combine_roundtrip_disjoint_and_counted(built, name):
    model, expected = built
    params, _ = extract(model)
    inside, outside = partition(params, expected[name])
    assert set(inside) == expected[name]
    assert not set(inside) & set(outside)
    merged = combine(inside, outside)
    assert merged.keys() == params.keys() and all(torch.equal(merged[k], params[k]) for k in params)
    assert count(inside) + count(outside) == count(params) == sum(p.numel() for p in model.parameters())
    assert count(inside) == sum(params[k].numel() for k in expected[name])


def test_empty_selection_names_filter_and_parameters():
    model = nn.Sequential(nn.Conv2d(3, 3, 1))
    with pytest.raises(filters.EmptySelectionError, match=r"'norm_only'.*0\.weight"):
        filters.select(model, "norm_only")


def test_norm_only_takes_the_parameters_a_module_declares_as_normalisation():
    """A normalisation written inline (SSD's L2-normalisation scale) is selected once its module names it."""

    class L2Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.scale = nn.Parameter(torch.ones(4))
            self.offset = nn.Parameter(torch.zeros(4))

    model = nn.Sequential(L2Scaled(), nn.BatchNorm2d(4))
    assert filters.select(model, "norm_only") == ["1.weight", "1.bias"]
    model[0].norm_parameters = ("scale",)
    assert filters.select(model, "norm_only") == ["0.scale", "1.weight", "1.bias"]


def test_unknown_filter_is_an_error():
    with pytest.raises(ValueError, match="unknown update filter"):
        filters.select(nn.Linear(2, 2), "bias_only")


def test_combine_rejects_overlap_and_partition_unknown_names():
    a = {"w": torch.zeros(1)}
    with pytest.raises(KeyError):
        combine(a, a)
    with pytest.raises(KeyError):
        partition(a, ["missing"])


def _stages(count: int) -> nn.Module:
    return nn.Sequential(*[nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)) for _ in range(count)])


def test_top_block_is_the_last_of_the_first_shallowest_numbered_run():
    model = nn.Module()
    model.stem = nn.BatchNorm2d(3)
    for i in range(1, 5):
        setattr(model, f"stage{i}", _stages(2))
    for i in (3, 2, 1):  # a second run at the same depth (a feature pyramid) comes later: not the top block
        setattr(model, f"lateral{i}", _stages(1))
    assert filters.top_block(model) == "stage4"
    chosen = filters.select(model, "norm_but_top")
    assert set(chosen) == set(filters.select(model, "norm_only")) - {"stage4.0.1.weight", "stage4.0.1.bias",
                                                                     "stage4.1.1.weight", "stage4.1.1.bias"}
    vit = nn.Sequential(nn.Conv2d(3, 3, 1), nn.Sequential(*[nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3))
                                                            for _ in range(12)]))
    assert filters.top_block(vit) == "1.11"  # blocks 0..11 under one parent; the conv holds no norm


def test_top_block_named_by_the_model_wins_and_a_model_without_one_is_an_error():
    model = _stages(3)
    assert filters.top_block(model) == "2"
    model.top_block = "0"
    assert filters.select(model, "norm_but_top") == ["1.1.weight", "1.1.bias", "2.1.weight", "2.1.bias"]
    with pytest.raises(ValueError, match="cannot tell the top block.*model.top_block"):
        filters.select(nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)), "norm_but_top")


def test_clone_all_and_copy_give_fresh_equal_tensors_of_every_dtype():
    tensors = [torch.arange(6.0).reshape(2, 3).t(), torch.tensor(3), torch.tensor([True, False]), torch.tensor(-0.0)]
    fresh = clone_all(tensors)
    for old, new in zip(tensors, fresh):
        assert new.dtype == old.dtype and new.shape == old.shape and torch.equal(new, old)
        assert new.data_ptr() != old.data_ptr()
    assert torch.signbit(fresh[-1])  # bitwise copies: the sign of zero kept
    copied = copy({"a": tensors[0], "b": tensors[1]})
    tensors[0].add_(1)
    assert torch.equal(copied["a"], torch.arange(6.0).reshape(2, 3).t()) and list(copied) == ["a", "b"]


def test_foreach_ready_refuses_tensors_a_vmap_wraps():
    seen = []

    def probe(x):
        seen.append(foreach_ready([x, x]))
        return x

    torch.func.vmap(probe)(torch.ones(3, 2))
    assert seen == [False] and foreach_ready([torch.ones(2)]) and not foreach_ready([])


class _ViTBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm1, self.attn, self.norm2, self.mlp = nn.LayerNorm(4), nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 4)


def test_norm_but_top_selects_what_sars_reference_selects_on_a_vit_base_and_a_resnet():
    """SAR's reference code adapts the norms of blocks 0-8 of a 12-block ViT-Base (36 tensors: not blocks 9-11
    and not the final norm) and every BatchNorm of a ResNet but those of layer4."""
    vit = nn.Module()
    vit.patch_embed = nn.Conv2d(3, 4, 1)
    vit.blocks = nn.Sequential(*[_ViTBlock() for _ in range(12)])
    vit.norm, vit.head = nn.LayerNorm(4), nn.Linear(4, 2)
    chosen = filters.select(vit, "norm_but_top")
    assert len(chosen) == 36 and {n.split(".")[1] for n in chosen} == {str(i) for i in range(9)}
    assert filters.top_blocks(vit) == ("blocks.9", "blocks.10", "blocks.11")
    resnet = nn.Module()
    resnet.bn1 = nn.BatchNorm2d(3)
    for i in range(1, 5):
        setattr(resnet, f"layer{i}", _stages(2))
    resnet.fc = nn.Linear(3, 2)
    assert set(filters.select(resnet, "norm_but_top")) == {
        n for n in filters.select(resnet, "norm_only") if not n.startswith("layer4.")
    }
