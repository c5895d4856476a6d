"""Bitwise-repeatable runs: deterministic kernels, cuDNN without autotuning, a fixed cuBLAS workspace.

With these set, the same seed gives the same predictions and logs on the same machine and GPU: cuBLAS needs
a fixed workspace (``CUBLAS_WORKSPACE_CONFIG``) for repeatable reductions, cuDNN must not pick kernels by timing,
and ops without a deterministic kernel raise instead of silently varying. The export turns it on by default
(``--no-deterministic`` turns it off).
"""

from __future__ import annotations

import os

import torch

CUBLAS_WORKSPACE = ":4096:8"


def _use_deterministic_kernels(on: bool) -> None:
    """``torch.use_deterministic_algorithms(on)`` for eager kernels. The public call also imports torch's
    compiler to update its settings (3.3 s per export on a 2-core machine, for a compiler we never use), so the
    flag the kernels read is set directly where torch offers it."""
    setter = getattr(torch._C, "_set_deterministic_algorithms", None)
    if setter is None:
        torch.use_deterministic_algorithms(on)
    else:
        setter(on)


def set_deterministic(on: bool = True) -> dict:
    """Switch deterministic kernels on or off for this process; returns what was set (for the run's meta).
    The cuBLAS workspace is set only where the environment has not chosen one."""
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    _use_deterministic_kernels(on)
    torch.backends.cudnn.deterministic = on
    torch.backends.cudnn.benchmark = False
    return {"deterministic": on, "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG")}
