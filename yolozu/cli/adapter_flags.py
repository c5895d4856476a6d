"""The export's model flags (``--adapter``, ``--checkpoint``, ``--model``, ...) and the adapter they build.

A flag the chosen adapter does not take is a usage error before any work; a plug-in adapter gets the flags that
were given (``yolozu.adapters.plugins``).
"""

from __future__ import annotations

import argparse
from typing import Any

from yolozu.adapters import ADAPTERS, UnknownAdapterError, build_adapter, parse_device
from yolozu.adapters.images import default_workers

MODEL_FLAGS = ("model", "num_classes", "frozen_bn_eps", "image_size")
"""Options of the torchvision adapter (and of plug-ins, which get the ones given)."""


class AdapterUsageError(ValueError):
    """A model flag that does not fit the adapter, or an adapter that cannot be found (a bad command line)."""


def add_adapter_flags(group: Any) -> None:
    """Add the model flags to an argparse group."""
    group.add_argument(
        "--adapter",
        default="dummy",
        help=f"model adapter: {', '.join(sorted(ADAPTERS))}, one an installed package registers (entry-point group "
        "yolozu.adapters), or package.module:factory (default dummy; docs/adapters.md)",
    )
    group.add_argument(
        "--checkpoint",
        help="model checkpoint (detector: default the committed one; torchvision: a state-dict file, or a weights "
        "name already in the torch hub cache)",
    )
    group.add_argument("--model", help="torchvision: the builder, e.g. fasterrcnn_resnet50_fpn (docs/adapters.md)")
    group.add_argument("--num-classes", type=int, help="torchvision: classes with background (default: checkpoint's)")
    group.add_argument("--frozen-bn-eps", type=float, help="torchvision: eps of frozen norms (default: torchvision's)")
    group.add_argument("--image-size", type=int, help="torchvision: resize images to S x S (default: as they are)")


def _check_torchvision(args: argparse.Namespace) -> None:
    from yolozu.adapters.tv_models import SUPPORTED

    if not args.model or not args.checkpoint:
        raise AdapterUsageError(
            f"--adapter torchvision needs --model NAME and --checkpoint FILE; models: {', '.join(SUPPORTED)}"
        )
    if args.model not in SUPPORTED:
        raise AdapterUsageError(f"--model {args.model!r} is not supported; models: {', '.join(SUPPORTED)}")


def adapter_options(args: argparse.Namespace, device_name: str | None = None) -> dict[str, Any]:
    """The adapter's keyword options from parsed arguments (on ``device_name`` when given, e.g. a rank's GPU,
    else ``--device``); a flag its adapter does not take is an ``AdapterUsageError``."""
    given = {name: getattr(args, name) for name in MODEL_FLAGS if getattr(args, name) is not None}
    flags = ", ".join("--" + name.replace("_", "-") for name in given)
    if args.adapter == "dummy":
        if args.checkpoint or given:
            flag = "--checkpoint" if args.checkpoint else flags
            raise AdapterUsageError(f"{flag} does not apply to --adapter dummy")
        return {}
    if args.adapter == "detector" and given:
        raise AdapterUsageError(f"{flags}: only --adapter torchvision (or a plug-in) takes it, not --adapter detector")
    if args.adapter == "torchvision":
        _check_torchvision(args)
    try:
        device = parse_device(device_name or args.device)
    except ValueError as e:
        raise AdapterUsageError(f"--device {e}") from None
    if args.adapter == "detector":  # the built-in detector reads images in loader processes
        given["workers"] = default_workers() if getattr(args, "workers", None) is None else args.workers
    return {"checkpoint": args.checkpoint, "device": device, "batch_size": args.batch_size, **given}


def adapter_from_args(args: argparse.Namespace, device_name: str | None = None) -> Any:
    """The adapter ``--adapter`` names, built with the options of the command line (see ``adapter_options``); an
    unknown name is an ``AdapterUsageError``, a plug-in that fails a ``PluginError`` (a failed run, not a bad
    command line)."""
    options = adapter_options(args, device_name)
    try:
        return build_adapter(args.adapter, **options)
    except UnknownAdapterError as e:
        raise AdapterUsageError(str(e)) from None
