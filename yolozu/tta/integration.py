"""``run_ttt(adapter, records, config)``: adapt the adapter's model before prediction (the spec's flow).

The public entry above the export's schedules: it checks its arguments and runs the ``pre`` schedule in place
(``schedules.adapt_in_place``): the model is adapted for ``steps`` steps in all, cycling over the first
``max_batches`` batches of ``adapter.build_loader(records, ...)``, and the adapted tensors are written into it
once, at the end. If anything fails on the way the module is left exactly as it was.

The helpers this module held are importable from it still; each lives where the flow uses it:
``adapt_stream`` (the ``pre`` schedule's adaptation, ``tta.schedules``), ``adaptation_for`` (``tta.engine``),
``require_ttt_hooks`` and ``loader_of`` (the hook checks, ``yolozu.adapter``), ``disabled_report``
(``tta.report``), and YOLOZU's memory helpers ``_process_peak_rss_bytes``, ``_memory_start``, ``resource``
(``tta.memory``).
"""

from __future__ import annotations

from typing import Sequence

import attrs

from yolozu.adapter import Record, loader_of, require_ttt_hooks  # noqa: F401 (importable from here)
from yolozu.tta.config import TTTConfig
from yolozu.tta.engine import adaptation_for  # noqa: F401 (importable from here)
from yolozu.tta.memory import _memory_finish, _memory_start, _process_peak_rss_bytes, resource  # noqa: F401
from yolozu.tta.report import TTTReport, disabled_report  # noqa: F401 (importable from here)
from yolozu.tta.schedules import adapt_in_place, adapt_stream  # noqa: F401 (importable from here)


def run_ttt(
    adapter: object,
    records: Sequence[Record],
    config: TTTConfig = TTTConfig(),
    *,
    progress=None,
    calibration: Sequence[Record] | None = None,
) -> TTTReport:
    """Adapt ``adapter.get_model()`` on ``records`` with ``config`` (the ``pre`` schedule,
    ``schedules.adapt_stream``) and write the adapted tensors into it. ``reset="sample"`` is accepted as YOLOZU
    does: the records adapt as given (YOLOZU's callers pass one image and restore the weights between images;
    ``yolozu export --ttt-reset sample`` adapts every image from the source weights itself).

    Args:
      adapter: a YOLOZU adapter with ``get_model`` and ``build_loader``.
      records: the records adapted on.
      config: the settings (TTT off: nothing happens).
      progress: a progress bar with ``update(n)``, or None.
      calibration: in-distribution records (``engine.adaptation_for``), or None.
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
    return adapt_in_place(adapter, records, config, progress=progress, calibration=calibration)
