"""The registry of TTT methods: a method's name -> how to build it and the settings it declares.

Nothing outside a method's own file knows what the method does: the shell builds it from here, its settings
become ``TTTConfig`` fields (``prefix`` + the settings' field names) and command-line flags, and the built
``Method`` says what its steps log and predict with. Adding a method is one file in ``yolozu/functional/``
(a settings class and a constructor ``(apply, optimizer, settings, *, readout, bn) -> Method``) and one line
below.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

from yolozu.functional import cotta, eata, mim, sar, tent


class MethodEntry(NamedTuple):
    """How to build one method: its constructor, its settings class, the prefix of its config fields (and of its
    ``--ttt-*`` flags, unless ``flag_prefix`` says otherwise) and the setting (if any) naming the
    in-distribution data its ``calibrate`` reads. ``shared_model``: replicas of it that average their gradients
    and batch statistics stay one model (no step decision of its own reads a replica's samples alone)."""

    build: Callable[..., object]
    settings: type
    prefix: str
    calibration: str | None = None
    flag_prefix: str | None = None
    shared_model: bool = True


METHODS: dict[str, MethodEntry] = {
    "tent": MethodEntry(tent.tent_method, tent.TentSettings, ""),
    "mim": MethodEntry(mim.mim_method, mim.MIMSettings, "mim_", flag_prefix=""),  # --ttt-mask-prob, as specified
    "cotta": MethodEntry(cotta.cotta_method, cotta.CoTTASettings, "cotta_"),
    # EATA keeps or skips a step by its own batch's selected samples; SAR perturbs with, and recovers by, its own
    "eata": MethodEntry(eata.eata_method, eata.EATASettings, "eata_", calibration="fisher_data", shared_model=False),
    "sar": MethodEntry(sar.sar_method, sar.SARSettings, "sar_", shared_model=False),
}


def entry(name: str) -> MethodEntry:
    """The registry entry of method ``name``; an unknown name is a ValueError listing the methods."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown TTT method {name!r}; choose one of {', '.join(METHODS)}") from None
