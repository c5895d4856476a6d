"""The guarded driver: the one adaptation loop, a pure scan of guarded steps over K stacked streams.

``drive(carry, xs, batches, steps, root)`` runs ``steps`` steps of a method on the stacked batch ``xs`` (stream k
adapts on ``xs[k]``, whose batch index is ``batches[k]``). Every step draws its randomness from
``rng.step_key(root, batch, step)``, judges the new states with the guards (``guards.verdict``: a tensor per
stream) and keeps, per stream, the new state or the old one: a stopped step is rolled back by selection, so
params, buffers and optimiser state stay bitwise as they were. A stream a guard stopped takes no further step.

One stream is K = 1 of the same form: its update runs unvmapped (the fast path for one model) on a view of
the stacked state; K > 1 runs ``streams.streams_update``. The driver returns the new carry and one
``StepRecord`` per step (tensors; the shell formats them), and never touches a module.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import torch
from torch import Tensor

from yolozu.functional import guards, rng, streams
from yolozu.functional.state import tree_map
from yolozu.functional.step import Method, TTTState, make_update

ROW_METRICS = ("loss", "grad_norm", "update_norm", "total_update_norm", "backward_passes")
"""The metrics every step row carries; a method adds its own ``metric_names``."""


class Carry(NamedTuple):
    """What the driver carries from step to step.

    Attributes:
      state: the streams' states, per-stream parts stacked along a leading dim K (``streams.stack_states``).
      stop_code: ``(K,)`` int64: 0 while a stream runs, else the verdict that stopped it.
    """

    state: TTTState
    stop_code: Tensor


class StepRecord(NamedTuple):
    """One step of K streams: its index on the batch, the metrics (each ``(K,)``), the guards' verdicts, which
    streams took the step (``taken``) and which adopted its new state (``kept``)."""

    step: int
    metrics: dict
    verdict: Tensor
    taken: Tensor
    kept: Tensor


def start(source: TTTState, k: int = 1) -> Carry:
    """K streams starting from one source state, none stopped (K = 1 holds views of the source: nothing is
    updated in place).

    Args:
      source: the state every stream starts from (a single-stream ``TTTState``).
      k: the number of streams K.
    Returns:
      A ``Carry`` of K stacked states and a ``(K,)`` zero ``stop_code``."""
    state = streams.as_stacked(source) if k == 1 else streams.replicate(source, k)
    return Carry(state, torch.zeros(k, dtype=torch.int64, device=source.step.device))


def _one_stream(update: Callable) -> Callable:
    """``update`` of one unstacked stream, applied to a stacked state of K = 1 (views in, views out)."""

    def run(state: TTTState, xs: Any, noises: Any) -> tuple[TTTState, dict]:
        (single,) = streams.unstack_states(state, 1)
        noise = None if noises is None else tree_map(lambda t: t[0], noises)
        new, metrics = update(single, xs[0], noise)
        stacked = streams.as_stacked(new)
        return stacked, {name: value if name == "output" else value.unsqueeze(0) for name, value in metrics.items()}

    return run


def _choose(keep: Tensor, new: TTTState, old: TTTState) -> TTTState:
    """``streams.where`` without the copy when every stream (or none) keeps its new state."""
    flags = keep.tolist()
    if all(flags):
        return new
    if not any(flags):
        return old
    return streams.where(keep, new, old)


def make_driver(
    method: Method,
    limits: guards.GuardLimits,
    *,
    rollback: bool = True,
    keep_output: bool = False,
    capture: bool | str = False,
) -> Callable[[Carry, Any, Sequence[int], int, rng.Key], tuple[Carry, list[StepRecord]]]:
    """``drive(carry, xs, batches, steps, root, first_step=0) -> (carry, records)`` for ``method`` under the guard
    ``limits``; the steps on each batch are numbered from ``first_step`` (a batch met again when cycling).

    ``rollback``: a stopped step's state is dropped (default) or kept; the stream stops either way.
    ``keep_output`` adds each step's forward output to its metrics as ``output``. ``capture`` records each
    update as a CUDA graph per input shape and replays it (``yolozu.functional.capture``; eager on CPU).

    Args:
      method: the ``Method`` to step.
      limits: the ``guards.GuardLimits`` every step is checked against.
      rollback: whether a stopped step's state is dropped.
      keep_output: whether each record's metrics keep the forward output.
      capture: False, True or a capture backend (``maybe_captured``).
    Returns:
      ``drive``: ``carry`` a ``Carry`` of K streams, ``xs`` K stacked input batches ``(K, B, ...)``, ``batches`` their
      K batch indices (for the random keys), ``steps`` the steps per batch, ``root`` the run's ``rng.Key``; it
      returns the new carry and one ``StepRecord`` per step taken. A stopped stream takes no further step."""
    single = _one_stream(make_update(method, keep_output=keep_output, capture=capture))
    stacked = streams.streams_update(method, keep_output=keep_output, capture=capture)

    def drive(
        carry: Carry, xs: Any, batches: Sequence[int], steps: int, root: rng.Key, first_step: int = 0
    ) -> tuple[Carry, list[StepRecord]]:
        update = single if len(batches) == 1 else stacked
        records = []
        for s in range(first_step, first_step + steps):
            running = carry.stop_code == 0
            if not bool(running.any()):
                break
            keys = [rng.step_key(root, b, s) for b in batches]
            new, metrics = update(carry.state, xs, streams.draw(method, keys, carry.state.source, xs))
            verdict = guards.verdict(metrics, limits, method.stop_reasons)
            ok = verdict == 0
            keep = running & ok if rollback else running
            carry = Carry(_choose(keep, new, carry.state), torch.where(running & ~ok, verdict, carry.stop_code))
            records.append(StepRecord(s, metrics, verdict, running, keep))
        return carry, records

    return drive
