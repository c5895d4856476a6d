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


def _has_tied_tensors(model: nn.Module) -> bool:
    unique = sum(1 for _ in model.named_parameters()) + sum(1 for _ in model.named_buffers())
    every = sum(1 for _ in model.named_parameters(remove_duplicate=False))
    every += sum(1 for _ in model.named_buffers(remove_duplicate=False))
    return every != unique


def make_apply(model: nn.Module, bn: str = "running") -> Apply:
    """A pure forward over explicit tensors with the BatchNorm behaviour ``bn`` (see ``BN_MODES``).

    The buffers passed in are never modified: in the modes that normalise with batch statistics the module
    updates running statistics in place, so it runs on copies; ``running`` returns them, ``batch`` drops them.
    """
    if bn not in BN_MODES:
        raise ValueError(f"unknown BatchNorm mode {bn!r}; choose one of {', '.join(BN_MODES)}")
    modules = list(model.modules())
    training = bn != "eval"
    tie_weights = _has_tied_tensors(model)  # untying costs time on every call; only pay it when needed

    def apply(params: Params, buffers: Params, x: Any, **kwargs: Any) -> tuple[Any, Params]:
        work = {name: b.clone() for name, b in buffers.items()} if training else buffers
        with training_mode(modules, training):
            output = functional_call(model, (params, work), (x,), kwargs, tie_weights=tie_weights)
        return output, (work if bn == "running" else buffers)

    return apply


def _detach_tree(tree: Any) -> Any:
    return torch.utils._pytree.tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, tree)


def _grads_autograd(loss_fn: LossFn, state: TTTState, batch: Any, extra: Any) -> tuple[Params, Tensor, LossOutput]:
    leaves = {name: t.detach().requires_grad_(True) for name, t in state.trainable.items()}
    with torch.enable_grad():
        loss, aux = loss_fn(combine(state.frozen, leaves), state.buffers, batch, extra)
        found = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    grads = {name: torch.zeros_like(t) if g is None else g for (name, t), g in zip(leaves.items(), found)}
    # running statistics are updated outside autograd, so only the metrics and the raw output need detaching
    metrics = {name: value.detach() for name, value in aux.metrics.items()}
    return grads, loss.detach(), aux._replace(metrics=metrics, output=_detach_tree(aux.output))


def _grads_func(loss_fn: LossFn, state: TTTState, batch: Any, extra: Any) -> tuple[Params, Tensor, LossOutput]:
    def objective(trainable: Params) -> tuple[Tensor, LossOutput]:
        return loss_fn(combine(state.frozen, trainable), state.buffers, batch, extra)

    grads, (loss, aux) = grad_and_value(objective, has_aux=True)(state.trainable)
    return grads, loss, aux


def make_gradient_step(
    loss_fn: LossFn,
    optimizer: optim.GradientTransformation,
    *,
    differentiate: str = "autograd",
    keep_output: bool = False,
) -> Callable[[TTTState, Any, Any], tuple[TTTState, dict]]:
    """One optimiser step on ``loss_fn``: gradients of the trainable params, update, new state and metrics.

    Metrics (0-d tensors): ``loss`` (before the update), ``grad_norm`` (before clipping), ``update_norm``,
    ``total_update_norm`` (||trainable - source||), ``initial_loss``, ``finite`` (loss, gradients and update
    all finite; non-finite batch statistics make the loss non-finite), plus the loss function's own;
    ``output`` (the forward's output) when ``keep_output``.
    """
    if differentiate not in DIFFERENTIATE:
        raise ValueError(f"differentiate must be one of {DIFFERENTIATE}, got {differentiate!r}")
    gradients = _grads_autograd if differentiate == "autograd" else _grads_func

    def step(state: TTTState, batch: Any, extra: Any = None) -> tuple[TTTState, dict]:
        grads, loss, aux = gradients(loss_fn, state, batch, extra)
        grad_norm = optim.global_norm(grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
        trainable = optim.apply_updates(state.trainable, updates)
        update_norm = optim.global_norm(updates)
        finite = torch.isfinite(loss) & torch.isfinite(grad_norm) & torch.isfinite(update_norm)
        initial_loss = torch.where(state.step == 0, loss, state.initial_loss)
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "update_norm": update_norm,
            "total_update_norm": optim.global_norm(optim.tree_sub(trainable, state.source)),
            "initial_loss": initial_loss,
            "finite": finite,
            **aux.metrics,
        }
        if keep_output:
            metrics["output"] = aux.output
        new_state = state._replace(
            trainable=trainable,
            buffers=aux.buffers,
            opt_state=opt_state,
            step=state.step + 1,
            initial_loss=initial_loss,
        )
        return new_state, metrics

    return step
