"""Ctrl-C that no library can swallow: the SIGINT handler of the ``yolozu`` command notes the interrupt before it
raises ``KeyboardInterrupt``.

Python raises ``KeyboardInterrupt`` wherever the main thread happens to be, and some code catches everything
(``except BaseException``, a bare ``except:`` inside an import); an interrupt caught there would let the run
go on and replace its outputs. The command installs ``install()`` first thing, before any heavy import, and the
run asks ``check()`` at the moments that matter (after its imports, before the outputs are committed): an
interrupt noted once ends the run there, whoever swallowed the exception.
"""

from __future__ import annotations

import signal
import threading

_noted: list[int] = []


def _note_and_raise(signum: int, frame: object) -> None:
    _noted.append(signum)
    raise KeyboardInterrupt


def install() -> object:
    """Make Ctrl-C noted as well as raised (main thread only; a no-op elsewhere), forgetting any earlier one;
    returns the handler it replaced (for ``uninstall``)."""
    _noted.clear()
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGINT, _note_and_raise)


def uninstall(previous: object) -> None:
    """Put back the SIGINT handler ``install`` replaced and forget the interrupt (a process that runs several
    commands, such as a test session, starts each one clean)."""
    _noted.clear()
    if previous is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, previous)


def interrupted() -> bool:
    """Whether Ctrl-C came since ``install()``."""
    return bool(_noted)


def check() -> None:
    """Raise ``KeyboardInterrupt`` if Ctrl-C came since ``install()``, even if the one raised then was caught."""
    if _noted:
        raise KeyboardInterrupt
