"""Named kill points for fault-injection tests.

The export passes ``kill_point(name)`` at the moments a crash could hurt: after each adapted and each predicted
batch, after each output file's bytes are written and synced, and just before the outputs are renamed into
place. With ``YOLOZU_KILL_AT=name:n`` in the environment the process kills itself with SIGKILL the n-th time it
reaches the point ``name``: a crash at an exact, repeatable moment, with no timing involved. Without the variable
(every real run) a kill point is one environment lookup.

``YOLOZU_KILL_AT=count`` kills nothing and counts every point reached (``reached()``), which is how a test
enumerates the kill points of a run.

Fault points (``fault_point(name)``) are the same idea for failures a process survives: with
``YOLOZU_FAULT_AT=name:n`` the n-th pass raises ``OSError(EXDEV)`` there (a rename across file systems, which
fails after the renames before it succeeded), and with ``YOLOZU_FAULT_AT=name:n:sigint`` the process sends itself
SIGINT (Ctrl-C at that exact moment). ``reset_faults()`` starts the count again (a test running several faulty
runs in one process).
"""

from __future__ import annotations

import collections
import errno
import os
import signal

ENV = "YOLOZU_KILL_AT"
FAULT_ENV = "YOLOZU_FAULT_AT"

_reached: collections.Counter[str] = collections.Counter()
_faults: collections.Counter[str] = collections.Counter()


def kill_point(name: str) -> None:
    """Kill this process with SIGKILL if ``YOLOZU_KILL_AT`` names this point and occurrence (``name:n``)."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    _reached[name] += 1
    if spec == f"{name}:{_reached[name]}":
        os.kill(os.getpid(), signal.SIGKILL)


def reached() -> dict[str, int]:
    """How many times each kill point was passed while ``YOLOZU_KILL_AT`` was set."""
    return dict(_reached)


def fault_point(name: str) -> None:
    """Fail here if ``YOLOZU_FAULT_AT`` names this point and occurrence: ``name:n`` raises ``OSError(EXDEV)``,
    ``name:n:sigint`` sends this process SIGINT."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    _faults[name] += 1
    point, _, rest = spec.partition(":")
    count, _, kind = rest.partition(":")
    if point != name or count != str(_faults[name]):
        return
    if kind == "sigint":
        os.kill(os.getpid(), signal.SIGINT)
        return
    raise OSError(errno.EXDEV, os.strerror(errno.EXDEV) + f" (injected at {name}:{count})")


def reset_faults() -> None:
    """Count fault points from zero again."""
    _faults.clear()
