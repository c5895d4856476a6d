"""The stateful shell of test-time training: the names YOLOZU users call, over ``yolozu.functional``.

Importing the package loads no runner: each public name is imported from its module when first used (as
YOLOZU 4.12 does), so ``--help`` and config-only code stay light.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "TTARunner": "base", "TTAConfig": "base", "apply_tta_transform": "base",
    "TTTConfig": "config", "SUPPORTED_TTT_METHODS": "config",
    "TTT_METHOD_PROFILES": "method_profiles", "get_ttt_method_profile": "method_profiles",
    "run_ttt": "integration", "TTTReport": "report",
    "TentConfig": "tent", "TentRunner": "tent",
    "run_ttt_mim": "ttt_mim", "TTTMIMResult": "ttt_mim",
}  # fmt: skip
"""Each public name and the module of this package that defines it."""

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
