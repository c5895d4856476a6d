"""Model state as plain data: dicts of tensors keyed by ``named_parameters()`` / ``named_buffers()`` names.

Split once, explicit about what trains (equinox's ``partition``/``combine``):

    params, buffers = extract(model)
    trainable, frozen = partition(params, select(model, "norm_only"))
    out = functional_call(model, (combine(frozen, trainable), buffers), (x,))
"""

from __future__ import annotations

from typing import Callable, Collection, Mapping, Sequence, TypeVar

import torch
from torch import Tensor, nn
from torch._C._functorch import is_functorch_wrapped_tensor
from torch.utils import _pytree as pytree

Params = dict[str, Tensor]
T = TypeVar("T")


def extract(model: nn.Module) -> tuple[Params, Params]:
    """Detached copies of the model's parameters and buffers; the module itself is only a template.

    Args:
      model: the module.
    Returns:
      ``(params, buffers)``, each a dict of name -> tensor in the module's order."""
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    return params, buffers


def foreach_ready(tensors: Sequence[Tensor]) -> bool:
    """True when ``tensors`` can go through one multi-tensor (``torch._foreach_*``) call: some tensors, none of
    them wrapped by a ``torch.func`` transform (``vmap`` batches per-tensor ops only). Outside any transform
    no tensor is wrapped, which spares a look at each (a step asks several times over hundreds of tensors).

    Args:
      tensors: the tensors of one multi-tensor call.
    Returns:
      True when one call may take them all."""
    if not tensors:
        return False
    if torch._C._functorch.maybe_current_level() is None:
        return True
    return not any(is_functorch_wrapped_tensor(t) for t in tensors)


def clone_all(tensors: Sequence[Tensor]) -> list[Tensor]:
    """Fresh copies of ``tensors`` (no autograd history wanted) in one multi-tensor call where torch has one
    (``_foreach_clone``, 2.13 and later), else a fresh tensor each and one multi-tensor copy.

    Args:
      tensors: the tensors to copy.
    Returns:
      The copies, in order."""
    if not tensors:
        return []
    if hasattr(torch, "_foreach_clone"):
        return list(torch._foreach_clone(list(tensors)))
    fresh = [torch.empty_like(t) for t in tensors]
    with torch.no_grad():
        torch._foreach_copy_(fresh, list(tensors))
    return fresh


def copy(tensors: Mapping[str, Tensor]) -> Params:
    """New tensors equal to ``tensors`` (``clone`` of each). Outside ``torch.func`` transforms one multi-tensor
    call does them all: a clone per tensor is a kernel launch each, 159 for a ResNet-50's BatchNorm buffers.

    Args:
      tensors: a dict of name -> tensor.
    Returns:
      A new dict of copies, keyed like ``tensors``."""
    leaves = list(tensors.values())
    if not foreach_ready(leaves) or any(t.requires_grad for t in leaves):
        return {name: t.clone() for name, t in tensors.items()}
    return dict(zip(tensors.keys(), clone_all(leaves)))


def partition(params: Mapping[str, Tensor], selected: Collection[str]) -> tuple[Params, Params]:
    """Split ``params`` into (selected, rest), both keeping the original order; unknown names are an error.

    Args:
      params: a dict of name -> tensor.
      selected: names in ``params``.
    Returns:
      ``(selected, rest)``.
    Raises:
      KeyError: a selected name is not in ``params``."""
    chosen = set(selected)
    unknown = chosen.difference(params)
    if unknown:
        raise KeyError(f"partition: names not in params: {sorted(unknown)[:5]}")
    inside = {name: t for name, t in params.items() if name in chosen}
    outside = {name: t for name, t in params.items() if name not in chosen}
    return inside, outside


def combine(*parts: Mapping[str, Tensor]) -> Params:
    """Merge disjoint dicts back into one (the inverse of ``partition``); overlapping names are an error.

    Args:
      parts: disjoint dicts of name -> tensor.
    Returns:
      One dict.
    Raises:
      KeyError: two parts share a name."""
    merged: Params = {}
    for part in parts:
        overlap = merged.keys() & part.keys()
        if overlap:
            raise KeyError(f"combine: names present in more than one part: {sorted(overlap)[:5]}")
        merged.update(part)
    return merged


def count(params: Mapping[str, Tensor]) -> int:
    """Total number of elements (numel) of the tensors in ``params``.

    Args:
      params: a dict of name -> tensor.
    Returns:
      The number of elements."""
    return sum(t.numel() for t in params.values())


def tree_map(fn: Callable[..., Tensor], tree: T, *rest: T) -> T:
    """Apply ``fn`` leaf-wise over one or more pytrees of the same structure (dicts, tuples, NamedTuples).

    Args:
      fn: a function of one leaf of each tree.
      tree: the first tree.
      rest: more trees of the same structure.
    Returns:
      A tree of that structure holding ``fn``'s results."""
    return pytree.tree_map(fn, tree, *rest)


def tree_where(condition: Tensor, tree: T, other: T) -> T:
    """Leaf-wise ``torch.where(condition, tree, other)``: one tree or the other by a tensor verdict (a step a
    method skips or undoes), without a Python branch, so ``vmap`` batches it.

    Args:
      condition: a bool tensor broadcastable to every leaf (0-d, or ``(K,)`` within a stream's vmap).
      tree: the tree taken where ``condition`` holds.
      other: the tree taken elsewhere, of the same structure.
    Returns:
      A tree of that structure."""
    return pytree.tree_map(lambda a, b: torch.where(condition, a, b), tree, other)


def stack(trees: Sequence[T]) -> T:
    """Stack K pytrees of the same structure into one with a leading dim K (for ``torch.func.vmap``).

    Args:
      trees: K trees of the same structure and leaf shapes.
    Returns:
      One tree whose leaves are ``(K, *leaf.shape)``."""
    return pytree.tree_map(lambda *leaves: torch.stack(leaves), *trees)


def unstack(tree: T, k: int) -> list[T]:
    """The inverse of ``stack``: K pytrees, the i-th holding index i of every leaf.

    Args:
      tree: a tree whose leaves have a leading dim K.
      k: K.
    Returns:
      K trees."""
    return [pytree.tree_map(lambda leaf, i=i: leaf[i], tree) for i in range(k)]
