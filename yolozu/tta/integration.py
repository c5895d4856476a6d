"""``run_ttt(adapter, records, config)``: adapt the adapter's model before prediction (the spec's flow).

The model is adapted for ``steps`` steps in all, cycling over the first ``max_batches`` batches of
``adapter.build_loader(records, ...)``, and the adapted tensors are written into it once, at the end. If anything fails
on the way the module is left exactly as it was. ``adapt_stream`` is the same adaptation without the write
(the export's ``pre`` schedule predicts from the adapted tensors directly).
"""

from __future__ import annotations

import itertools
import sys
import time
from typing import Any, Iterable, Sequence

import attrs
import torch

try:
    import resource
except ImportError:  # not on Windows: the process backend reports itself unavailable
    resource = None

from yolozu.adapter import Record, missing_ttt_hooks
from yolozu.functional.readout import readout_of
from yolozu.tta.config import TTTConfig
from yolozu.tta.engine import Adaptation
from yolozu.tta.report import TTTReport


def require_ttt_hooks(adapter: object) -> None:
    """Raise ``RuntimeError`` naming the first TTT hook (``get_model``, ``build_loader``) the adapter lacks.

    Args:
      adapter: a YOLOZU adapter.
    Raises:
      RuntimeError: naming the missing hook and what to do."""
    missing = missing_ttt_hooks(adapter)
    if missing:
        raise RuntimeError(
            f"adapter {type(adapter).__name__} has no {missing[0]}(), so it does not support test-time "
            f"training (it needs get_model() and build_loader(records, *, batch_size)); use an adapter that "
            f"implements them, e.g. --adapter detector, or run without --ttt"
        )


def loader_of(adapter: object, records: Sequence[Record], batch_size: int) -> Iterable[Any]:
    """``adapter.build_loader(records, batch_size=batch_size)``, checked: anything that is not an iterable of
    batches (e.g. None, from a hook that forgot to return) is a RuntimeError naming the adapter.

    Args:
      adapter: a YOLOZU adapter.
      records: the records to batch.
      batch_size: images per batch.
    Returns:
      The adapter's loader.
    Raises:
      RuntimeError: the hook returned something else than an iterable."""
    loader = adapter.build_loader(records, batch_size=batch_size)
    if not isinstance(loader, Iterable):
        raise RuntimeError(
            f"adapter {type(adapter).__name__}'s build_loader(records, batch_size={batch_size}) returned "
            f"{type(loader).__name__}, not an iterable of input batches; it must return (or yield) the batches"
        )
    return loader


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


def disabled_report(config: TTTConfig) -> TTTReport:
    """The report of a run with TTT off.

    Args:
      config: the run's settings (its method and reset are reported).
    Returns:
      A ``TTTReport`` with ``enabled`` False."""
    return TTTReport(enabled=False, method=config.method, reset=config.reset)


def adaptation_for(
    adapter: object,
    config: TTTConfig,
    *,
    calibration: Sequence[Record] | None = None,
    keep_output: bool = False,
    shared: Any = None,
) -> Adaptation:
    """The adaptation of ``adapter``'s model under ``config``. ``calibration``: in-distribution records the method
    looks at once before adapting when it asks for them (EATA's Fisher information), read through
    ``build_loader`` in batches of ``config.batch_size``. ``shared``: see ``engine.build_method``.

    Args:
      adapter: a YOLOZU adapter with ``get_model`` and ``build_loader``.
      config: the settings.
      calibration: in-distribution records, or None.
      keep_output: whether each step keeps its forward output (``online_predict="adapt_forward"``).
      shared: the hooks of a model shared by the ranks, or None.
    Returns:
      The ``Adaptation``."""
    batches = None if calibration is None else adapter.build_loader(list(calibration), batch_size=config.batch_size)
    model, readout = adapter.get_model(), readout_of(adapter)
    return Adaptation(model, config, readout, keep_output=keep_output, calibration=batches, shared=shared)


def adapt_stream(
    adapter: object,
    records: Sequence[Record],
    config: TTTConfig,
    *,
    progress=None,
    calibration: Sequence[Record] | None = None,
    offset: int = 0,
) -> tuple[Adaptation, int]:
    """Adapt one stream for ``steps`` steps in all, cycling over the first ``max_batches`` batches of
    ``adapter.build_loader(records, ...)`` (YOLOZU's flow: step i adapts on batch i mod n), until a guard stops
    it; the module is not written. Returns the adaptation and the number of batches used. ``progress`` (e.g. a
    tqdm bar) is advanced by each step's images. Batch i's random keys and log rows use index ``offset + i``
    (a stream that starts at batch ``offset`` of a longer run).

    Args:
      adapter: a YOLOZU adapter.
      records: the records adapted on.
      config: the settings.
      progress: a progress bar with ``update(n)``, or None.
      calibration: in-distribution records, or None.
      offset: the stream's first batch index in the whole run.
    Returns:
      ``(adaptation, batches_used)``."""
    adaptation = adaptation_for(adapter, config, calibration=calibration)
    loader = itertools.islice(loader_of(adapter, list(records), config.batch_size), config.max_batches)
    seen: list = []  # the batches read so far, kept for the next pass over them
    for step in range(config.steps):
        if step == len(seen):
            batch = next(loader, None)
            if batch is None and not seen:
                break
            if batch is not None:
                seen.append(batch)
        index = step % len(seen)
        adaptation.adapt(seen[index], offset + index, 1, first_step=step // len(seen))
        if progress is not None:
            progress.update(len(seen[index]))
        if adaptation.stopped:
            break
    return adaptation, len(seen)


def run_ttt(
    adapter: object,
    records: Sequence[Record],
    config: TTTConfig = TTTConfig(),
    *,
    progress=None,
    calibration: Sequence[Record] | None = None,
) -> TTTReport:
    """Adapt ``adapter.get_model()`` on ``records`` with ``config`` (``adapt_stream``) and write the adapted
    tensors into it. ``reset="sample"`` is accepted as YOLOZU does: the records adapt as given (YOLOZU's callers
    pass one image and restore the weights between images; ``yolozu export --ttt-reset sample`` adapts every image
    from the source weights itself).

    Args:
      adapter: a YOLOZU adapter with ``get_model`` and ``build_loader``.
      records: the records adapted on.
      config: the settings (TTT off: nothing happens).
      progress: a progress bar with ``update(n)``, or None.
      calibration: in-distribution records (``adaptation_for``), or None.
    Returns:
      The run's ``TTTReport``, with the run's peak ``memory``.
    Raises:
      TypeError: ``config`` is not a ``TTTConfig`` or ``records`` not a sequence (before any weight is touched).
      RuntimeError: the adapter lacks a TTT hook.
      EmptySelectionError: the update filter selects no parameter."""
    if not (attrs.has(type(config)) and callable(getattr(config, "calibration_split", None))):  # a TTTConfig
        raise TypeError(f"run_ttt's config must be a TTTConfig, got {type(config).__name__}")
    if isinstance(records, (str, bytes)) or not isinstance(records, Sequence):
        raise TypeError(f"run_ttt's records must be a sequence of records, got {type(records).__name__}")
    if not config.enabled:
        return disabled_report(config)
    require_ttt_hooks(adapter)
    start, memory = time.perf_counter(), _memory_start(adapter.get_model())
    adaptation, batches_used = adapt_stream(adapter, records, config, progress=progress, calibration=calibration)
    adaptation.write_back()
    report = adaptation.report(
        seconds=time.perf_counter() - start,
        steps_requested=config.steps,
        batches_used=batches_used,
        warnings=[] if batches_used else ["the loader yielded no batch; nothing was adapted"],
    )
    report.memory = _memory_finish(memory)
    return report
