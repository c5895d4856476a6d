"""K independent adaptation streams in one call: a method's update vmapped over K stacked states.

Each stream has its own trainable params, buffers, optimiser state, counters and method state (stacked along a
leading dim K); the frozen params and the source params are shared, passed unbatched, so K streams do not
hold K copies of the model. Per-stream inputs (a batch, a MIM mask, CoTTA's restore draws) carry the leading
dim K too; ``draw`` makes them from one key per stream.

    method = tent_method(make_apply(model), opt)
    states = replicate(method.init_state(model, names), k)     # K streams from the same source
    update_k = streams_update(method)
    states, metrics = update_k(states, batches)                # batches: (K, B, C, H, W)

``streams_update`` vmaps the forward pass and differentiates the summed per-stream losses with
``torch.autograd.grad`` outside the transform: the streams are independent, so each gets exactly its own
gradient, and autograd saves only what the backward needs. Differentiating inside the transform
(``vmap_step`` over a step built with ``differentiate="func"``) is the fully composable alternative; it
keeps about 1.8x the activation memory per stream (``make bench-streams``).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor
from torch.func import vmap

from yolozu.functional.capture import maybe_captured
from yolozu.functional.rng import Key
from yolozu.functional.state import combine, stack, tree_map, unstack
from yolozu.functional.step import LossOutput, Method, TTTState, gradients_autograd, pass_noise, step_from_gradients

__all__ = [
    "as_stacked",
    "draw",
    "replicate",
    "stack",
    "stack_states",
    "streams_update",
    "unstack_states",
    "vmap_step",
    "where",
]

_PER_STREAM = ("trainable", "buffers", "opt_state", "step", "initial_loss", "method_state")


def _per_stream(state: TTTState) -> tuple:
    return tuple(getattr(state, field) for field in _PER_STREAM)


def replicate(state: TTTState, k: int) -> TTTState:
    """K copies of one state's per-stream parts, stacked; frozen and source stay shared.

    Args:
      state: a single-stream state.
      k: K.
    Returns:
      A stacked state, per-stream leaves ``(K, ...)``."""
    return stack_states([state] * k)


def stack_states(states: Sequence[TTTState]) -> TTTState:
    """Stack the per-stream parts of K states; frozen and source are taken (shared) from the first.

    Args:
      states: K single-stream states of one method over one model.
    Returns:
      A stacked state, per-stream leaves ``(K, ...)``."""
    return _single(states[0], stack([_per_stream(s) for s in states]))


def as_stacked(state: TTTState) -> TTTState:
    """One state as a stacked state of K = 1, without copying (views).

    Args:
      state: a single-stream state.
    Returns:
      A stacked state, per-stream leaves ``(1, ...)``."""
    return _single(state, tree_map(lambda t: t.unsqueeze(0), _per_stream(state)))


def unstack_states(state: TTTState, k: int) -> list[TTTState]:
    """The K single-stream states of a stacked state.

    Args:
      state: a stacked state.
      k: K.
    Returns:
      K states."""
    return [_single(state, parts) for parts in unstack(_per_stream(state), k)]


def where(keep: Tensor, new: TTTState, old: TTTState) -> TTTState:
    """Per stream, the new state where ``keep`` (a bool vector of length K) holds, else the old one. An old
    leaf with fewer dims than the new one (a state whose shape a first step fixes, as EATA's moving average)
    broadcasts over the new dims.

    Args:
      keep: bool ``(K,)``.
      new: the stacked state after a step.
      old: the stacked state before it.
    Returns:
      A stacked state."""

    def pick(a: Tensor, b: Tensor) -> Tensor:
        b = b.reshape(b.shape + (1,) * (a.dim() - b.dim()))
        return torch.where(keep.reshape(keep.shape + (1,) * (a.dim() - 1)), a, b)

    return _single(old, tree_map(pick, _per_stream(new), _per_stream(old)))


def draw(method: Method, keys: Sequence[Key], source: dict, batches: Any) -> Any:
    """The per-stream randomness of one step, stacked: ``method.draw`` with stream k's key and batch (``source``
    is the shared source params); None for a method without randomness.

    Args:
      method: the ``Method``.
      keys: K step keys.
      source: the shared source parameters.
      batches: K batches (indexable along the first dim).
    Returns:
      The K draws stacked along a leading dim, or None."""
    noises = [method.draw(k, source, batch) for k, batch in zip(keys, batches)]
    return None if noises[0] is None else stack(noises)


def vmap_step(step: Callable[[TTTState, Any, Any], tuple[TTTState, dict]]) -> Callable:
    """``step`` over K stacked states: ``(stacked_state, batches, inputs) -> (stacked_state, metrics)``.

    ``step`` must be transform-safe (built with ``differentiate="func"``). ``inputs`` (per-stream masks,
    say) is batched like ``batches``; pass None when the step takes none. Metrics come back with dim K.

    Args:
      step: a transform-safe ``(state, batch, extra) -> (state, metrics)``.
    Returns:
      The vmapped ``run(stacked_state, batches, inputs=None)``."""

    def run(state: TTTState, batches: Any, inputs: Any = None) -> tuple[TTTState, dict]:
        def one_stream(parts: tuple, batch: Any, extra: Any) -> tuple[tuple, dict]:
            new, metrics = step(_single(state, parts), batch, extra)
            return _per_stream(new), metrics

        in_dims = (0, 0, _dim(inputs))
        parts, metrics = vmap(one_stream, in_dims=in_dims, randomness="error")(_per_stream(state), batches, inputs)
        return _single(state, parts), metrics

    return run


def _single(state: TTTState, parts: tuple) -> TTTState:
    return state._replace(**dict(zip(_PER_STREAM, parts)))


def _dim(tree: Any) -> int | None:
    return None if tree is None else 0


def streams_update(method: Method, *, keep_output: bool = False, capture: bool | str = False) -> Callable:
    """``method``'s update over K stacked states: ``(stacked_state, batches, noises) -> (stacked_state, metrics)``.

    ``noises`` are the per-stream draws (``method.draw`` for each stream's key, stacked), or None for a
    method without randomness. Equal, stream by stream, to K separate updates. ``capture``: recorded as a CUDA
    graph per input shape and replayed (``yolozu.functional.capture``).

    Args:
      method: the ``Method``.
      keep_output: whether the metrics keep the forward output (``(K, ...)``).
      capture: False, True or a capture backend.
    Returns:
      The K-stream update."""

    def run(state: TTTState, batches: Any, noises: Any = None) -> tuple[TTTState, dict]:
        parts = _per_stream(state)
        if method.prepare is pass_noise:
            extra = noises
        else:
            extra = vmap(lambda p, b, n: method.prepare(_single(state, p), b, n), in_dims=(0, 0, _dim(noises)))(
                parts, batches, noises
            )

        def per_stream_loss(trainable, buffers, batch, ex):
            return method.loss_fn(combine(state.frozen, trainable), buffers, batch, ex)

        def stacked_loss(trainable, buffers, batch, ex):
            return vmap(per_stream_loss, in_dims=(0, 0, 0, _dim(ex)))(trainable, buffers, batch, ex)

        grads, losses, aux = gradients_autograd(stacked_loss, state.trainable, {}, state.buffers, batches, extra)

        def finish(p, g, loss, buffers, loss_metrics, method_state, n):
            old = _single(state, p)
            aux_k = LossOutput(buffers, loss_metrics, None, method_state)
            new, metrics = step_from_gradients(method, old, g, loss, aux_k, n)
            return _per_stream(new), metrics

        new_parts, metrics = vmap(finish, in_dims=(0, 0, 0, 0, 0, _dim(aux.method_state), _dim(noises)))(
            parts, grads, losses, aux.buffers, aux.metrics, aux.method_state, noises
        )
        if keep_output:
            metrics["output"] = aux.output
        return _single(state, new_parts), metrics

    return maybe_captured(run, capture)
