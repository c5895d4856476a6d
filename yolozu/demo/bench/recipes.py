"""The benchmark's methods: each a TTT config (and adapter options) tuned on the held-out corruptions.

Tuned only on the ImageNet-C validation corruptions (speckle_noise, gaussian_blur, spatter, saturate), never on
the 15 test corruptions: the online and adapt-first steps at the benchmark's budget (severity 5, 400 images in
batches of 8, 50 updates; ``tools/tune_budget.py``), the rest at severities 3 and 5 (``tools/tune_recipes.py``);
docs/benchmark-notes.md records the searches. ``make export TTT=<method>`` uses the online recipe of the same
method.

    python -m yolozu.demo.bench.recipes tent        # the recipe as export flags
"""

from __future__ import annotations

import sys
from typing import Any

import attrs

from yolozu.cli.export import flag_of
from yolozu.demo.bench.budget import updates
from yolozu.tta.config import TTTConfig
from yolozu.tta.paper_presets import PAPERS
from yolozu.tta.preset_table import GUARDS


@attrs.frozen
class Recipe:
    """One benchmarked method: ``ttt`` (TTTConfig fields, None for no TTT), ``bn_stats`` (predict with the
    BatchNorm statistics of test batches of ``bn_batch`` images, no gradient step; with ``bn_prior``, mixed with
    the stored ones as a prior of that many images; with ``bn_shrink``, soft-thresholded towards them at that many
    standard errors) and ``adapter`` (adapter options, e.g. the Tent loss)."""

    name: str
    label: str
    ttt: dict[str, Any] | None = None
    bn_stats: bool = False
    adapter: dict[str, Any] = attrs.field(factory=dict)
    bn_batch: int = 32
    bn_prior: float | None = None
    bn_shrink: float | None = None

    @property
    def bn(self) -> str:
        """The BatchNorm normalisation of a recipe without TTT: ``shrink`` with a threshold, ``mix`` with a prior,
        else ``batch``."""
        return "shrink" if self.bn_shrink is not None else "batch" if self.bn_prior is None else "mix"

    @property
    def episodic(self) -> bool:
        """Whether it starts from the source at every image (a stream carries nothing along for it)."""
        return self.bn_batch == 1 if self.ttt is None else self.ttt.get("reset") == "sample"

    def norm_options(self) -> dict[str, float]:
        """The strength of the stored statistics in its normalisation (``Predictor``'s keyword), if it has one."""
        return {k: v for k, v in (("bn_prior", self.bn_prior), ("bn_shrink", self.bn_shrink)) if v is not None}

    def meta(self) -> dict[str, Any]:
        """What a results file records of the recipe."""
        return {"label": self.label, "ttt": self.ttt, "bn_stats": self.bn_stats, "bn_batch": self.bn_batch,
                "bn_prior": self.bn_prior, "bn_shrink": self.bn_shrink, "adapter": self.adapter}

    @property
    def adapts_first(self) -> bool:
        """Whether it adapts over the split before predicting any image (the ``pre`` schedule)."""
        return self.ttt is not None and self.ttt.get("schedule") == "pre"

    @property
    def batch(self) -> int:
        """Images per batch: of its updates (and predictions) with TTT, of its BatchNorm statistics without."""
        return self.ttt.get("batch_size", 1) if self.ttt is not None else self.bn_batch

    def config(self, images: int | None = None) -> TTTConfig:
        """The validated TTT config (disabled when the recipe has none). An adapt-first recipe without ``steps``
        takes the online protocol's budget on ``images`` images: one step per batch of them
        (``budget.updates``), so both schedules get the same number of updates."""
        if self.ttt is None:
            return TTTConfig()
        ttt = self.ttt
        if self.adapts_first and "steps" not in ttt and images is not None:
            ttt = {**ttt, "steps": max(1, updates(images, self.batch))}
        return TTTConfig(enabled=True, **ttt)


BUDGET_BATCH = 8
"""Images per batch of the reset-per-corruption protocol: of every update and every prediction of the online and
adapt-first recipes, and of the BatchNorm-statistics baseline's statistics, so the gradient methods are measured
against normalisation on the very same batches. With ``shift.SCOPES``' 400 images per corruption: 50 updates."""
STREAM_BATCH = BUDGET_BATCH
"""Images per batch of the never-reset stream protocols (continual, gradual), for the methods and BatchNorm
statistics alike: the reset-per-corruption protocol's, so a continual segment of 400 images is 50 updates too;
the stream settings (``STREAM_SETTINGS``) were tuned at it."""
ONLINE = {"schedule": "online", "batch_size": BUDGET_BATCH, "update_filter": "norm_only", "max_batches": None,
          "seed": 0}
TENT = {"method": "tent", **ONLINE, "lr": 1e-3}
"""Online Tent (the tent and tent-reuse recipes)."""
CLEAN_DATA = "train"
"""The in-distribution split the recipes calibrate on (the demo's clean training images): EATA's Fisher
information and CoTTA's source-derived confidence threshold in the papers' recipes, MIM's error ceiling."""
EATA_PAPER = {**PAPERS["eata_paper"], "batch_size": BUDGET_BATCH, "seed": 0, "eata_fisher_data": CLEAN_DATA}
"""The paper's EATA (the ``eata_paper`` preset, with its Fisher regulariser) at the benchmark's batch, its learning
rate as the paper's (not rescaled: docs/ttt.md)."""
COTTA_PAPER = {**PAPERS["cotta_paper"], "batch_size": BUDGET_BATCH, "seed": 0, "cotta_threshold_data": CLEAN_DATA}
"""The reference's CoTTA (the ``cotta_paper`` preset: 32 random views, logit mean, a batch threshold from the
source model on clean data, the pre-update teacher predicts) at the benchmark's batch."""
EPISODIC_SHRINK = 8.0
"""The threshold, in standard errors, at which each image's BatchNorm statistics are soft-thresholded towards the
source's in the episodic recipes (Gong et al. 2022's instance-aware BatchNorm), chosen on the held-out
corruptions: the most held-out mAP50 with the clean drop within 1 point, for per-image statistics alone and for
Tent episodic (docs/benchmark-notes.md)."""
EPISODIC = {
    "reset": "sample",
    "streams": 8,
    "update_filter": "norm_only",
    "max_batches": None,
    "seed": 0,
    "bn_mode": "shrink",
    "bn_shrink": EPISODIC_SHRINK,
}

RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe("source", "source (no adaptation)"),
        Recipe("bn", f"BatchNorm statistics only (batches of {BUDGET_BATCH})", bn_stats=True, bn_batch=BUDGET_BATCH),
        Recipe("tent", "Tent, online", TENT),
        Recipe("mim", "MIM, online", {"method": "mim", **ONLINE, "lr": 1e-4, "mim_mask_prob": 0.5}),
        Recipe("cotta", "CoTTA, online", {"method": "cotta", **ONLINE, "lr": 3e-3, "cotta_ema_momentum": 0.8}),
        Recipe("eata", "EATA, online", {"method": "eata", **ONLINE, "lr": 1e-2}),
        Recipe("sar", "SAR, online", {"method": "sar", **ONLINE, "lr": 1e-3, "update_filter": "norm_but_top"}),
        Recipe("align", "Feature alignment, online", {"method": "align", **ONLINE, "lr": 1e-2}),
        Recipe("tent-pre", "Tent, adapt then predict", {"method": "tent", **ONLINE, "schedule": "pre", "lr": 1e-3}),
        Recipe("eata-paper", "EATA as the paper runs it, online", EATA_PAPER),
        Recipe("cotta-paper", "CoTTA as its reference code runs it, online", COTTA_PAPER),
        Recipe(
            "bn-sample",
            "BatchNorm statistics only (per image, shrunk towards the source's)",
            bn_stats=True,
            bn_batch=1,
            bn_shrink=EPISODIC_SHRINK,
        ),
        Recipe("tent-sample", "Tent, episodic", {"method": "tent", **EPISODIC, "lr": 1e-2, "steps": 2}),
        Recipe("bn-image", "BatchNorm statistics only (per image, alone)", bn_stats=True, bn_batch=1),
        Recipe(
            "tent-image",
            "Tent, episodic, per-image statistics alone",
            {"method": "tent", **EPISODIC, "lr": 1e-2, "steps": 2, "bn_mode": "batch"},
        ),
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
            {**TENT, "online_predict": "adapt_forward"},
        ),
    )
}
BENCHMARKED = tuple(name for name in RECIPES if name != "tent-reuse")
"""The recipes ``make bench`` runs; ``tent-reuse`` (one forward per batch) is measured on its own (README)."""
QUICK = ("source", "bn", "tent", "mim", "cotta", "eata", "sar", "align", "tent-pre", "bn-sample", "tent-sample",
         "bn-image")
"""The quick scope's recipes (make bench): every online method, Tent adapting first, and, of the episodic ones,
BatchNorm statistics and Tent, and per-image statistics alone (what the episodic recipes' normalisation is
measured against); ``make bench-full`` runs every benchmarked recipe."""
GRADIENT_METHODS = ("tent", "mim", "cotta", "eata", "sar", "align")
STREAM_SETTINGS: dict[str, dict[str, Any]] = {
    "tent": {"lr": 3e-3, "source_pull": 0.3},
    "mim": {"lr": 3e-3, "source_pull": 0.5, "update_filter": "norm_but_top", "mim_norm_pix_loss": True,
            "mim_error_quantile": 0.9, "mim_reference_data": CLEAN_DATA},
    "cotta": {"source_pull": 0.1},
    "eata": {"lr": 3e-3, "eata_max_skip_streak": None},
    "sar": {"source_pull": 0.1},
    "align": {"lr": 1e-3, "source_pull": 0.3, "update_filter": "all", "align_var_weight": 0.5,
              "align_noise_floor": 0.25},
}
"""What the never-reset streams (continual, gradual) change in a method's online recipe, tuned at their budget
(50 updates per segment) on held-out streams as long as the test stream (the 4 validation corruptions at
severity 5 in sequence, 400 images each, passed 4 times, then 200 clean training images), on demo data of two
seeds (``tools/tune_continual.py --repeat 4 --dataset data/demo data/demo-seed2``; docs/benchmark-notes.md) by
the stream rule (``rule_picks`` there): of the candidates that fall below BatchNorm statistics on no segment of
either seed, neither by more than 0.3 points nor by more than the segment's paired interval, the most mAP50 over
them, averaged over the seeds. The online recipes' steps, tuned for one corruption, drift over 800
updates; a pull back towards the source weights each update (``source_pull``) bounds the drift and lets most
methods keep larger steps. EATA runs without YOLOZU's skip stop, which otherwise ends its adaptation for good
within the first corruptions; MIM leaves the top layers alone (SAR's filter), reconstructs per-cell
standardised pixels (MAE's ``norm_pix_loss``) and leaves out the images its decoder cannot reconstruct (a raw-pixel
error beyond the source's 90th percentile on clean training images); align adapts every parameter, as ActMAD
does, with its variance term at half weight and its gaps less a quarter of the source's sampling noise."""


def stream_recipe(name: str) -> Recipe:
    """Recipe ``name`` as the never-reset stream protocols run it: its online settings with ``STREAM_SETTINGS``',
    in batches of ``STREAM_BATCH`` (an episodic recipe, whose batches are single images, as it is)."""
    recipe = RECIPES[name]
    if recipe.episodic:
        return recipe
    if recipe.ttt is None:
        return attrs.evolve(recipe, bn_batch=STREAM_BATCH) if recipe.bn_stats else recipe
    return attrs.evolve(recipe, ttt={**recipe.ttt, "batch_size": STREAM_BATCH, **STREAM_SETTINGS.get(name, {})})


def export_flags(name: str) -> list[str]:
    """The ``tools/export_predictions.py`` flags of recipe ``name`` (for ``make export``)."""
    recipe = RECIPES[name]
    if recipe.ttt is None:
        if not recipe.bn_stats:
            return []
        strength = [f for k, v in recipe.norm_options().items() for f in ("--" + k.replace("_", "-"), str(v))]
        return ["--bn-stats", recipe.bn, "--batch-size", str(recipe.bn_batch), *strength]
    flags = ["--ttt"]
    fields = attrs.fields_dict(TTTConfig)
    for field, value in recipe.ttt.items():
        flags += [flag_of(fields[field]), str(value)]
    for guard in GUARDS:  # a guard the recipe leaves unset stays unset (a preset would fill it)
        if guard not in recipe.ttt:
            flags += [flag_of(fields[guard]), "none"]
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
