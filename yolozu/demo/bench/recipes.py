"""The benchmark's methods: each a TTT config (and adapter options) tuned on the held-out corruptions.

Tuned only on the ImageNet-C validation corruptions (speckle_noise, gaussian_blur, spatter, saturate at
severities 3 and 5; ``tools/tune_recipes.py``), never on the 15 test corruptions; docs/benchmarks.md records the
search. ``make export TTT=<method>`` uses the online recipe of the same method.

    python -m yolozu.demo.bench.recipes tent        # the recipe as export flags
"""

from __future__ import annotations

import sys
from typing import Any

import attrs

from yolozu.export import flag_of
from yolozu.tta.config import TTTConfig


@attrs.frozen
class Recipe:
    """One benchmarked method: ``ttt`` (TTTConfig fields, None for no TTT), ``bn_stats`` (predict with the
    BatchNorm statistics of test batches of ``bn_batch`` images, no gradient step; with ``bn_prior``, mixed with
    the stored ones as a prior of that many images) and ``adapter`` (adapter options, e.g. the Tent loss)."""

    name: str
    label: str
    ttt: dict[str, Any] | None = None
    bn_stats: bool = False
    adapter: dict[str, Any] = attrs.field(factory=dict)
    bn_batch: int = 32
    bn_prior: float | None = None

    @property
    def bn(self) -> str:
        """The BatchNorm normalisation of a recipe without TTT: ``mix`` with a prior, else ``batch``."""
        return "batch" if self.bn_prior is None else "mix"

    def meta(self) -> dict[str, Any]:
        """What a results file records of the recipe."""
        return {"label": self.label, "ttt": self.ttt, "bn_stats": self.bn_stats, "bn_prior": self.bn_prior,
                "adapter": self.adapter}

    def config(self) -> TTTConfig:
        """The validated TTT config (disabled when the recipe has none)."""
        return TTTConfig(enabled=True, **self.ttt) if self.ttt is not None else TTTConfig()


ONLINE = {"schedule": "online", "batch_size": 32, "update_filter": "norm_only", "max_batches": None, "seed": 0}
EPISODIC_PRIOR = 3.0
"""The strength, in images, of the source's BatchNorm statistics mixed with each image's own in the episodic
recipes (Schneider et al. 2020), chosen on the held-out corruptions: the clean drop within 1 point with
the most held-out mAP50 (docs/benchmark-notes.md)."""
EPISODIC = {
    "reset": "sample",
    "streams": 8,
    "update_filter": "norm_only",
    "max_batches": None,
    "seed": 0,
    "bn_mode": "mix",
    "bn_prior": EPISODIC_PRIOR,
}

RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe("source", "source (no adaptation)"),
        Recipe("bn", "BatchNorm statistics only (batches of 32)", bn_stats=True),
        Recipe("tent", "Tent, online", {"method": "tent", **ONLINE, "lr": 3e-3}),
        Recipe("mim", "MIM, online", {"method": "mim", **ONLINE, "lr": 1e-4, "mim_mask_prob": 0.5}),
        Recipe("cotta", "CoTTA, online", {"method": "cotta", **ONLINE, "lr": 3e-2, "cotta_ema_momentum": 0.8}),
        Recipe("eata", "EATA, online", {"method": "eata", **ONLINE, "lr": 1e-2}),
        Recipe("sar", "SAR, online", {"method": "sar", **ONLINE, "lr": 3e-3, "update_filter": "norm_but_top"}),
        Recipe(
            "bn-sample",
            "BatchNorm statistics only (per image, mixed with the source's)",
            bn_stats=True,
            bn_batch=1,
            bn_prior=EPISODIC_PRIOR,
        ),
        Recipe("tent-sample", "Tent, episodic", {"method": "tent", **EPISODIC, "lr": 1e-2, "steps": 2}),
        Recipe("mim-sample", "MIM, episodic", {"method": "mim", **EPISODIC, "lr": 1e-3, "mim_mask_prob": 0.5}),
        Recipe(
            "cotta-sample", "CoTTA, episodic", {"method": "cotta", **EPISODIC, "lr": 3e-2, "cotta_ema_momentum": 0.8}
        ),
        Recipe("eata-sample", "EATA, episodic", {"method": "eata", **EPISODIC, "lr": 1e-2, "steps": 2}),
        Recipe(
            "sar-sample",
            "SAR, episodic",
            {"method": "sar", **EPISODIC, "lr": 1e-2, "steps": 2, "update_filter": "norm_but_top"},
        ),
        Recipe(
            "tent-reuse",
            "Tent, online, predictions from the adaptation's forward",
            {"method": "tent", **ONLINE, "lr": 3e-3, "online_predict": "adapt_forward"},
        ),
    )
}
BENCHMARKED = tuple(name for name in RECIPES if name != "tent-reuse")
"""The recipes ``make bench`` runs; ``tent-reuse`` (one forward per batch) is measured on its own (README)."""
QUICK = ("source", "bn", "tent", "mim", "cotta", "eata", "sar", "bn-sample", "tent-sample")
"""The quick scope's recipes (make bench): every online method and, of the episodic ones, BatchNorm statistics
and Tent; ``make bench-full`` runs every benchmarked recipe."""
GRADIENT_METHODS = ("tent", "mim", "cotta", "eata", "sar")


def export_flags(name: str) -> list[str]:
    """The ``tools/export_predictions.py`` flags of recipe ``name`` (for ``make export``)."""
    recipe = RECIPES[name]
    if recipe.ttt is None:
        if not recipe.bn_stats:
            return []
        prior = [] if recipe.bn_prior is None else ["--bn-prior", str(recipe.bn_prior)]
        return ["--bn-stats", recipe.bn, "--batch-size", str(recipe.bn_batch), *prior]
    flags = ["--ttt"]
    fields = attrs.fields_dict(TTTConfig)
    for field, value in recipe.ttt.items():
        flags += [flag_of(fields[field]), str(value)]
    return flags


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0] not in RECIPES:
        print(f"usage: python -m yolozu.demo.bench.recipes {{{','.join(RECIPES)}}}", file=sys.stderr)
        return 2
    print(" ".join(export_flags(args[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
