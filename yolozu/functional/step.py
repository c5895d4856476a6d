"""The state of one adapted model and the generic gradient step every method builds on.

A step is a pure function ``(state, batch, extra) -> (new_state, metrics)``: it reads parameters and buffers
from ``state``, never from the module (which is only a template for ``functional_call``), and returns new
tensors. Metrics are 0-d tensors so that ``torch.func.vmap`` can batch a step over K stacked states.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value

from yolozu.functional import optim
from yolozu.functional.rng import Key
from yolozu.functional.state import Params, combine, extract, partition

BN_MODES = ("running", "batch", "eval")
"""How BatchNorm normalises while adapting:

- ``running``: batch statistics; running statistics updated and returned in the new buffers (train mode,
  what a YOLOZU user gets from ``model.train()``);
- ``batch``: batch statistics; running statistics left as they were (the Tent paper's configuration);
- ``eval``: the stored running statistics; nothing updated.
"""

DIFFERENTIATE = ("autograd", "func")
"""``autograd``: ``torch.autograd.grad`` (fastest for one model); ``func``: ``torch.func.grad`` (composes with
``vmap``)."""


class TTTState(NamedTuple):
    """Everything a method step reads and returns.

    Attributes:
      trainable: the parameters being adapted (selected by the update filter).
      frozen: the other parameters.
      buffers: BatchNorm running statistics and any other buffers.
      opt_state: the optimiser's state over ``trainable``.
      source: ``trainable`` before adaptation (total update norm; CoTTA's stochastic restore).
      step: int64 count of steps taken.
      initial_loss: the first step's loss, measured before its update (NaN before the first step).
      extras: method-specific state (CoTTA's teacher), keyed by name.
    """

    trainable: Params
    frozen: Params
    buffers: Params
    opt_state: Any
    source: Params
    step: Tensor
    initial_loss: Tensor
    extras: dict = {}


class LossOutput(NamedTuple):
    """What a method's loss function returns beside the loss: new buffers, extra metrics, the raw output."""

    buffers: Params
    metrics: dict
    output: Any


LossFn = Callable[[Params, Params, Any, Any], tuple[Tensor, LossOutput]]
"""``loss_fn(params, buffers, batch, extra) -> (loss, LossOutput)``; ``params`` holds every parameter."""


def init_state(
    model: nn.Module,
    selected: Sequence[str],
    optimizer: optim.GradientTransformation,
    *,
    extras: dict | None = None,
) -> TTTState:
    """A fresh state: the model's tensors (copied), split by ``selected``, and the optimiser's initial state."""
    params, buffers = extract(model)
    trainable, frozen = partition(params, selected)
    device = next(iter(trainable.values())).device
    return TTTState(
        trainable=trainable,
        frozen=frozen,
        buffers=buffers,
        opt_state=optimizer.init(trainable),
        source=dict(trainable),
        step=torch.zeros((), dtype=torch.int64, device=device),
        initial_loss=torch.full((), float("nan"), device=device),
        extras=dict(extras or {}),
    )


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


Apply = Callable[..., tuple[Any, Params]]
"""``apply(params, buffers, x, **forward_kwargs) -> (output, new_buffers)``."""


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


def make_apply(model: nn.Module, bn: str = "running") -> Apply:
    """A pure forward over explicit tensors with the BatchNorm behaviour ``bn`` (see ``BN_MODES``).

    The buffers passed in are never modified: in the modes that normalise with batch statistics the module
    updates running statistics in place, so it runs on copies; ``running`` returns them, ``batch`` drops them.
    The module is only a template: its tensors are swapped for the given ones during the call (as
    ``torch.func.functional_call`` does; that function itself serves models with tied weights).
    """
    if bn not in BN_MODES:
        raise ValueError(f"unknown BatchNorm mode {bn!r}; choose one of {', '.join(BN_MODES)}")
    modules = list(model.modules())
    training = bn != "eval"
    slots = _slots(model)

    def apply(params: Params, buffers: Params, x: Any, **kwargs: Any) -> tuple[Any, Params]:
        work = {name: b.clone() for name, b in buffers.items()} if training else buffers
        with training_mode(modules, training):
            if slots is None:
                output = functional_call(model, (params, work), (x,), kwargs, tie_weights=True)
            else:
                with _swapped(slots, params, work):
                    output = model(x, **kwargs)
        return output, (work if bn == "running" else buffers)

    return apply


def _detach_tree(tree: Any) -> Any:
    return torch.utils._pytree.tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, tree)


def gradients_autograd(
    loss_fn: LossFn, trainable: Params, frozen: Params, buffers: Params, batch: Any, extra: Any
) -> tuple[Params, Tensor, LossOutput]:
    """Gradients of ``loss_fn`` w.r.t. ``trainable`` with ``torch.autograd.grad`` (outside any transform).

    Also the right tool for K streams: the loss of a vmapped forward is a vector whose sum has each stream's
    gradients in its own slice of the stacked params, and autograd keeps only what the backward needs.
    """
    leaves = {name: t.detach().requires_grad_(True) for name, t in trainable.items()}
    with torch.enable_grad():
        loss, aux = loss_fn(combine(frozen, leaves), buffers, batch, extra)
        found = torch.autograd.grad(loss.sum(), list(leaves.values()), allow_unused=True)
    grads = {name: torch.zeros_like(t) if g is None else g for (name, t), g in zip(leaves.items(), found)}
    # running statistics are updated outside autograd, so only the metrics and the raw output need detaching
    metrics = {name: value.detach() for name, value in aux.metrics.items()}
    return grads, loss.detach(), aux._replace(metrics=metrics, output=_detach_tree(aux.output))


def gradients_func(
    loss_fn: LossFn, trainable: Params, frozen: Params, buffers: Params, batch: Any, extra: Any
) -> tuple[Params, Tensor, LossOutput]:
    """Gradients of ``loss_fn`` w.r.t. ``trainable`` with ``torch.func.grad`` (composes with ``vmap``)."""

    def objective(leaves: Params) -> tuple[Tensor, LossOutput]:
        return loss_fn(combine(frozen, leaves), buffers, batch, extra)

    grads, (loss, aux) = grad_and_value(objective, has_aux=True)(trainable)
    return grads, loss, aux


def apply_gradients(
    optimizer: optim.GradientTransformation, state: TTTState, grads: Params, loss: Tensor, aux: LossOutput
) -> tuple[TTTState, dict]:
    """The optimiser step on ``grads``: the new state and the step's metrics.

    Metrics (0-d tensors): ``loss`` (before the update), ``grad_norm`` (before clipping), ``update_norm``,
    ``total_update_norm`` (||trainable - source||), ``initial_loss``, ``finite`` (loss, gradients and update
    all finite; non-finite batch statistics make the loss non-finite), plus the loss function's own.
    """
    updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
    trainable = optim.apply_updates(state.trainable, updates)
    grad_norm, update_norm, total_norm = optim.global_norms(grads, updates, optim.tree_sub(trainable, state.source))
    finite = torch.isfinite(loss) & torch.isfinite(grad_norm) & torch.isfinite(update_norm)
    initial_loss = torch.where(state.step == 0, loss, state.initial_loss)
    metrics = {
        "loss": loss,
        "grad_norm": grad_norm,
        "update_norm": update_norm,
        "total_update_norm": total_norm,
        "initial_loss": initial_loss,
        "finite": finite,
        **aux.metrics,
    }
    new_state = state._replace(
        trainable=trainable, buffers=aux.buffers, opt_state=opt_state, step=state.step + 1, initial_loss=initial_loss
    )
    return new_state, metrics


def pass_noise(state: TTTState, batch: Any, noise: Any) -> Any:
    del state, batch
    return noise


def _unchanged(old: TTTState, new: TTTState, metrics: dict, noise: Any) -> tuple[TTTState, dict]:
    del old, noise
    return new, metrics


def _no_noise(k: Key, state: TTTState, batch: Any) -> None:
    del k, state, batch


class Method(NamedTuple):
    """A TTT method as pure pieces, so one definition serves a single stream, ``vmap`` and K fast streams.

    One update is ``extra = prepare(state, batch, noise)``, a gradient step on
    ``loss_fn(params, buffers, batch, extra)`` with ``optimizer``, then ``finish(old, new, metrics, noise)``;
    ``draw(key, state, batch)`` makes the update's randomness (``noise``) from a key, outside any transform.
    """

    loss_fn: LossFn
    optimizer: optim.GradientTransformation
    prepare: Callable[[TTTState, Any, Any], Any] = pass_noise
    finish: Callable[[TTTState, TTTState, dict, Any], tuple[TTTState, dict]] = _unchanged
    draw: Callable[[Key, TTTState, Any], Any] = _no_noise


Update = Callable[[TTTState, Any, Any], tuple[TTTState, dict]]


def make_update(method: Method, *, differentiate: str = "autograd", keep_output: bool = False) -> Update:
    """``update(state, batch, noise) -> (new_state, metrics)``: one step of ``method`` with given randomness.

    ``differentiate``: ``autograd`` (fastest for one model) or ``func`` (composes with ``torch.func``
    transforms). ``keep_output`` adds the forward's output to the metrics as ``output``.
    """
    if differentiate not in DIFFERENTIATE:
        raise ValueError(f"differentiate must be one of {DIFFERENTIATE}, got {differentiate!r}")
    gradients = gradients_autograd if differentiate == "autograd" else gradients_func

    def update(state: TTTState, batch: Any, noise: Any = None) -> tuple[TTTState, dict]:
        extra = method.prepare(state, batch, noise)
        grads, loss, aux = gradients(method.loss_fn, state.trainable, state.frozen, state.buffers, batch, extra)
        new_state, metrics = apply_gradients(method.optimizer, state, grads, loss, aux)
        new_state, metrics = method.finish(state, new_state, metrics, noise)
        if keep_output:
            metrics["output"] = aux.output
        return new_state, metrics

    return update


def make_step(
    method: Method, *, differentiate: str = "autograd", keep_output: bool = False
) -> Callable[[TTTState, Any, Key | None], tuple[TTTState, dict]]:
    """``step(state, batch, key) -> (new_state, metrics)``: draws the method's randomness from ``key``, then
    ``make_update``'s update."""
    update = make_update(method, differentiate=differentiate, keep_output=keep_output)

    def step(state: TTTState, batch: Any, key: Key | None = None) -> tuple[TTTState, dict]:
        return update(state, batch, method.draw(key, state, batch))

    return step
