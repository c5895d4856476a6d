"""Adapters from outside the package: ``package.module:factory``, or a name an installed package registers in
the entry-point group ``yolozu.adapters`` (``importlib.metadata``).

A factory is any callable that takes keyword options and returns a ``ModelAdapter`` (an object with
``predict(records)``): a class, a function. The export calls it with ``checkpoint``, ``device`` and
``batch_size``, and with ``model``, ``num_classes`` and ``image_size`` when those flags are given.

A plug-in is untrusted code: whatever it does wrong (a spec that is no module path, a syntax error or an
exception at import, ``sys.exit`` anywhere, a factory that raises or refuses the options, a ``predict`` that
raises) is a ``PluginError`` naming it, never a traceback. Its predictions are checked by the command against
the records before anything is written.
"""

from __future__ import annotations

import importlib
import os
from importlib.metadata import EntryPoint, entry_points
from typing import Any, Callable

ENTRY_POINT_GROUP = "yolozu.adapters"


class PluginError(ValueError):
    """An adapter plug-in that cannot be found, imported or built."""


def installed() -> dict[str, EntryPoint]:
    """The adapters installed packages register in the ``yolozu.adapters`` entry-point group, by name."""
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def is_spec(name: str) -> bool:
    """True for a ``package.module:factory`` reference."""
    return ":" in name


def _failure(error: BaseException) -> str:
    """What a plug-in's exception or ``sys.exit`` was, in a few words (its first line)."""
    if isinstance(error, SystemExit):
        return f"called sys.exit({error.code!r})"
    if isinstance(error, SyntaxError):
        return f"has a syntax error ({os.path.basename(error.filename or '?')}, line {error.lineno})"
    text = str(error).strip().splitlines()
    return f"raised {type(error).__name__}" + (f": {text[0]}" if text else "")


def _check_module_name(spec: str, module_name: str) -> None:
    if not all(part.isidentifier() for part in module_name.split(".")):
        raise PluginError(
            f"adapter {spec!r}: {module_name!r} is not a module name (dotted identifiers, as in package.module)"
        )


def load_spec(spec: str) -> Callable[..., Any]:
    """The factory ``package.module:factory`` names (a dotted attribute path after the colon is followed)."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise PluginError(f"adapter {spec!r}: write it as package.module:factory")
    _check_module_name(spec, module_name)
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise PluginError(
            f"adapter {spec!r}: cannot import {module_name} ({e}); is it installed or on PYTHONPATH?"
        ) from None
    except (Exception, SystemExit) as e:  # untrusted code ran at import
        raise PluginError(f"adapter {spec!r}: importing {module_name} {_failure(e)}") from None
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise PluginError(f"adapter {spec!r}: {module_name} has no {attribute}") from None
    return _callable(target, spec)


def call_factory(factory: Callable[..., Any], name: str, options: dict[str, Any]) -> Any:
    """``factory(**options)``; anything it raises (``sys.exit`` included) is a PluginError naming the plug-in."""
    try:
        return factory(**options)
    except (Exception, SystemExit) as e:
        given = ", ".join(sorted(options)) or "none"
        raise PluginError(f"adapter {name!r}: the factory {_failure(e)} (options given: {given})") from None


def call_plugin(name: str, method: str, function: Callable[..., Any], *args: Any) -> Any:
    """``function(*args)``, the plug-in's ``method``; anything it raises (``sys.exit`` included) is a PluginError
    naming the plug-in."""
    try:
        return function(*args)
    except (Exception, SystemExit) as e:
        raise PluginError(f"adapter {name!r}: {method} {_failure(e)}") from None


def load_entry_point(entry: EntryPoint) -> Callable[..., Any]:
    """The factory an entry point names; an import failure is a PluginError naming the package's entry."""
    try:
        target = entry.load()
    except (ImportError, AttributeError) as e:
        raise PluginError(f"adapter {entry.name!r} (entry point {entry.value}): cannot be loaded ({e})") from None
    except (Exception, SystemExit) as e:  # untrusted code ran at import
        raise PluginError(f"adapter {entry.name!r} (entry point {entry.value}): loading it {_failure(e)}") from None
    return _callable(target, entry.name)


def _callable(target: Any, name: str) -> Callable[..., Any]:
    if not callable(target):
        raise PluginError(f"adapter {name!r} is a {type(target).__name__}, not a factory (a class or function)")
    return target


def check_adapter(adapter: Any, name: str) -> Any:
    """``adapter`` if it predicts (has a callable ``predict``), else a PluginError naming the factory."""
    if not callable(getattr(adapter, "predict", None)):
        raise PluginError(
            f"adapter {name!r} returned a {type(adapter).__name__}, not a ModelAdapter: it needs predict(records) "
            "(see docs/adapters.md)"
        )
    return adapter
