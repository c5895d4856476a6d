"""Peak memory of a piece of work, the same way on CPU and GPU, for the benchmarks."""

from __future__ import annotations

from typing import Callable

import torch


def sync(device: str) -> None:
    """Wait for queued GPU work (a no-op on CPU), so timings and peaks cover it."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def peak_bytes(fn: Callable[[], object], device: str = "cpu") -> int:
    """Peak bytes allocated while ``fn`` runs, above what was allocated before it.

    CUDA: the caching allocator's peak statistics. CPU: the allocation and free events of torch's profiler,
    accumulated in time order (tensors alive before ``fn`` do not count; frees of them do).
    """
    if str(device).startswith("cuda"):
        sync(device)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated() - base
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
    )
    current = peak = 0
    for event in events:
        current += event.nbytes()
        peak = max(peak, current)
    return peak
