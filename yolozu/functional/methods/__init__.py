"""The built-in TTT methods, one file each, and ``MethodEntry``: how to build a method and the settings it declares.

Nothing outside a method's own file knows what the method does: the shell builds it from its entry, its settings
become ``TTTConfig`` fields (``prefix`` + the settings' field names) and command-line flags, and the built
``Method`` says what its steps log and predict with. A built-in method is one file in this folder (a settings
class and a constructor ``(apply, optimizer, settings, *, readout, bn) -> Method``) and one line in ``BUILT_IN``
below; a third-party method is a ``MethodEntry`` that its package registers in the entry-point group
``yolozu.methods`` (``yolozu.tta.methods`` finds it; docs/ttt.md shows one).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple

from yolozu.functional.methods import align, cotta, eata, mim, sar, selftrain, tent


class MethodEntry(NamedTuple):
    """How to build one method: its constructor, its settings class, the prefix of its config fields (and of its
    ``--ttt-*`` flags, unless ``flag_prefix`` says otherwise) and the setting (if any) naming the
    in-distribution data its ``calibrate`` reads. ``shared_model``: replicas of it that average their gradients
    and batch statistics stay one model (no step decision of its own reads a replica's samples alone).
    ``signals``: what the method reads from a forward, through the readout: ``"scores"`` (class logits),
    ``"heatmap"`` (dense class maps scored by independent sigmoids: a detector's), ``"reconstruction"`` (MIM's
    decoder) or ``"features"`` (named layers' outputs and their source statistics: ``Readout.layers``,
    ``Readout.source_stats``). ``probe``: settings (its own, unprefixed) under which one step on any
    small model changes the weights (e.g. EATA without its sample floors); the conformance tests run each
    registered method with them. ``files``: settings (unprefixed) that name an input file of tensors; the shell
    reads each one given (weights-only) and passes the constructor ``files={setting: contents}``."""

    build: Callable[..., object]
    settings: type
    prefix: str
    calibration: str | None = None
    flag_prefix: str | None = None
    shared_model: bool = True
    signals: tuple[str, ...] = ("scores",)
    probe: Mapping[str, Any] = {}
    files: tuple[str, ...] = ()


BUILT_IN: dict[str, MethodEntry] = {  # yolozu.tta.methods adds the plug-ins
    "tent": MethodEntry(tent.tent_method, tent.TentSettings, ""),
    "mim": MethodEntry(  # --ttt-mask-prob, as specified
        mim.mim_method, mim.MIMSettings, "mim_", calibration="reference_data", flag_prefix="",
        signals=("reconstruction",),
        probe={"patch_size": 4, "mask_prob": 0.5},
    ),
    "cotta": MethodEntry(
        cotta.cotta_method, cotta.CoTTASettings, "cotta_", calibration="threshold_data", probe={"restore_prob": 0.5}
    ),
    # EATA keeps or skips a step by its own batch's selected samples; SAR perturbs with, and recovers by, its own
    "eata": MethodEntry(
        eata.eata_method, eata.EATASettings, "eata_", calibration="fisher_data", shared_model=False,
        probe={"conf_min": 0.0, "entropy_min": 0.0, "e_margin": 10.0},
    ),
    "sar": MethodEntry(
        sar.sar_method, sar.SARSettings, "sar_", shared_model=False, probe={"e_margin": 10.0, "adaptive": True}
    ),
    "selftrain": MethodEntry(
        selftrain.selftrain_method, selftrain.SelfTrainSettings, "selftrain_", signals=("heatmap",),
        probe={"threshold_min": 0.0, "negative_below": 0.0},
    ),
    "align": MethodEntry(
        align.align_method, align.AlignSettings, "align_", signals=("features",), files=("stats",)
    ),
}
