"""Update filters: which parameters test-time training may change.

A filter picks a base set by module type or name, then ``include``/``exclude`` substrings of parameter
names narrow it (intersection with "contains any include", minus "contains any exclude"):

- ``all``: every parameter;
- ``norm_only``: direct parameters of BatchNorm1/2/3d, LayerNorm, GroupNorm, InstanceNorm1/2/3d (Tent), and the
  parameters a module names in its ``norm_parameters`` attribute (a normalisation written inline, e.g. SSD's
  learned L2-normalisation scale);
- ``adapter_only``: parameters of modules whose name or class name contains "adapter" or "lora", never
  those of the layer such a module wraps (a child named in ``WRAPPED``);
- ``lora_only``: likewise for "lora";
- ``lora_norm_only``: ``lora_only`` | ``norm_only``;
- ``norm_but_top``: ``norm_only`` minus the norm layers of the top blocks (SAR, Niu et al. 2023: the deepest
  blocks' norm layers get the noisiest gradients) and of a norm that follows them (a ViT's final norm). The
  top blocks are ``model.top_block`` (a module name) when the model says so, else the deepest quarter (at
  least one) of the model's first numbered run of sibling blocks holding norm layers, at the shallowest depth
  (``stage1..stage4`` -> ``stage4``, ``layer1..4`` -> ``layer4``, ``blocks.0..11`` -> ``blocks.9..11``), as
  SAR's reference code chooses for ResNets and ViT-Base.
"""

from __future__ import annotations

import re
from typing import Iterable, Sequence

from torch import nn

FILTERS = ("all", "norm_only", "adapter_only", "lora_only", "lora_norm_only", "norm_but_top")
NORM_TYPES = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
)
_NAME_TOKENS = {"adapter_only": ("adapter", "lora"), "lora_only": ("lora",)}


class EmptySelectionError(ValueError):
    """An update filter selected no parameter."""


def _joined(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


NORM_PARAMETERS = "norm_parameters"
"""A module attribute naming those of its direct parameters that are a normalisation's affine (``norm_only``)."""


def _norm_params(model: nn.Module) -> set[str]:
    chosen = set()
    for prefix, module in model.named_modules():
        declared = getattr(module, NORM_PARAMETERS, ())
        for name, _ in module.named_parameters(recurse=False):
            if isinstance(module, NORM_TYPES) or name in declared:
                chosen.add(_joined(prefix, name))
    return chosen


_NUMBERED = re.compile(r"^(.*?)(\d+)$")


def _block_run(model: nn.Module) -> list[str]:
    """The model's first numbered run of sibling blocks holding norm layers at the shallowest depth, in order."""
    holding = {
        prefix for prefix, module in model.named_modules() if any(isinstance(m, NORM_TYPES) for m in module.modules())
    }
    families: dict[tuple[int, str, str], list[tuple[int, str]]] = {}
    for name, _ in model.named_modules():
        parent, _, leaf = name.rpartition(".")
        match = _NUMBERED.match(leaf)
        if name and match and name in holding:
            families.setdefault((name.count("."), parent, match.group(1)), []).append((int(match.group(2)), name))
    runs = [(key[0], members) for key, members in families.items() if len(members) > 1]
    if not runs:
        raise ValueError(
            f"cannot tell the top block of {type(model).__name__}: it has no numbered blocks holding norm layers; "
            "set model.top_block = '<module name>' or use update filter norm_only with exclude"
        )
    shallowest = min(depth for depth, _ in runs)
    return [name for _, name in sorted(next(members for depth, members in runs if depth == shallowest))]


def top_blocks(model: nn.Module) -> tuple[str, ...]:
    """The blocks SAR leaves out (Niu et al. 2023; its reference code skips ``layer4`` of a ResNet's four stages
    and ``blocks.9``-``blocks.11`` of a 12-block ViT-Base): the deepest quarter of the model's block run (at least
    one block), or the one block ``model.top_block`` names. A ValueError when the model has neither.

    Args:
      model: the module whose blocks are looked for.
    Returns:
      The names of the blocks left out, shallowest first."""
    named = getattr(model, "top_block", None)
    if isinstance(named, str):
        return (named,)
    run = _block_run(model)
    return tuple(run[-max(1, len(run) // 4) :])


def top_block(model: nn.Module) -> str:
    """The name of the model's top block: the last of ``top_blocks``.

    Args:
      model: the module whose blocks are looked for.
    Returns:
      The deepest block's name (e.g. ``layer4`` of a ResNet)."""
    return top_blocks(model)[-1]


def _norm_but_top(model: nn.Module) -> set[str]:
    """``norm_only`` without the norm layers of ``top_blocks`` and of the norms that follow the blocks at their
    level or the level above (a ViT's final ``norm``, which the reference code skips too)."""
    tops = top_blocks(model)
    container = tops[-1].rpartition(".")[0]
    levels = {container, container.rpartition(".")[0]} if container else {""}
    after, trailing = False, []
    for name, module in model.named_modules():
        after = after or name == tops[-1]
        if after and isinstance(module, NORM_TYPES) and name.rpartition(".")[0] in levels:
            trailing.append(name + ".")
    skipped = tuple(top + "." for top in tops) + tuple(trailing)
    return {name for name in _norm_params(model) if not name.startswith(skipped)}


WRAPPED = ("base", "base_layer", "original_module")
"""Names of the layer an adapter module wraps (``LoRALinear.base``, PEFT's ``base_layer``): its weights are the
base model's, never the adapter's own."""


def _named_module_params(model: nn.Module, tokens: Sequence[str]) -> set[str]:
    chosen: set[str] = set()
    for prefix, module in model.named_modules():
        labels = (prefix.rsplit(".", 1)[-1].lower(), type(module).__name__.lower())
        if any(token in label for token in tokens for label in labels):
            chosen.update(
                _joined(prefix, name)
                for name, _ in module.named_parameters()
                if not any(part in WRAPPED for part in name.split(".")[:-1])
            )
    return chosen


def base_selection(model: nn.Module, update_filter: str) -> set[str]:
    """The parameter names ``update_filter`` picks before include/exclude.

    Args:
      model: the module whose parameters are filtered.
      update_filter: one of ``FILTERS`` (``all``, ``norm_only``, ``norm_but_top``, ...).
    Returns:
      The set of picked names."""
    if update_filter == "all":
        return {name for name, _ in model.named_parameters()}
    if update_filter == "norm_only":
        return _norm_params(model)
    if update_filter in _NAME_TOKENS:
        return _named_module_params(model, _NAME_TOKENS[update_filter])
    if update_filter == "lora_norm_only":
        return _norm_params(model) | _named_module_params(model, _NAME_TOKENS["lora_only"])
    if update_filter == "norm_but_top":
        return _norm_but_top(model)
    raise ValueError(f"unknown update filter {update_filter!r}; choose one of {', '.join(FILTERS)}")


def include_exclude(
    names: Iterable[str], include: Sequence[str] | None = None, exclude: Sequence[str] | None = None
) -> list[str]:
    """Names containing any ``include`` substring (all names when include is empty/None) and no ``exclude`` one.

    Args:
      names: the candidate names, in order.
      include: substrings of which a kept name contains at least one (None or empty: keep all).
      exclude: substrings of which a kept name contains none.
    Returns:
      The kept names, in the order of ``names``."""
    kept = []
    for name in names:
        if include and not any(part in name for part in include):
            continue
        if exclude and any(part in name for part in exclude):
            continue
        kept.append(name)
    return kept


def select(
    model: nn.Module,
    update_filter: str = "all",
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
) -> list[str]:
    """Names of the parameters the filter selects, in ``named_parameters()`` order: what a method adapts.

    Args:
      model: the module whose parameters are filtered.
      update_filter: one of ``FILTERS``.
      include: substrings of which a selected name contains at least one (None: no constraint).
      exclude: substrings of which a selected name contains none.
    Returns:
      The selected names.
    Raises:
      EmptySelectionError: nothing selected; the message names the filter and some parameter names."""
    base = base_selection(model, update_filter)
    ordered = [name for name, _ in model.named_parameters() if name in base]
    chosen = include_exclude(ordered, include, exclude)
    if not chosen:
        every = [name for name, _ in model.named_parameters()]
        sample = ", ".join(every[:6]) + (", ..." if len(every) > 6 else "") if every else "(the model has none)"
        raise EmptySelectionError(
            f"update filter {update_filter!r} (include={list(include or [])}, exclude={list(exclude or [])}) "
            f"selects no parameter of {type(model).__name__}; its parameters include: {sample}. "
            f"Choose another filter or loosen include/exclude."
        )
    return chosen
