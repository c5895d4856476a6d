"""The memory record of a test-time training run (``TTTReport.memory``), in YOLOZU's backends: CUDA's allocator
for a model on a GPU (``torch_cuda``: its peak, reset at the start), else the process's peak resident set size
(``process``), else ``unavailable`` with the reason (no ``resource`` module, as on Windows).
"""

from __future__ import annotations

import sys
from typing import Any

import torch

try:
    import resource
except ImportError:  # not on Windows: the process backend reports itself unavailable
    resource = None


def _process_peak_rss_bytes() -> int | None:
    """The process's peak resident set size in bytes (``ru_maxrss``: KiB on Linux, bytes on macOS); None
    without the ``resource`` module."""
    if resource is None:
        return None
    peak = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    return peak if sys.platform == "darwin" else peak * 1024


def _memory_start(model: Any) -> dict:
    """The memory record's start for a run on ``model``'s device: CUDA's allocator (its peak reset), else the
    process's peak RSS, else ``unavailable`` with the reason (YOLOZU's backends)."""
    first = next(iter(model.parameters()), None)
    if first is not None and first.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(first.device)
        device = first.device.index if first.device.index is not None else torch.cuda.current_device()
        allocated = torch.cuda.memory_allocated(device)
        return {"backend": "torch_cuda", "metric": "peak_allocated_bytes", "device": device,
                "start_allocated_bytes": allocated}  # fmt: skip
    peak = _process_peak_rss_bytes()
    if peak is None:
        return {"backend": "unavailable", "metric": None, "reason": "resource_module_unavailable"}
    return {"backend": "process", "metric": "peak_rss_bytes", "start_peak_rss_bytes": peak}


def _memory_finish(start: dict) -> dict:
    """The memory record at the end of a run begun with ``_memory_start``."""
    out = dict(start)
    if start["backend"] == "torch_cuda":
        out["peak_allocated_bytes"] = torch.cuda.max_memory_allocated(start["device"])
        out["end_allocated_bytes"] = torch.cuda.memory_allocated(start["device"])
    elif start["backend"] == "process":
        out["end_peak_rss_bytes"] = out["peak_rss_bytes"] = _process_peak_rss_bytes()
    return out
