"""Captured steps: a pure function of fixed-shape tensors recorded once as a CUDA graph, then replayed.

At small batches a GPU step is launch-bound: the CPU spends longer issuing a step's hundreds of kernels than the
GPU spends running them. ``captured(fn)`` records ``fn`` once per input signature (tree structure, shapes,
dtypes, devices) with ``torch.cuda.graph`` and replays the recording, one launch per call. Purity makes this
safe: a call copies its inputs into the graph's own input tensors, replays, and copies the outputs out into
fresh tensors, so the caller's inputs are never written and a result stays valid after later calls. Inputs
that ``fn`` passes through unchanged (frozen parameters, the source) are read where they are, not copied; a
call that passes other tensors in their place captures again. A new shape (the last, smaller batch) is a new
capture; on tensors that are not on CUDA, ``fn`` runs eagerly. At small batches the host's work per call is
what a captured step costs, so it is kept to a flatten, a check against the last recording, one multi-tensor
copy in and one multi-tensor clone out.

``fn`` must be capturable: no reads of tensor values on the CPU (``.item()``, ``bool(t)``), no shapes that
depend on values, randomness passed in as inputs (the core draws it from keys outside the step).
"""

from __future__ import annotations

from typing import Any, Callable, Hashable, NamedTuple

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_unflatten

from yolozu.functional.state import clone_all

BACKENDS = ("auto", "eager", "cuda", "rerun")
"""``auto``: a CUDA graph when the inputs are on CUDA, else eager; ``eager``: ``fn`` itself; ``cuda``: a CUDA
graph (an error elsewhere); ``rerun``: the captured path with ``fn`` run again instead of a replay, which checks
the input and output handling on any device."""


def _metas(leaves: list) -> list:
    """What a recording is valid for, leaf by leaf: each tensor's shape, dtype and device, other leaves' value
    (strides need not match: inputs are copied into the recording's own tensors)."""
    return [(x.shape, x.dtype, x.device) if isinstance(x, Tensor) else ("value", repr(x)) for x in leaves]


def _address(t: Tensor) -> tuple:
    return t.data_ptr(), t.stride()


def _copy_all(targets: list[Tensor], sources: list[Tensor]) -> None:
    """``targets[i] <- sources[i]`` with one multi-tensor copy per dtype (a launch or two, not one per tensor)."""
    if not targets:
        return
    with torch.no_grad():
        torch._foreach_copy_(targets, sources)


class _Recording(NamedTuple):
    """One captured signature: the graph, its input tensors (static ones copied into, direct ones read in
    place), its outputs, and for each output leaf where it comes from."""

    replay: Callable[[], None]
    spec: Any  # the input tree's structure
    metas: list  # ``_metas`` of the input leaves
    static_index: list[int]  # input leaf positions copied into ``statics``
    statics: list[Tensor]
    direct: dict[int, Tensor]  # input leaf position -> the tensor read in place (held: its memory stays its own)
    direct_addresses: list[tuple[int, tuple]]  # (position, ``_address``) of each direct input
    out_spec: Any
    graph_outputs: list[Tensor]  # the output tensors the graph writes (cloned out at every call)
    out_plan: list[tuple[str, Any]]  # per output leaf: ("input", position), ("graph", index) or ("value", leaf)


def _passed_through(fn: Callable, args: tuple, leaves: list) -> set[int]:
    """Run ``fn`` once on the caller's inputs (a warm-up) and return the input positions it returns unchanged."""
    out_leaves, _ = tree_flatten(fn(*args))
    ids = {id(x): i for i, x in enumerate(leaves) if isinstance(x, Tensor)}
    return {ids[id(x)] for x in out_leaves if isinstance(x, Tensor) and id(x) in ids}


def _record(fn: Callable, args: tuple, backend: str, warmup: int, pool: Any) -> _Recording:
    leaves, spec = tree_flatten(args)
    tensors = [i for i, x in enumerate(leaves) if isinstance(x, Tensor)]
    on_cuda = backend == "cuda"
    stream = torch.cuda.Stream() if on_cuda else None
    if on_cuda:
        stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # no-op for None
        through = _passed_through(fn, args, leaves)
        static_index = [i for i in tensors if i not in through]
        statics = [torch.empty_like(leaves[i]) for i in static_index]
        _copy_all(statics, [leaves[i] for i in static_index])
        inputs = list(leaves)
        for i, t in zip(static_index, statics):
            inputs[i] = t
        static_args = tree_unflatten(inputs, spec)
        for _ in range(warmup - 1):
            fn(*static_args)
    if on_cuda:
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: the loader's pinning thread may use CUDA meanwhile
            with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                out = fn(*static_args)
        except RuntimeError as error:
            raise RuntimeError(
                f"this step cannot be captured as a CUDA graph ({error}); run it uncaptured (capture=False, "
                "--no-ttt-capture)"
            ) from error
        replay = graph.replay
    else:
        out = fn(*static_args)
        replay = None
    out_leaves, out_spec = tree_flatten(out)
    ids = {id(x): i for i, x in enumerate(inputs) if isinstance(x, Tensor)}
    graph_outputs: list[Tensor] = []
    out_plan: list[tuple[str, Any]] = []
    for x in out_leaves:
        if isinstance(x, Tensor) and id(x) in ids:
            out_plan.append(("input", ids[id(x)]))
        elif isinstance(x, Tensor):
            out_plan.append(("graph", len(graph_outputs)))
            graph_outputs.append(x)
        else:
            out_plan.append(("value", x))
    if replay is None:  # rerun: run fn again on the same input tensors and copy its results into the outputs

        def replay() -> None:
            again, _ = tree_flatten(fn(*static_args))
            fresh = [a for a, (kind, _) in zip(again, out_plan) if kind == "graph"]
            _copy_all(graph_outputs, fresh)

    direct = {i: leaves[i] for i in through}
    addresses = [(i, _address(t)) for i, t in direct.items()]
    return _Recording(replay, spec, _metas(leaves), static_index, statics, direct, addresses, out_spec,
                      graph_outputs, out_plan)


def _run(recording: _Recording, leaves: list) -> Any:
    """Copy the inputs in, replay, and clone the outputs into fresh tensors (one multi-tensor clone)."""
    _copy_all(recording.statics, [leaves[i] for i in recording.static_index])
    recording.replay()
    fresh = clone_all(recording.graph_outputs)
    result = [
        leaves[where] if kind == "input" else fresh[where] if kind == "graph" else where
        for kind, where in recording.out_plan
    ]
    return tree_unflatten(result, recording.out_spec)


def _valid(recording: _Recording | None, spec: Any, metas: list, leaves: list) -> bool:
    """``recording`` fits inputs of this structure and these leaves (passed-through ones where they were)."""
    return (
        recording is not None
        and recording.spec == spec
        and recording.metas == metas
        and all(_address(leaves[i]) == address for i, address in recording.direct_addresses)
    )


def _backend_for(leaves: list, backend: str) -> str:
    if backend != "auto":
        return backend
    devices = {x.device.type for x in leaves if isinstance(x, Tensor)}
    return "cuda" if devices == {"cuda"} else "eager"


def captured(fn: Callable, *, backend: str = "auto", warmup: int = 3, cache_size: int = 4) -> Callable:
    """``fn`` (pure, over trees of tensors) recorded once per input signature and replayed (module docstring).

    ``warmup``: eager runs before a capture (the first on the caller's inputs finds the passed-through ones);
    ``cache_size``: recordings kept, the least recently used dropped first. The function returned has
    ``recordings()``, the number of captures made so far, and ``replays()``, the replay of each recording kept
    (least recently used first): a replay alone is the GPU's time per call, without the host's copies.

    Args:
      fn: a pure function over trees of tensors (no Python branch on a tensor's value).
      backend: one of ``BACKENDS`` (``auto``: CUDA graphs on a GPU, eager elsewhere).
      warmup: eager runs before a capture.
      cache_size: how many recordings are kept.
    Returns:
      A function with ``fn``'s signature and results, plus ``recordings()`` and ``replays()``."""
    if backend not in BACKENDS:
        raise ValueError(f"capture backend must be one of {BACKENDS}, got {backend!r}")
    if warmup < 1:
        raise ValueError(f"warmup must be at least 1 (the run that finds the passed-through inputs), got {warmup}")
    cache: dict[Hashable, _Recording] = {}
    made = [0]
    pool: list[Any] = []

    def call(*args: Any) -> Any:
        leaves, spec = tree_flatten(args)
        metas = _metas(leaves)
        recent = next(reversed(cache.values()), None)  # a loop calls with the same signature: checked first
        if _valid(recent, spec, metas, leaves):
            return _run(recent, leaves)
        kind = _backend_for(leaves, backend)
        if kind == "eager":
            return fn(*args)
        if kind == "cuda" and not pool:
            pool.append(torch.cuda.graph_pool_handle())
        key = (spec, tuple(metas))
        recording = cache.pop(key, None)
        if not _valid(recording, spec, metas, leaves):
            recording = _record(fn, args, kind, warmup, pool[0] if pool else None)
            made[0] += 1
        cache[key] = recording
        while len(cache) > cache_size:
            cache.pop(next(iter(cache)))
        return _run(recording, leaves)

    call.recordings = lambda: made[0]
    call.replays = lambda: [recording.replay for recording in cache.values()]
    return call


def maybe_captured(fn: Callable, capture: bool | str) -> Callable:
    """``fn`` as the ``capture`` option of a step builder says: False: ``fn`` itself; True: ``captured(fn)``; a
    backend name (``BACKENDS``): ``captured(fn, backend=capture)``.

    Args:
      fn: the pure function to capture.
      capture: False, True or a backend name.
    Returns:
      ``fn`` or its captured form."""
    if capture is False:
        return fn
    return captured(fn, backend="auto" if capture is True else capture)
