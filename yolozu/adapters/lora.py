"""Low-rank adapters (LoRA, Hu et al., ICLR 2022) injected into a model's conv and linear layers for test-time
training, so the update filters ``lora_only``, ``lora_norm_only`` and ``adapter_only`` select them.

A wrapped layer computes ``y = base(x) + scale * B(A(dropout(x)))``, ``scale = alpha / r``:

- ``nn.Linear(in, out)``: ``A`` is ``(r, in)``, ``B`` is ``(out, r)``;
- ``nn.Conv2d(in, out, k)`` (one group): ``A`` is a ``(r, in, kh, kw)`` convolution with the base layer's stride,
  padding and dilation, ``B`` a ``(out, r, 1, 1)`` convolution, so ``B @ A`` has the base kernel's shape.

``B`` starts at zero, so an injected model predicts exactly as before until training moves ``B``; ``A`` starts as
``nn.Linear``/``nn.Conv2d`` initialise their own weights (Kaiming uniform, a = sqrt(5)), drawn from a generator
seeded by the caller. The base layer stays a child named ``base`` (``yolozu.functional.filters.WRAPPED``): its
tensors are the model's, never the adapter's, and ``merge_lora`` folds ``scale * B @ A`` into its weight and puts it
back in the wrapper's place, so a merged model has the original module tree and state-dict keys.

Settings and their defaults are YOLOZU 4.12's exporter flags ``--lora-r``, ``--lora-alpha``, ``--lora-dropout``,
``--lora-target``, ``--lora-freeze-base`` and ``--lora-train-bias`` (``LoRASettings``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from yolozu.functional.filters import WRAPPED, base_selection

TARGETS = ("head", "all_linear", "all_conv1x1", "all_linear_conv1x1")
"""Where adapters go: ``head``, the linear and conv layers inside a module whose name contains "head" (the
prediction heads: ``cls_head``/``box_head`` of the built-in detector, ``head``/``roi_heads``/``rpn.head`` of
torchvision's); ``all_linear``, every linear layer; ``all_conv1x1``, every 1x1 convolution; ``all_linear_conv1x1``,
both."""
TRAIN_BIAS = ("none", "all")
"""With ``freeze_base``: ``none`` trains the adapters alone, ``all`` also the biases of the wrapped layers."""
BASE = WRAPPED[0]
"""The name of the wrapped layer inside an adapter module."""


class LoRASettingsError(ValueError):
    """A LoRA setting out of its range; ``field`` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.detail = message


@dataclasses.dataclass(frozen=True)
class LoRASettings:
    """YOLOZU 4.12's LoRA settings and defaults.

    Attributes:
      r: the rank; 0 injects nothing.
      alpha: the scaling numerator, ``scale = alpha / r`` (None: ``r``, so scale 1).
      dropout: dropout probability on the adapter's input, in [0, 1) (active in training-mode forwards only).
      target: where adapters go (``TARGETS``).
      freeze_base: every parameter but the adapters' (and the biases ``train_bias`` names) stops requiring grad.
      train_bias: ``TRAIN_BIAS``.
    """

    r: int = 0
    alpha: float | None = None
    dropout: float = 0.0
    target: str = "head"
    freeze_base: bool = False
    train_bias: str = "none"

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 0:
            raise LoRASettingsError("r", f"must be an integer >= 0 (0: no LoRA), got {self.r!r}")
        if self.alpha is not None and not (math.isfinite(self.alpha) and self.alpha > 0):
            raise LoRASettingsError("alpha", f"must be > 0 (scale = alpha / r), got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise LoRASettingsError("dropout", f"must be in [0, 1) (a probability), got {self.dropout!r}")
        if self.target not in TARGETS:
            raise LoRASettingsError("target", f"must be one of {', '.join(TARGETS)}, got {self.target!r}")
        if self.train_bias not in TRAIN_BIAS:
            raise LoRASettingsError("train_bias", f"must be one of {', '.join(TRAIN_BIAS)}, got {self.train_bias!r}")

    @property
    def enabled(self) -> bool:
        return self.r > 0

    @property
    def scale(self) -> float:
        """``alpha / r`` (1 with the default alpha); 0 when LoRA is off."""
        if not self.enabled:
            return 0.0
        return (float(self.r) if self.alpha is None else float(self.alpha)) / self.r

    def to_dict(self) -> dict[str, Any]:
        return {"enabled": self.enabled, **dataclasses.asdict(self)}


def _kaiming(shape: tuple[int, ...], generator: torch.Generator, like: Tensor) -> nn.Parameter:
    """A parameter of ``shape`` drawn as PyTorch initialises linear/conv weights (Kaiming uniform, a = sqrt(5):
    U(-1/sqrt(fan_in), 1/sqrt(fan_in))), on ``like``'s device and dtype."""
    fan_in = math.prod(shape[1:])
    bound = 1.0 / math.sqrt(fan_in)
    values = torch.rand(shape, generator=generator, dtype=torch.float64) * (2 * bound) - bound
    return nn.Parameter(values.to(device=like.device, dtype=like.dtype))


def _zeros(shape: tuple[int, ...], like: Tensor) -> nn.Parameter:
    """A zero parameter of ``shape`` on ``like``'s device and dtype (``B``: the adapter adds nothing at first)."""
    return nn.Parameter(torch.zeros(shape, device=like.device, dtype=like.dtype))


class LoRALinear(nn.Module):
    """``base(x) + scale * (dropout(x) @ A^T) @ B^T`` over an ``nn.Linear`` (``A``: (r, in), ``B``: (out, r))."""

    def __init__(self, base: nn.Linear, r: int, scale: float, dropout: float, generator: torch.Generator) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.scale = r, scale
        self.add_module(BASE, base)
        self.lora_A = _kaiming((r, base.in_features), generator, base.weight)
        self.lora_B = _zeros((base.out_features, r), base.weight)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        delta = F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)
        return getattr(self, BASE)(x) + self.scale * delta

    def delta_weight(self) -> Tensor:
        """``scale * B @ A``: (out, in), what merging adds to the base weight."""
        return self.scale * (self.lora_B @ self.lora_A)


class LoRAConv2d(nn.Module):
    """``base(x) + scale * B(A(dropout(x)))`` over a one-group ``nn.Conv2d`` with zero padding: ``A`` is an
    (r, in, kh, kw) convolution with the base's stride, padding and dilation, ``B`` an (out, r, 1, 1) one."""

    def __init__(self, base: nn.Conv2d, r: int, scale: float, dropout: float, generator: torch.Generator) -> None:
        super().__init__()
        for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups"):
            setattr(self, name, getattr(base, name))
        self.r, self.scale = r, scale
        self.add_module(BASE, base)
        self.lora_A = _kaiming((r, base.in_channels, *base.kernel_size), generator, base.weight)
        self.lora_B = _zeros((base.out_channels, r, 1, 1), base.weight)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        down = F.conv2d(self.dropout(x), self.lora_A, None, self.stride, self.padding, self.dilation)
        return getattr(self, BASE)(x) + self.scale * F.conv2d(down, self.lora_B)

    def delta_weight(self) -> Tensor:
        """``scale * B @ A`` reshaped to the base kernel (out, in, kh, kw): what merging adds to its weight."""
        base = getattr(self, BASE)
        return self.scale * (self.lora_B.flatten(1) @ self.lora_A.flatten(1)).view_as(base.weight)


WRAPPERS = (LoRALinear, LoRAConv2d)


def _is_adapter(name: str, module: nn.Module) -> bool:
    """A module the filters count as an adapter (its leaf name or class name says "lora" or "adapter")."""
    labels = (name.rsplit(".", 1)[-1].lower(), type(module).__name__.lower())
    return any(token in label for token in ("lora", "adapter") for label in labels)


def _kind(module: nn.Module) -> str | None:
    """``linear``, ``conv1x1`` or ``conv`` for a layer an adapter can wrap, else None. A convolution needs one
    group and zero padding; a subclass is left alone (it may compute differently from its weight)."""
    if type(module) is nn.Linear:
        return "linear"
    if type(module) is nn.Conv2d and module.groups == 1 and module.padding_mode == "zeros":
        return "conv1x1" if tuple(module.kernel_size) == (1, 1) else "conv"
    return None


def _wanted(name: str, kind: str, target: str) -> bool:
    if target == "head":
        return any("head" in part.lower() for part in name.split("."))
    return (kind == "linear" and "linear" in target) or (kind == "conv1x1" and "conv1x1" in target)


def lora_targets(model: nn.Module, target: str) -> list[str]:
    """Names of the layers of ``model`` that ``target`` (``TARGETS``) wraps, in module order: never the model
    itself, a layer inside an adapter (the built-in detector's ``lora`` branches, one already wrapped) or inside
    an ``nn.MultiheadAttention`` (which reads its projections' weights directly)."""
    if target not in TARGETS:
        raise ValueError(f"unknown LoRA target {target!r}; choose one of {', '.join(TARGETS)}")
    chosen, skipped = [], []
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in skipped):
            continue
        if name and (_is_adapter(name, module) or isinstance(module, nn.MultiheadAttention)):
            skipped.append(name + ".")
            continue
        kind = _kind(module)
        if name and kind is not None and _wanted(name, kind, target):
            chosen.append(name)
    return chosen


def inject_lora(model: nn.Module, settings: LoRASettings, *, seed: int = 0) -> list[str]:
    """Wrap the layers ``settings.target`` picks in low-rank adapters, in place; with ``freeze_base`` every other
    parameter stops requiring grad (``freeze_base``). Predictions are unchanged (``B`` = 0).

    Args:
      model: the module test-time training adapts (an adapter's ``get_model()``).
      settings: rank, scale, dropout, target, freeze_base, train_bias; nothing happens when ``r`` is 0.
      seed: seeds the draw of every ``A`` (in module order), so an injection repeats exactly.

    Returns:
      The names of the wrapped layers (their adapters are ``NAME.lora_A``/``NAME.lora_B``, the base ``NAME.base``).

    Raises:
      ValueError: ``target`` finds no layer to wrap in ``model``.
    """
    if not settings.enabled:
        return []
    names = lora_targets(model, settings.target)
    if not names:
        raise ValueError(
            f"LoRA target {settings.target!r} finds no linear or conv layer to wrap in {type(model).__name__}; "
            f"choose another of {', '.join(TARGETS)}"
        )
    generator = torch.Generator().manual_seed(seed)
    for name in names:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base = getattr(parent, leaf)
        wrapper = LoRALinear if isinstance(base, nn.Linear) else LoRAConv2d
        setattr(parent, leaf, wrapper(base, settings.r, settings.scale, settings.dropout, generator))
    if settings.freeze_base:
        freeze_base(model, settings.train_bias)
    return names


def lora_parameter_names(model: nn.Module) -> list[str]:
    """Names of the adapters' parameters: what ``lora_only`` selects (the injected ``lora_A``/``lora_B`` and any
    low-rank branch the model has itself), in ``named_parameters()`` order."""
    chosen = base_selection(model, "lora_only")
    return [name for name, _ in model.named_parameters() if name in chosen]


def freeze_base(model: nn.Module, train_bias: str = "none") -> list[str]:
    """YOLOZU's ``--lora-freeze-base``: every parameter but the adapters' stops requiring grad; with ``train_bias``
    ``all`` the biases of the wrapped layers keep requiring it. Returns the names still requiring grad."""
    if train_bias not in TRAIN_BIAS:
        raise ValueError(f"unknown train_bias {train_bias!r}; choose one of {', '.join(TRAIN_BIAS)}")
    keep = set(lora_parameter_names(model))
    if train_bias == "all":
        for name, module in model.named_modules():
            if isinstance(module, WRAPPERS) and getattr(module, BASE).bias is not None:
                keep.add(f"{name}.{BASE}.bias" if name else f"{BASE}.bias")
    for name, param in model.named_parameters():
        param.requires_grad_(name in keep)
    return [name for name, param in model.named_parameters() if param.requires_grad]


def merge_lora(model: nn.Module) -> list[str]:
    """Fold every adapter into its base layer (``W += scale * B @ A``) and put the base layer back in the adapter's
    place, in place: the model has its original module tree and state-dict keys and predicts as the adapted one
    did (up to float rounding). Returns the names of the merged layers."""
    merged = [name for name, module in model.named_modules() if isinstance(module, WRAPPERS)]
    for name in merged:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        wrapper = getattr(parent, leaf)
        base = getattr(wrapper, BASE)
        with torch.no_grad():
            base.weight.add_(wrapper.delta_weight().to(base.weight.dtype))
        setattr(parent, leaf, base)
    return merged


def lora_report(model: nn.Module, settings: LoRASettings) -> dict[str, Any]:
    """What an injection did, for the export's ``meta.lora.report``: the settings, the wrapped layers' count, the
    adapters' size and the parameters still requiring grad."""
    wrapped = [module for module in model.modules() if isinstance(module, WRAPPERS)]
    return {
        **settings.to_dict(),
        "scale": settings.scale,
        "replaced": len(wrapped),
        "lora_params": sum(m.lora_A.numel() + m.lora_B.numel() for m in wrapped),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
