"""The state of one adapted model, a method as one value, and the gradient step every method builds on.

A step is a pure function ``(state, batch, noise) -> (new_state, metrics)``: it reads parameters and buffers
from ``state`` and runs the model through an ``apply`` function the bridge supplies (``yolozu.bridge``), so
the core never touches a module. Metrics are 0-d tensors, so ``torch.func.vmap`` can batch a step over K
stacked states.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import torch
from torch import Tensor, nn
from torch.func import grad_and_value

from yolozu.functional import optim
from yolozu.functional.capture import maybe_captured
from yolozu.functional.rng import Key
from yolozu.functional.state import Params, combine, extract, partition, tree_where

BN_MODES = ("running", "batch", "eval", "mix", "shrink")
"""How BatchNorm normalises while adapting:

- ``running``: batch statistics; running statistics updated and returned in the new buffers (train mode,
  what a YOLOZU user gets from ``model.train()``);
- ``batch``: batch statistics; running statistics left as they were (the Tent paper's configuration);
- ``eval``: the stored running statistics; nothing updated;
- ``mix``: the stored statistics as a prior of strength N images mixed with a batch of n images' own,
  ``mean = N/(N+n) mean_source + n/(N+n) mean_batch`` and the same for the variance (Schneider et al., NeurIPS
  2020, "Improving robustness against common corruptions by covariate shift adaptation"); nothing updated. For
  small batches and single images, where batch statistics alone are noisy and cost clean accuracy;
- ``shrink``: the batch's deviation from the stored statistics soft-thresholded at k standard errors (Gong et al.,
  NeurIPS 2022, instance-aware BatchNorm; ``yolozu.functional.norm_stats.shrunk_stats``); nothing updated. For
  single images: a clean image keeps the source statistics, a strongly shifted one moves to its own.
"""


def view_bn_mode(bn_mode: str) -> str:
    """The normalisation of an extra forward that must not update running statistics (a teacher's view, a
    second pass): ``bn_mode`` itself, ``batch`` in place of ``running``.

    Args:
      bn_mode: the adaptation's mode, one of ``BN_MODES``.
    Returns:
      The view's mode."""
    return "batch" if bn_mode == "running" else bn_mode

DIFFERENTIATE = ("autograd", "func")
"""``autograd``: ``torch.autograd.grad`` (fastest for one model); ``func``: ``torch.func.grad`` (composes with
``vmap``)."""

Apply = Callable[..., tuple[Any, Params]]
"""``apply(params, buffers, x, *, bn_mode, taps=(), **forward_kwargs) -> (output, new_buffers)``: the model as a
pure function (``yolozu.bridge.make_apply``). ``bn_mode`` is one of ``BN_MODES``; the buffers passed in are never
modified. With ``taps`` (names of layers) the output is ``(output, features)``: each named layer's output in the
same forward, keyed by name."""


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
      method_state: the method's own typed state (CoTTA's teacher; ``()`` for a method without one).
    """

    trainable: Params
    frozen: Params
    buffers: Params
    opt_state: Any
    source: Params
    step: Tensor
    initial_loss: Tensor
    method_state: Any = ()


class LossOutput(NamedTuple):
    """What a method's loss function returns beside the loss: new buffers, extra metrics, the raw output and,
    for a method whose own state moves with the forward (EATA's moving probabilities), its new state (``()``,
    an empty tree that ``vmap`` passes through: unchanged). Nothing in it carries gradients out of the step."""

    buffers: Params
    metrics: dict
    output: Any
    method_state: Any = ()


LossFn = Callable[[Params, Params, Any, Any], tuple[Tensor, LossOutput]]
"""``loss_fn(params, buffers, batch, extra) -> (loss, LossOutput)``; ``params`` holds every parameter."""


def init_state(
    model: nn.Module, selected: Sequence[str], optimizer: optim.GradientTransformation, *, method_state: Any = ()
) -> TTTState:
    """A fresh state: the model's tensors (copied), split by ``selected``, and the optimiser's initial state.

    Args:
      model: the module whose tensors are copied (left unchanged).
      selected: the names of the parameters to adapt.
      optimizer: the optimiser whose state is initialised over them.
      method_state: the method's own initial state.
    Returns:
      The ``TTTState``: step 0, ``initial_loss`` NaN, ``source`` the selected parameters."""
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
        method_state=method_state,
    )


def pass_noise(state: TTTState, batch: Any, noise: Any) -> Any:
    """The default ``prepare``: the loss gets the step's randomness as its ``extra`` input.

    Args:
      state: the state before the step (unused).
      batch: the step's batch (unused).
      noise: the step's randomness (``Method.draw``).
    Returns:
      ``noise``."""
    del state, batch
    return noise


def keep_new(old: TTTState, new: TTTState, metrics: dict, noise: Any) -> tuple[TTTState, dict]:
    """The default ``finish``: the optimiser's new state as it is.

    Args:
      old: the state before the step (unused).
      new: the state after the optimiser step.
      metrics: the step's metrics.
      noise: the step's randomness (unused).
    Returns:
      ``(new, metrics)`` unchanged."""
    del old, noise
    return new, metrics


def undo_where(undone: Tensor, old: TTTState, new: TTTState) -> TTTState:
    """``new``, or where ``undone`` (a 0-d bool, one per stream under ``vmap``) the weights, optimiser state and
    buffers of ``old``: a ``finish`` that discards a step it should not have taken (an optimiser with momentum
    moves the weights even on zero gradients), without a Python branch on the verdict.

    Args:
      undone: whether the step is discarded.
      old: the state before the step.
      new: the state after it.
    Returns:
      The kept state (``new``'s step count and method state either way)."""
    return new._replace(trainable=tree_where(undone, old.trainable, new.trainable),
                        opt_state=tree_where(undone, old.opt_state, new.opt_state),
                        buffers=tree_where(undone, old.buffers, new.buffers))  # fmt: skip


def no_noise(k: Key | None, source: Params, batch: Any) -> None:
    """The default ``draw``: a method without randomness.

    Args:
      k: the step's key (unused).
      source: the source parameters (unused).
      batch: the step's batch (unused).
    Returns:
      None."""
    del k, source, batch


def no_method_state(trainable: Params) -> tuple:
    """The default ``init``: no state of the method's own.

    Args:
      trainable: the adapted parameters (unused).
    Returns:
      ``()``."""
    del trainable
    return ()


def no_yolozu_keys(row: dict) -> dict:
    """The default ``yolozu_row``: no keys of YOLOZU's beyond the shared ones.

    Args:
      row: a step row.
    Returns:
      An empty dict.
    """
    del row
    return {}


def no_calibration(state: TTTState, batches: Any) -> TTTState:
    """The default ``calibrate``: a method that needs no in-distribution data.

    Args:
      state: the fresh state.
      batches: the in-distribution batches (unused).
    Returns:
      ``state``."""
    del batches
    return state


def adapted_params(state: TTTState) -> Params:
    """The default ``predict_params``: predictions use the adapted (trainable) parameters.

    Args:
      state: a method's state.
    Returns:
      ``state.trainable``."""
    return state.trainable


class Method(NamedTuple):
    """A TTT method as one value, the only holder of its knowledge (optax's init/update spirit).

    One update is ``extra = prepare(state, batch, noise)``, a gradient step on
    ``loss_fn(params, buffers, batch, extra)`` with ``optimizer``, then ``finish(old, new, metrics, noise)``.
    ``draw(key, source, batch)`` makes the update's randomness (``noise``) from a key and the shapes of the
    source params and the batch, outside any transform. ``init(trainable)`` makes the method's own state,
    ``predict_params(state)`` the parameters its predictions use. ``metric_names`` are the metrics it adds to
    a step row and ``row_fields`` constants every row of it carries; ``stop_reasons`` name bool metrics that
    stop the run like a guard (after ``guards.STOP_REASONS``). ``clean_forward`` says the loss runs one plain
    forward of the unaltered batch, so its output is a prediction of that batch. ``calibrate(state, batches)``
    returns the state after a look at in-distribution data (EATA's Fisher information; the registry names the
    setting that says which data). ``calls`` are the forward and backward passes of one update (YOLOZU's
    ``forward_calls``/``backward_calls``); ``optional_metrics`` may be NaN before they are first set (a row shows
    None for them, not a non-finite value); ``yolozu_row(row)`` gives YOLOZU's step keys for a row of this method
    (its own names beside ours; ``update_skipped: True`` when the kept step changed nothing). ``abstains(metrics)``,
    from the loss function's metrics, says that ``finish`` discards the update whatever the gradients (a 0-d
    bool): an eager update then skips the backward (``make_update``).
    """

    loss_fn: LossFn
    optimizer: optim.GradientTransformation
    prepare: Callable[[TTTState, Any, Any], Any] = pass_noise
    finish: Callable[[TTTState, TTTState, dict, Any], tuple[TTTState, dict]] = keep_new
    draw: Callable[[Key | None, Params, Any], Any] = no_noise
    init: Callable[[Params], Any] = no_method_state
    predict_params: Callable[[TTTState], Params] = adapted_params
    metric_names: tuple[str, ...] = ()
    row_fields: Mapping[str, Any] = {}
    stop_reasons: tuple[str, ...] = ()
    clean_forward: bool = False
    calibrate: Callable[[TTTState, Any], TTTState] = no_calibration
    calls: tuple[int, int] = (1, 1)
    optional_metrics: tuple[str, ...] = ()
    yolozu_row: Callable[[dict], dict] = no_yolozu_keys
    abstains: Callable[[dict], Tensor] | None = None

    def init_state(self, model: nn.Module, selected: Sequence[str]) -> TTTState:
        """A fresh state of this method over ``model``'s tensors, adapting the ``selected`` parameters.

        Args:
          model: the module whose tensors are copied (left unchanged).
          selected: the names of the parameters to adapt.
        Returns:
          The ``TTTState``, its ``method_state`` from ``init``."""
        state = init_state(model, selected, self.optimizer)
        return state._replace(method_state=self.init(state.trainable))


def _detach_tree(tree: Any) -> Any:
    return torch.utils._pytree.tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, tree)


def _autograd(
    fn: Callable[..., tuple[Tensor, Any]], params: Params, *args: Any, skip: Callable[[Any], bool] | None = None
) -> tuple[Params, Tensor, Any]:
    """``(grads, value, aux)`` of ``fn(params, *args) -> (scalar value, aux)`` by ``torch.autograd.grad``: the
    one place the core differentiates outside ``torch.func``. Parameters the value does not reach get zeros, and
    so do all when ``skip(aux)`` holds after the forward (the backward is not run)."""
    leaves = {name: t.detach().requires_grad_(True) for name, t in params.items()}
    with torch.enable_grad():
        value, aux = fn(leaves, *args)
        if skip is not None and skip(aux):
            found = [None] * len(leaves)
        else:
            found = torch.autograd.grad(value, list(leaves.values()), allow_unused=True)
    grads = {name: torch.zeros_like(t) if g is None else g for (name, t), g in zip(leaves.items(), found)}
    return grads, value, aux


def gradients_autograd(
    loss_fn: LossFn, trainable: Params, frozen: Params, buffers: Params, batch: Any, extra: Any,
    *, skip: Callable[[dict], bool] | None = None,
) -> tuple[Params, Tensor, LossOutput]:
    """Gradients of ``loss_fn`` w.r.t. ``trainable`` with ``torch.autograd.grad`` (outside any transform).

    Also the right tool for K streams: the loss of a vmapped forward is a vector whose sum has each stream's
    gradients in its own slice of the stacked params, and autograd keeps only what the backward needs.

    Args:
      loss_fn: the method's ``LossFn``.
      trainable: the parameters differentiated.
      frozen: the other parameters.
      buffers: the buffers.
      batch: the input batch.
      extra: ``prepare``'s output.
      skip: given the loss function's metrics after the forward, True to return zero gradients without the
        backward (an abstaining step, ``Method.abstains``).
    Returns:
      ``(grads, loss, aux)``: gradients keyed like ``trainable``; the loss (0-d, or ``(K,)`` for K streams),
      detached; the loss function's ``LossOutput`` with its metrics and output detached."""

    def summed(leaves: Params) -> tuple[Tensor, tuple[Tensor, LossOutput]]:
        loss, aux = loss_fn(combine(frozen, leaves), buffers, batch, extra)
        return loss.sum(), (loss, aux)

    grads, _, (loss, aux) = _autograd(summed, trainable, skip=skip and (lambda found: skip(found[1].metrics)))
    # running statistics are updated outside autograd, so only the metrics and the raw output need detaching
    metrics = {name: value.detach() for name, value in aux.metrics.items()}
    return grads, loss.detach(), aux._replace(metrics=metrics, output=_detach_tree(aux.output))


def gradients_func(
    loss_fn: LossFn, trainable: Params, frozen: Params, buffers: Params, batch: Any, extra: Any
) -> tuple[Params, Tensor, LossOutput]:
    """Gradients of ``loss_fn`` w.r.t. ``trainable`` with ``torch.func.grad`` (composes with ``vmap``).

    Args:
      loss_fn: the method's ``LossFn``.
      trainable: the parameters differentiated.
      frozen: the other parameters.
      buffers: the buffers.
      batch: the input batch.
      extra: ``prepare``'s output.
    Returns:
      ``(grads, loss, aux)`` as ``gradients_autograd``."""

    def objective(leaves: Params) -> tuple[Tensor, LossOutput]:
        return loss_fn(combine(frozen, leaves), buffers, batch, extra)

    grads, (loss, aux) = grad_and_value(objective, has_aux=True)(trainable)
    return grads, loss, aux


def apply_gradients(
    optimizer: optim.GradientTransformation, state: TTTState, grads: Params, loss: Tensor, aux: LossOutput
) -> tuple[TTTState, dict]:
    """The optimiser step on ``grads``: the new state and the step's metrics.

    Metrics (0-d tensors): ``loss`` (before the update), ``grad_norm`` (before clipping), ``update_norm``,
    ``initial_loss``, ``finite`` (loss, gradients and update all finite; non-finite batch statistics make the
    loss non-finite), plus the loss function's own. The method's state becomes ``aux.method_state`` when the
    loss function returned one.

    Args:
      optimizer: the method's ``GradientTransformation``.
      state: the state before the step.
      grads: gradients keyed like ``state.trainable``.
      loss: the loss before the update (0-d).
      aux: the loss function's ``LossOutput``.
    Returns:
      ``(new_state, metrics)``."""
    updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
    trainable = optim.apply_updates(state.trainable, updates)
    grad_norm, update_norm = optim.global_norms(grads, updates)
    finite = torch.isfinite(loss) & torch.isfinite(grad_norm) & torch.isfinite(update_norm)
    initial_loss = torch.where(state.step == 0, loss, state.initial_loss)
    metrics = {
        "loss": loss,
        "grad_norm": grad_norm,
        "update_norm": update_norm,
        "initial_loss": initial_loss,
        "finite": finite,
        **aux.metrics,
    }
    moved = not (isinstance(aux.method_state, tuple) and len(aux.method_state) == 0)
    method_state = aux.method_state if moved else state.method_state
    new_state = state._replace(
        trainable=trainable, buffers=aux.buffers, opt_state=opt_state, step=state.step + 1,
        initial_loss=initial_loss, method_state=method_state,
    )
    return new_state, metrics


def step_from_gradients(
    method: "Method", state: TTTState, grads: Params, loss: Tensor, aux: LossOutput, noise: Any,
    *, backward: bool = True,
) -> tuple[TTTState, dict]:
    """The rest of one update once the gradients are known: the optimiser step (``apply_gradients``), the
    method's ``finish`` (which may undo or change it: EATA's skip, SAR's recovery, CoTTA's restore), then
    ``total_update_norm`` = ||trainable - source|| of the state the step leaves, measured here only.

    Args:
      method: the ``Method``.
      state: the state before the step.
      grads: gradients keyed like ``state.trainable``.
      loss: the loss before the update (0-d).
      aux: the loss function's ``LossOutput``.
      noise: the step's randomness (passed to ``finish``).
      backward: whether the gradients came from the method's backward passes (False: an abstaining step's
        zeros, no backward run).
    Returns:
      ``(new_state, metrics)``, the metrics as ``apply_gradients`` and ``finish`` give them plus
      ``total_update_norm`` and ``backward_passes`` (the backward passes the update ran)."""
    new_state, metrics = apply_gradients(method.optimizer, state, grads, loss, aux)
    new_state, metrics = method.finish(state, new_state, metrics, noise)
    metrics["total_update_norm"] = optim.global_norm(optim.tree_sub(new_state.trainable, new_state.source))
    metrics["backward_passes"] = torch.zeros_like(loss) + (method.calls[1] if backward else 0)
    return new_state, metrics


def in_transform() -> bool:
    """True while a ``torch.func`` transform (``vmap``, ``grad``) runs, where ``torch.autograd.grad`` cannot.

    Returns:
      Whether a transform is active."""
    return torch._C._functorch.maybe_current_level() is not None


def grad_params(fn: Callable[..., Any], params: Params, *args: Any, has_aux: bool = False) -> Any:
    """Gradients of the scalar ``fn(params, *args)`` w.r.t. ``params`` (and its aux output with ``has_aux``).

    Inside a ``torch.func`` transform (K vmapped streams) this is ``torch.func.grad``; outside, plain
    ``torch.autograd.grad`` (``_autograd``), which also differentiates operators that ``torch.func`` cannot
    transform (a custom op without functorch support, such as torchvision's ``roi_align``). Parameters a loss
    does not reach get zero gradients.

    Args:
      fn: ``fn(params, *args) -> value`` (0-d), or ``-> (value, aux)`` with ``has_aux``.
      params: the dict of tensors differentiated.
      args: ``fn``'s other inputs.
      has_aux: whether ``fn`` returns an aux output too.
    Returns:
      the gradients keyed like ``params``; with ``has_aux``, ``(grads, aux)`` with ``aux`` detached."""
    if in_transform():
        return torch.func.grad(fn, has_aux=has_aux)(params, *args)
    grads, _, aux = _autograd(lambda p, *a: fn(p, *a) if has_aux else (fn(p, *a), None), params, *args)
    return (grads, _detach_tree(aux)) if has_aux else grads


Update = Callable[[TTTState, Any, Any], tuple[TTTState, dict]]


def make_update(
    method: Method, *, differentiate: str = "autograd", keep_output: bool = False, capture: bool | str = False
) -> Update:
    """``update(state, batch, noise) -> (new_state, metrics)``: one step of ``method`` with given randomness.

    ``differentiate``: ``autograd`` (fastest for one model) or ``func`` (composes with ``torch.func``
    transforms). ``keep_output`` adds the forward's output to the metrics as ``output``. ``capture`` records
    the update as a CUDA graph per input shape and replays it (``yolozu.functional.capture``; eager on CPU).
    A method that ``abstains`` skips the backward of an abstaining step when the update is eager, by
    ``autograd`` and not captured (a captured graph or a ``torch.func`` transform cannot branch on a value).

    Args:
      method: the ``Method``.
      differentiate: one of ``DIFFERENTIATE``.
      keep_output: whether the metrics keep the forward output.
      capture: False, True or a capture backend.
    Returns:
      The ``update`` function."""
    if differentiate not in DIFFERENTIATE:
        raise ValueError(f"differentiate must be one of {DIFFERENTIATE}, got {differentiate!r}")
    gradients = gradients_autograd if differentiate == "autograd" else gradients_func
    skip = None
    if method.abstains is not None and differentiate == "autograd" and not capture:
        skip = lambda metrics: bool(method.abstains(metrics))  # noqa: E731
        gradients = functools.partial(gradients_autograd, skip=skip)

    def update(state: TTTState, batch: Any, noise: Any = None) -> tuple[TTTState, dict]:
        extra = method.prepare(state, batch, noise)
        grads, loss, aux = gradients(method.loss_fn, state.trainable, state.frozen, state.buffers, batch, extra)
        backward = skip is None or not skip(aux.metrics)
        new_state, metrics = step_from_gradients(method, state, grads, loss, aux, noise, backward=backward)
        if keep_output:
            metrics["output"] = aux.output
        return new_state, metrics

    return maybe_captured(update, capture)


def make_step(
    method: Method, *, differentiate: str = "autograd", keep_output: bool = False, capture: bool | str = False
) -> Callable[[TTTState, Any, Key | None], tuple[TTTState, dict]]:
    """``step(state, batch, key) -> (new_state, metrics)``: draws the method's randomness from ``key`` (outside
    any capture), then ``make_update``'s update (``capture``: recorded as a CUDA graph and replayed).

    Args:
      method: the ``Method``.
      differentiate: one of ``DIFFERENTIATE``.
      keep_output: whether the metrics keep the forward output.
      capture: False, True or a capture backend.
    Returns:
      The ``step`` function."""
    update = make_update(method, differentiate=differentiate, keep_output=keep_output, capture=capture)

    def step(state: TTTState, batch: Any, key: Key | None = None) -> tuple[TTTState, dict]:
        return update(state, batch, method.draw(key, state.source, batch))

    return step
