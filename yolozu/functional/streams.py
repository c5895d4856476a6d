"""K independent adaptation streams in one call: a method step vmapped over K stacked states.

Each stream has its own trainable params, buffers, optimiser state, counters and extras (stacked along a
leading dim K); the frozen params and the source params are shared, passed unbatched, so K streams do not
hold K copies of the model. Per-stream inputs (a batch, a MIM mask) carry the leading dim K too.

    states = replicate(init_state(model, names, opt), k)       # K streams from the same source
    step_k = vmap_step(make_tent_step(model, opt, differentiate="func"))
    states, metrics = step_k(states, batches)                  # batches: (K, B, C, H, W)
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from torch.func import vmap

from yolozu.functional.state import stack, unstack
from yolozu.functional.step import TTTState

_PER_STREAM = ("trainable", "buffers", "opt_state", "step", "initial_loss", "extras")


def _per_stream(state: TTTState) -> tuple:
    return tuple(getattr(state, field) for field in _PER_STREAM)


def replicate(state: TTTState, k: int) -> TTTState:
    """K copies of one state's per-stream parts, stacked; frozen and source stay shared."""
    return stack_states([state] * k)


def stack_states(states: Sequence[TTTState]) -> TTTState:
    """Stack the per-stream parts of K states; frozen and source are taken (shared) from the first."""
    stacked = stack([_per_stream(s) for s in states])
    return states[0]._replace(**dict(zip(_PER_STREAM, stacked)))


def unstack_states(state: TTTState, k: int) -> list[TTTState]:
    """The K single-stream states of a stacked state."""
    return [state._replace(**dict(zip(_PER_STREAM, parts))) for parts in unstack(_per_stream(state), k)]


def vmap_step(step: Callable[[TTTState, Any, Any], tuple[TTTState, dict]]) -> Callable:
    """``step`` over K stacked states: ``(stacked_state, batches, inputs) -> (stacked_state, metrics)``.

    ``step`` must be transform-safe (built with ``differentiate="func"``). ``inputs`` (per-stream masks,
    say) is batched like ``batches``; pass None when the step takes none. Metrics come back with dim K.
    """

    def run(state: TTTState, batches: Any, inputs: Any = None) -> tuple[TTTState, dict]:
        def one_stream(parts: tuple, batch: Any, extra: Any) -> tuple[tuple, dict]:
            single = state._replace(**dict(zip(_PER_STREAM, parts)))
            new, metrics = step(single, batch, extra)
            return _per_stream(new), metrics

        in_dims = (0, 0, None if inputs is None else 0)
        parts, metrics = vmap(one_stream, in_dims=in_dims, randomness="error")(_per_stream(state), batches, inputs)
        return state._replace(**dict(zip(_PER_STREAM, parts))), metrics

    return run
