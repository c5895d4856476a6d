"""The benchmark's model: the adapter ``--adapter`` names (built in, installed or ``package.module:factory``),
built as the export builds it (``yolozu.cli.adapter_flags``), and which recipes it can run.

A recipe's ``adapter`` options are meant for the built-in detector: another adapter gets them only if its
factory takes them, else the recipe is skipped with the reason. So is a recipe the adapter cannot run (MIM on a
model without a reconstruction head), found by running it once on two images before the benchmark.
"""

from __future__ import annotations

import argparse
import inspect
import re
from typing import Any, Sequence

from yolozu.adapters import UnknownAdapterError, adapter_factory, build_adapter
from yolozu.adapters.plugins import PluginError
from yolozu.cli.adapter_flags import MODEL_FLAGS, AdapterUsageError, adapter_options, add_adapter_flags
from yolozu.data import build_manifest
from yolozu.demo.bench.recipes import RECIPES, Recipe
from yolozu.inference.predictor import Predictor
from yolozu.tta.config import TTTConfig
from yolozu.tta.schedules import adapt_and_predict

PREDICT_BATCH = 32
CALIBRATION_IMAGES = 512
"""Images of a method's in-distribution split (EATA's Fisher) the benchmark reads: the first 512 of it."""
BUILT_IN = "detector"
PROBE_IMAGES = 2
UNSUPPORTED = "not supported on this adapter: "


def family_tag(spec: str) -> str:
    """A file-name tag for an adapter spec: ``detector``, ``yolozu.demo.tv_detector:adapter`` -> ``tv_detector``."""
    module = spec.partition(":")[0].rsplit(".", 1)[-1]
    return re.sub(r"[^A-Za-z0-9_]+", "-", module).strip("-") or "adapter"


def _takes(factory: Any, names: Sequence[str]) -> list[str]:
    """The names among ``names`` the factory's signature refuses (none when it takes ``**kwargs``)."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return []
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return []
    return [n for n in names if n not in params]


class Runner:
    """Runs recipes on records, one adapter per set of recipe adapter options. Every run starts from the source
    weights: the export's schedules adapt copies of the tensors and leave the module as it was.

    ``adapter``: a built-in name, an installed one or ``package.module:factory``; ``model_flags``: the export's
    model flags (``checkpoint``, ``model``, ``num_classes``, ``frozen_bn_eps``, ``image_size``)."""

    def __init__(self, device: str = "cpu", dataset: str = "data/demo", adapter: str = BUILT_IN,
                 **model_flags: Any) -> None:
        unknown = set(model_flags) - {"checkpoint", *MODEL_FLAGS}
        if unknown:
            raise TypeError(f"unknown model flags: {', '.join(sorted(unknown))}")
        self.device = device
        self.dataset = dataset
        self.spec = adapter
        self.flags = {k: v for k, v in model_flags.items() if v is not None}
        self._adapters: dict[tuple, Any] = {}
        self._calibration: dict[str, list[dict]] = {}

    def describe(self) -> dict[str, Any]:
        """What a results file records of the model: the adapter spec and its flags."""
        return {"adapter": self.spec, **self.flags}

    def options(self) -> dict[str, Any]:
        """The adapter's keyword options, as the export derives them from its flags (one image loader process)."""
        args = argparse.Namespace(adapter=self.spec, device=self.device, batch_size=PREDICT_BATCH, workers=0,
                                  checkpoint=self.flags.get("checkpoint"),
                                  **{name: self.flags.get(name) for name in MODEL_FLAGS})
        options = adapter_options(args)
        if self.spec == BUILT_IN:
            options["device"] = self.device
        return options

    def factory(self) -> Any:
        """The adapter's factory; an adapter that cannot be found or loaded is an ``AdapterUsageError``."""
        try:
            return adapter_factory(self.spec)
        except (UnknownAdapterError, PluginError) as e:
            raise AdapterUsageError(str(e)) from None

    def adapter(self, recipe: Recipe) -> Any:
        """The adapter with the recipe's adapter options (built once per set of options)."""
        key = tuple(sorted(recipe.adapter.items()))
        if key not in self._adapters:
            try:
                self._adapters[key] = build_adapter(self.spec, **self.options(), **recipe.adapter)
            except (UnknownAdapterError, PluginError) as e:
                raise AdapterUsageError(str(e)) from None
        return self._adapters[key]

    def unsupported(self, recipe: Recipe, records: Sequence[dict]) -> str | None:
        """Why this adapter cannot run ``recipe`` (``not supported on this adapter: ...``), or None. The built-in
        detector runs every recipe; another adapter must take the recipe's adapter options and run the recipe on
        the first two of ``records``."""
        if self.spec == BUILT_IN:
            return None
        refused = _takes(self.factory(), list(recipe.adapter))
        if refused:
            return f"{UNSUPPORTED}its factory does not take {', '.join(refused)} (options for the built-in detector)"
        if recipe.ttt is None and not recipe.bn_stats:
            return None
        try:
            self.predict(recipe, records[:PROBE_IMAGES])
        except AdapterUsageError:
            raise
        except (RuntimeError, ValueError, NotImplementedError, TypeError) as e:
            return f"{UNSUPPORTED}{type(e).__name__}: {e}"
        return None

    def calibration(self, config: TTTConfig) -> list[dict] | None:
        """The in-distribution records a method asks for (EATA's Fisher split), read once per split."""
        split = config.calibration_split()
        if split and split not in self._calibration:
            self._calibration[split] = build_manifest(self.dataset, split)[:CALIBRATION_IMAGES]
        return self._calibration.get(split) if split else None

    def predict(self, recipe: Recipe, records: Sequence[dict]) -> tuple[list[dict], dict | None]:
        """The recipe's predictions and, for TTT recipes, its report."""
        adapter = self.adapter(recipe)
        if recipe.ttt is not None:
            config = recipe.config(len(records))
            predictions, report = adapt_and_predict(  # an adapt-first recipe predicts in the batches it adapted on
                adapter, records, config, batch_size=recipe.batch, calibration=self.calibration(config)
            )
            return predictions, report.to_dict()
        if recipe.bn_stats:
            predictor = Predictor(adapter, **recipe.norm_options())
            return predictor.predict(records, bn=recipe.bn, batch_size=recipe.bn_batch), None
        return adapter.predict(records), None


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """The export's model flags (``--adapter`` default ``detector``, ``--checkpoint``, ``--model``, ...)."""

    add_adapter_flags(parser.add_argument_group("model (as yolozu export takes it)"))
    parser.set_defaults(adapter=BUILT_IN)


def runner_from_args(args: argparse.Namespace, dataset: str) -> Runner:
    """The Runner of parsed ``add_model_flags`` arguments."""
    flags = {name: getattr(args, name) for name in ("checkpoint", *MODEL_FLAGS)}
    return Runner(args.device, dataset, args.adapter, **flags)


def skipped_recipes(runner: Runner, recipes: Sequence[str], records: Sequence[dict]) -> dict[str, str]:
    """The recipes the runner's adapter cannot run, with the reason (``Runner.unsupported``), probed on
    ``records``."""
    reasons = {name: runner.unsupported(RECIPES[name], records) for name in recipes}
    return {name: reason for name, reason in reasons.items() if reason}
