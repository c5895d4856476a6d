"""The export's LoRA flags (YOLOZU 4.12's ``--lora-r``, ``--lora-alpha``, ``--lora-dropout``, ``--lora-target``,
``--lora-freeze-base``, ``--lora-train-bias``) and their one hook: injection into the adapter's model after the
adapter is built and before test-time training (``yolozu.adapters.lora``).

The defaults and ranges are ``LoRASettings``'s: a value out of range is argparse's usage error. A companion flag away
from its default without ``--lora-r`` > 0, an adapter without a model, a target that finds no layer, or (with
``--lora-freeze-base``) a ``--ttt`` update filter that selects a frozen tensor is a usage error once the adapter is
built, before any prediction, test-time training or output.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Callable

from yolozu.adapters.lora import TARGETS, TRAIN_BIAS, LoRASettings, LoRASettingsError, inject_lora, lora_report
from yolozu.cli.adapter_flags import AdapterUsageError
from yolozu.functional.filters import EmptySelectionError, select

DEFAULTS = LoRASettings()
FIELDS = tuple(field.name for field in dataclasses.fields(LoRASettings))


class LoRAUsageError(AdapterUsageError):
    """A LoRA flag that does not fit the rest of the command line (a model flag's usage error)."""


def flag(field: str) -> str:
    """The flag of a ``LoRASettings`` field: ``train_bias`` -> ``--lora-train-bias``."""
    return "--lora-" + field.replace("_", "-")


def _checked(field: str, cast: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse type: the flag's value, in the range ``LoRASettings`` allows the field (argparse's usage error
    otherwise, before any work)."""

    def parse(text: str) -> Any:
        value = cast(text)
        try:
            LoRASettings(**{field: value})
        except LoRASettingsError as e:
            raise argparse.ArgumentTypeError(e.detail) from None
        return value

    parse.__name__ = cast.__name__  # argparse names the type in its message for a value that does not convert
    return parse


def add_lora_flags(group: Any) -> None:
    """Add the LoRA flags to an argparse group (dests ``lora_<field>``, defaults ``LoRASettings``'s)."""
    group.add_argument(
        flag("r"), type=_checked("r", int), default=DEFAULTS.r,
        help="wrap layers in low-rank adapters of rank r before --ttt, so --ttt-update-filter lora_only, "
        f"lora_norm_only and adapter_only train them (default {DEFAULTS.r}: none; docs/ttt.md)",
    )
    group.add_argument(
        flag("alpha"), type=_checked("alpha", float), default=DEFAULTS.alpha, help="scale = alpha / r (default: r)"
    )
    group.add_argument(
        flag("dropout"), type=_checked("dropout", float), default=DEFAULTS.dropout,
        help=f"dropout on the adapters' input while adapting, in [0, 1) (default {DEFAULTS.dropout:g})",
    )
    group.add_argument(
        flag("target"), choices=TARGETS, default=DEFAULTS.target,
        help=f"where adapters go (default {DEFAULTS.target}): head, the linear and conv layers of the prediction "
        "heads; all_linear; all_conv1x1; all_linear_conv1x1",
    )
    group.add_argument(
        flag("freeze_base"), action=argparse.BooleanOptionalAction, default=DEFAULTS.freeze_base,
        help="every parameter but the adapters' stops requiring grad; the --ttt update filter must then select "
        "adapters only (e.g. lora_only) (default off)",
    )
    group.add_argument(
        flag("train_bias"), choices=TRAIN_BIAS, default=DEFAULTS.train_bias,
        help=f"with --lora-freeze-base: all keeps the wrapped layers' biases trainable (default {DEFAULTS.train_bias})",
    )


def lora_settings_of(args: argparse.Namespace) -> LoRASettings:
    """The settings the flags give; a ``LoRAUsageError`` for a value out of range or a companion flag changed
    without ``--lora-r`` > 0 (or ``--lora-train-bias all`` without ``--lora-freeze-base``)."""
    values = {field: getattr(args, f"lora_{field}", getattr(DEFAULTS, field)) for field in FIELDS}
    try:
        settings = LoRASettings(**values)
    except LoRASettingsError as e:
        raise LoRAUsageError(f"{flag(e.field)} {e.detail}") from None
    changed = [flag(f) for f in FIELDS if f != "r" and values[f] != getattr(DEFAULTS, f)]
    if changed and not settings.enabled:
        raise LoRAUsageError(f"{changed[0]} applies with --lora-r > 0 (the adapters' rank); add --lora-r 4 or drop it")
    if settings.train_bias != DEFAULTS.train_bias and not settings.freeze_base:
        raise LoRAUsageError(
            f"{flag('train_bias')} {settings.train_bias} applies with --lora-freeze-base (without it every bias "
            "the update filter selects trains); add --lora-freeze-base or drop it"
        )
    return settings


def _check_frozen(model: Any, config: Any) -> None:
    """With ``--lora-freeze-base``, the ``--ttt`` update filter may select only tensors that still require grad."""
    try:
        names = select(model, config.update_filter, include=config.include, exclude=config.exclude)
    except EmptySelectionError:
        return  # test-time training reports an empty selection itself
    params = dict(model.named_parameters())
    frozen = [name for name in names if not params[name].requires_grad]
    if frozen:
        raise LoRAUsageError(
            f"--lora-freeze-base froze {len(frozen)} of the {len(names)} tensors --ttt-update-filter "
            f"{config.update_filter} selects (e.g. {frozen[0]}); use --ttt-update-filter lora_only (or narrow it "
            "with --ttt-include/--ttt-exclude), or drop --lora-freeze-base"
        )


def apply_lora_flags(args: argparse.Namespace, adapter: Any, config: Any, *, seed: int) -> Any:
    """Inject the adapters the flags ask for into ``adapter.get_model()``, in place, before any prediction or
    test-time training; ``config`` (``TTTConfig``) is checked against ``--lora-freeze-base`` when enabled.
    Returns ``adapter``."""
    settings = lora_settings_of(args)
    if not settings.enabled:
        return adapter
    get_model = getattr(adapter, "get_model", None)
    model = get_model() if callable(get_model) else None
    if model is None:
        raise LoRAUsageError(
            f"--lora-r needs an adapter with a model (get_model()); --adapter {args.adapter} has none: use "
            "--adapter detector, torchvision or a plug-in that implements get_model()"
        )
    try:
        inject_lora(model, settings, seed=seed)
    except ValueError as e:
        raise LoRAUsageError(f"{flag('target')}: {e}") from None
    if settings.freeze_base and config.enabled:
        _check_frozen(model, config)
    return adapter


def lora_meta(args: argparse.Namespace, adapter: Any) -> dict[str, Any]:
    """``meta.lora`` in YOLOZU's shape: the settings and, when enabled, the report of the injection."""
    settings = lora_settings_of(args)
    get_model = getattr(adapter, "get_model", None)
    model = get_model() if settings.enabled and callable(get_model) else None
    report = lora_report(model, settings) if model is not None else None
    return {**settings.to_dict(), "report": report}
