"""How the ``yolozu`` commands end on an error: one table from exception to exit code and the one line printed.

=====  ==========================================================================================================
exit   when
=====  ==========================================================================================================
0      the run succeeded
2      a bad command line (argparse's convention): an unknown or malformed flag, a value out of range, flags that
       do not go together, an unknown adapter name, an output path that cannot be written or names an input
1      the run failed: an input file (dataset, labels, images, predictions, checkpoint) that cannot be used, a
       plug-in adapter that fails, a non-finite model, test-time training that cannot run, an output that cannot
       be written
130    Ctrl-C
=====  ==========================================================================================================

Every line is printable: control characters of a file name or a message (a newline, an ANSI escape) are shown
escaped, so that no name can forge a line of its own.
"""

from __future__ import annotations

import gc
import sys

USAGE = 2
FAILED = 1
INTERRUPTED = 130


class UsageError(Exception):
    """Bad command-line input (exit code 2)."""


class TTTError(Exception):
    """Test-time training could not run (its settings, the adapter's hooks, the update filter)."""


class NonFiniteError(Exception):
    """The model's weights or outputs were non-finite (exit code 1)."""


def printable(text: str) -> str:
    """``text`` with every control character escaped (``\\n``, ``\\x1b``, ...): safe to print as one line."""
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)


def _loaded(module: str, name: str) -> tuple[type, ...]:
    """The class ``module.name`` if that module was imported (an error of a module never imported cannot occur;
    importing it here would import torch for ``yolozu eval``)."""
    cls = getattr(sys.modules.get(module), name, None)
    return (cls,) if isinstance(cls, type) else ()


def _usage_errors() -> tuple[type, ...]:
    return (
        UsageError,
        *_loaded("yolozu.io.paths", "OutputPathError"),
        *_loaded("yolozu.cli.adapter_flags", "AdapterUsageError"),
        *_loaded("yolozu.adapters", "UnknownAdapterError"),
    )


def _run_errors() -> tuple[type, ...]:
    return (NonFiniteError, OSError, ValueError, ImportError, *_loaded("yolozu.parallel.world", "DistributedError"))


def quiet_release(error: BaseException) -> None:
    """Drop ``error``'s traceback, and with it the objects its frames held (a data loader's worker processes, open
    files), without the "Exception ignored in ... __del__" noise their clean-up may print after a failure: the
    one line already said what went wrong."""
    previous = sys.unraisablehook
    sys.unraisablehook = lambda unraisable: None
    try:
        error.__traceback__ = None
        for chained in (error.__cause__, error.__context__):
            if chained is not None:
                chained.__traceback__ = None
        gc.collect()
    finally:
        sys.unraisablehook = previous


def describe(error: BaseException, plugin: str | None = None) -> tuple[int, str | None]:
    """The exit code and the line a command prints for ``error`` (None for an error no row expects: a bug, whose
    traceback is worth more than a line). ``plugin``: the name of the plug-in adapter the run uses, if any; code
    of a plug-in is untrusted, so any exception it lets out, and ``sys.exit`` inside it, is its failure."""
    if isinstance(error, KeyboardInterrupt):
        return INTERRUPTED, "interrupted"
    if isinstance(error, _usage_errors()):
        return USAGE, f"error: {printable(str(error))}"
    if isinstance(error, TTTError):
        return FAILED, f"TTT failed: {printable(str(error))}"
    if isinstance(error, SystemExit):
        who = f"adapter {plugin!r}" if plugin else "code the run called"
        return FAILED, f"error: {printable(who)} called sys.exit({error.code!r}); nothing was written"
    if isinstance(error, _run_errors()):
        return FAILED, f"error: {printable(str(error))}"
    if plugin is not None and isinstance(error, Exception):
        return FAILED, printable(f"error: adapter {plugin!r} failed: {type(error).__name__}: {error}")
    return FAILED, None
