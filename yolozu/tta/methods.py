"""The method registry the shell uses: the built-in methods and those installed packages register.

A package adds a method by naming a ``MethodEntry`` (``yolozu.functional.methods``) in the entry-point group
``yolozu.methods``, as adapters are added through ``yolozu.adapters``::

    [project.entry-points."yolozu.methods"]
    sharp = "my_package.sharp:ENTRY"

Its settings become ``TTTConfig`` fields and ``--ttt-*`` flags, and it runs in every schedule, with no file of this
package changed. The registry is read once, when this module is imported (``TTTConfig`` is generated from it).
A plug-in that fails to load, or is not a ``MethodEntry``, or takes a built-in name, is left out; asking for it
by name is then an error that says why.
"""

from __future__ import annotations

from importlib import metadata
from typing import Mapping

from yolozu.functional.methods import BUILT_IN, MethodEntry

ENTRY_POINT_GROUP = "yolozu.methods"


def discover(
    entry_points: Mapping[str, metadata.EntryPoint] | None = None,
) -> tuple[dict[str, MethodEntry], dict[str, str]]:
    """The methods registered in the entry-point group and, for each one left out, why.

    Args:
      entry_points: name -> entry point; None reads the group ``yolozu.methods`` of the installed packages.

    Returns:
      ``(methods, refused)``: name -> ``MethodEntry`` for each plug-in that loaded; name -> the reason for each
      that did not.
    """
    if entry_points is None:
        entry_points = {ep.name: ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}
    found: dict[str, MethodEntry] = {}
    refused: dict[str, str] = {}
    for name, point in entry_points.items():
        where = f"the method plug-in {name!r} ({point.value}, entry-point group {ENTRY_POINT_GROUP})"
        if name in BUILT_IN:
            refused[name] = f"{where} takes the name of a built-in method"
            continue
        try:
            value = point.load()
        except Exception as e:  # a plug-in is someone else's code: any failure leaves it out, with the reason
            refused[name] = f"{where} failed to load: {type(e).__name__}: {e}"
            continue
        if not isinstance(value, MethodEntry):
            refused[name] = f"{where} is a {type(value).__name__}, not a yolozu.functional.methods.MethodEntry"
            continue
        found[name] = value
    return found, refused


_PLUGINS, REFUSED = discover()
METHODS: dict[str, MethodEntry] = {**BUILT_IN, **_PLUGINS}
"""Every method the shell can run, by name: the built-in ones first, then the plug-ins."""


def entry(name: str) -> MethodEntry:
    """The registry entry of method ``name``.

    Args:
      name: a registered method's name.
    Returns:
      Its ``MethodEntry``.
    Raises:
      ValueError: ``name`` is not registered (the message lists the methods), or is a plug-in that was left out
        (the message says why)."""
    try:
        return METHODS[name]
    except KeyError:
        if name in REFUSED:
            raise ValueError(f"TTT method {name!r} is not available: {REFUSED[name]}") from None
        raise ValueError(f"unknown TTT method {name!r}; choose one of {', '.join(METHODS)}") from None
