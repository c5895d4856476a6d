"""The bridge between ``nn.Module`` and the pure core: the model as a pure function, and the write-back.

``make_apply(model)`` turns a module into ``apply(params, buffers, x, *, bn_mode)``, the only way the
functional core (``yolozu.functional``) runs a model: the module is a template whose tensor slots are filled
with the given tensors for the duration of the call. ``write_into`` is the one place adapted tensors are
copied back into a module. ``apply(..., taps=names)`` also returns the outputs of the named submodules in the
same forward (the features feature alignment reads). ``make_apply(model, batch_stats=hook)`` normalises every
BatchNorm layer with the statistics the hook returns instead of the layer's own batch statistics (a hook that
sums them over the ranks of a process group is synchronised BatchNorm: ``yolozu.parallel.collectives``).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from yolozu.functional.norm_stats import mixed_stats, shrunk_stats
from yolozu.functional.state import Params, copy
from yolozu.functional.step import BN_MODES, Apply

BN_PRIOR = 16.0
"""The default strength, in images, of the stored statistics in BatchNorm's ``mix`` mode (``step.BN_MODES``)."""
BN_SHRINK = 8.0
"""The default threshold, in standard errors, of BatchNorm's ``shrink`` mode (``step.BN_MODES``): the value chosen
for single images on the held-out corruptions (clean drop within 1 point; docs/benchmark-notes.md)."""

BatchStats = Callable[[Tensor], tuple[Tensor, Tensor, Tensor]]
"""``batch_stats(x) -> (mean, var, count)``: the per-channel mean and biased variance a BatchNorm layer normalises
its input ``x`` (``(N, C, ...)``) with, and the number of values per channel they summarise (a 0-d tensor)."""
Prior = Callable[..., tuple[Tensor, Tensor]]
"""``prior(mean, var, source_mean, source_var, *, count, size) -> (mean, var)``: how the ``mix`` and ``shrink``
modes combine a batch's statistics with the stored ones (``yolozu.functional.norm_stats``)."""


def local_batch_stats(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The statistics of ``x`` alone (what BatchNorm computes itself), as a ``BatchStats`` hook."""
    dims = [0, *range(2, x.dim())]
    var, mean = torch.var_mean(x, dim=dims, unbiased=False)
    return mean, var, torch.tensor(x.numel() // x.shape[1], dtype=mean.dtype, device=x.device)


@contextlib.contextmanager
def training_mode(modules: Sequence[nn.Module], training: bool) -> Iterator[None]:
    """Run with every module's ``training`` flag set to ``training``, then put the flags that changed back."""
    changed = [module for module in modules if module.training != training]
    for module in changed:
        module.training = training
    try:
        yield
    finally:
        for module in changed:
            module.training = not training


def _slots(model: nn.Module) -> dict[str, tuple[dict, str]] | None:
    """For every parameter and buffer name, the module dict (``_parameters``/``_buffers``) and key holding it;
    None when the model registers a tensor under two names (tied weights), which needs ``functional_call``'s
    untying."""
    slots: dict[str, tuple[dict, str]] = {}
    seen: set[int] = set()
    for prefix, module in model.named_modules(remove_duplicate=False):
        for kind in ("_parameters", "_buffers"):
            table = getattr(module, kind)
            for leaf, tensor in table.items():
                if tensor is None:
                    continue
                if id(tensor) in seen:
                    return None
                seen.add(id(tensor))
                slots[f"{prefix}.{leaf}" if prefix else leaf] = (table, leaf)
    return slots


@contextlib.contextmanager
def _swapped(slots: dict[str, tuple[dict, str]], *tensor_dicts: Params) -> Iterator[None]:
    """Temporarily put the given tensors in the module's parameter and buffer slots (what ``functional_call``
    does, without its per-call name resolution, which costs about 0.5 ms per step on a ResNet-18)."""
    saved = []
    try:
        for tensors in tensor_dicts:
            for name, tensor in tensors.items():
                try:
                    table, leaf = slots[name]
                except KeyError:
                    raise KeyError(f"{name!r} is not a parameter or buffer of the model") from None
                saved.append((table, leaf, table[leaf]))
                table[leaf] = tensor
        yield
    finally:
        for table, leaf, original in reversed(saved):
            table[leaf] = original


def _update_running(module: nn.modules.batchnorm._BatchNorm, mean: Tensor, var: Tensor, count: Tensor) -> None:
    """The running-statistics update BatchNorm makes in training mode (the unbiased variance), in place."""
    with torch.no_grad():
        module.num_batches_tracked.add_(1)
        factor = module.momentum if module.momentum is not None else 1.0 / float(module.num_batches_tracked)
        unbiased = var * (count / (count - 1).clamp_min(1))
        module.running_mean.copy_(module.running_mean * (1 - factor) + mean * factor)
        module.running_var.copy_(module.running_var * (1 - factor) + unbiased * factor)


def _normalise(module: nn.modules.batchnorm._BatchNorm, x: Tensor, mean: Tensor, var: Tensor) -> Tensor:
    """BatchNorm's output for ``x`` with the per-channel ``mean`` and ``var`` given, and the layer's affine."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    y = (x - mean.reshape(shape)) * torch.rsqrt(var.reshape(shape) + module.eps)
    if module.affine:
        y = y * module.weight.reshape(shape) + module.bias.reshape(shape)
    return y.to(x.dtype)


def _hooked_norm(module: nn.modules.batchnorm._BatchNorm, batch_stats: BatchStats) -> Callable[[Tensor], Tensor]:
    """``module``'s training-mode forward, normalising with the statistics ``batch_stats`` returns."""

    def forward(x: Tensor) -> Tensor:
        mean, var, count = batch_stats(x)
        if module.track_running_stats and module.running_mean is not None:
            _update_running(module, mean.detach(), var.detach(), count.detach())
        return _normalise(module, x, mean, var)

    return forward


def _prior_norm(module: nn.modules.batchnorm._BatchNorm, batch_stats: BatchStats | None, prior: Prior) -> Callable:
    """``module``'s forward normalising with the batch's statistics combined with its stored ones by ``prior``
    (``step.BN_MODES``, ``mix`` and ``shrink``); running statistics are not updated. Under a shared
    ``batch_stats`` the batch is every rank's. A layer that stores no statistics normalises with the batch's."""

    def forward(x: Tensor) -> Tensor:
        if batch_stats is None:
            var, mean = torch.var_mean(x, dim=[0, *range(2, x.dim())], unbiased=False)
            count: Any = x.numel() // x.shape[1]
        else:
            mean, var, count = batch_stats(x)
        if module.running_mean is not None:
            source = (module.running_mean.to(mean.dtype), module.running_var.to(var.dtype))
            mean, var = prior(mean, var, *source, count=count, size=x[0, 0].numel())
        return _normalise(module, x, mean, var)

    return forward


@contextlib.contextmanager
def _tapped(modules: Mapping[str, nn.Module], names: Sequence[str], into: dict[str, Any]) -> Iterator[None]:
    """Record the output of each named submodule into ``into`` (by name) for the duration of a forward."""
    if not names:
        yield
        return
    missing = [name for name in names if name not in modules]
    if missing:
        raise KeyError(
            f"layer {missing[0]!r} is not a submodule of the model; name one of its modules (e.g. "
            f"{', '.join(list(modules)[1:6])})"
        )
    handles = [
        modules[name].register_forward_hook(lambda module, args, output, name=name: into.__setitem__(name, output))
        for name in names
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def _norms_using(
    norms: Sequence[nn.Module], batch_stats: BatchStats | None, prior: Prior | None = None
) -> Iterator[None]:
    """Every BatchNorm layer of ``norms`` normalising with ``batch_stats`` for the duration (nothing without one),
    or, given a ``prior``, with the batch's statistics combined with the stored ones by it (``_prior_norm``)."""
    if batch_stats is None and prior is None:
        yield
        return
    for module in norms:
        module.forward = _hooked_norm(module, batch_stats) if prior is None else _prior_norm(module, batch_stats, prior)
    try:
        yield
    finally:
        for module in norms:
            del module.forward


def make_apply(
    model: nn.Module,
    forward: Callable[..., Any] | None = None,
    *,
    batch_stats: BatchStats | None = None,
    bn_prior: float = BN_PRIOR,
    bn_shrink: float = BN_SHRINK,
) -> Apply:
    """``model`` as a pure forward over explicit tensors: ``apply(params, buffers, x, *, bn_mode="running",
    taps=(), **forward_kwargs) -> (output, new_buffers)``, with the BatchNorm behaviour ``bn_mode`` (``BN_MODES``).
    With ``taps`` (names of submodules, ``named_modules()``'s) the output is ``(output, features)``, features a
    dict of each named submodule's output in that same forward.
    ``forward(model, x, **forward_kwargs)`` replaces ``model(x, ...)`` (e.g. a user's ``recon_fn``); it sees
    the module holding the given tensors. ``batch_stats`` (``BatchStats``), in the modes that normalise with
    batch statistics, gives the statistics every BatchNorm layer uses and updates its running ones with;
    ``bn_prior`` is the strength, in images, of the stored statistics in the ``mix`` mode, ``bn_shrink`` the
    threshold, in standard errors, of the ``shrink`` mode.

    The buffers passed in are never modified: in the modes that normalise with batch statistics the module
    updates running statistics in place, so it runs on copies; ``running`` returns them, ``batch`` drops them.
    """
    modules = list(model.modules())
    named = dict(model.named_modules())
    norms = [module for module in modules if isinstance(module, nn.modules.batchnorm._BatchNorm)]
    slots = _slots(model)
    call = forward if forward is not None else (lambda module, x, **kwargs: module(x, **kwargs))
    priors = {"mix": functools.partial(mixed_stats, prior=bn_prior),
              "shrink": functools.partial(shrunk_stats, k=bn_shrink)}

    def apply(
        params: Params, buffers: Params, x: Any, *, bn_mode: str = "running", taps: Sequence[str] = (), **kwargs: Any
    ) -> tuple:
        if bn_mode not in BN_MODES:
            raise ValueError(f"unknown BatchNorm mode {bn_mode!r}; choose one of {', '.join(BN_MODES)}")
        training = bn_mode != "eval"
        work = copy(buffers) if bn_mode in ("running", "batch") else buffers  # those update running statistics
        prior = priors.get(bn_mode)
        features: dict[str, Any] = {}
        with training_mode(modules, training), _norms_using(norms, batch_stats if training else None, prior), \
                _tapped(named, taps, features):
            if slots is None and forward is None:
                output = functional_call(model, (params, work), (x,), kwargs, tie_weights=True)
            elif slots is None:
                with torch.nn.utils.stateless._reparametrize_module(model, {**params, **work}, tie_weights=True):
                    output = call(model, x, **kwargs)
            else:
                with _swapped(slots, params, work):
                    output = call(model, x, **kwargs)
        new_buffers = work if bn_mode == "running" else buffers
        return ((output, features) if taps else output), new_buffers

    return apply


def write_into(module: nn.Module, tensors: Mapping[str, Tensor]) -> None:
    """Copy tensors into the module's parameters and buffers of the same names, bitwise."""
    targets = dict(module.named_parameters())
    targets.update(module.named_buffers())
    with torch.no_grad():
        for name, value in tensors.items():
            targets[name].copy_(value)
