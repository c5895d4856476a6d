"""The library stands apart from the demo: it imports without the demo extra, never imports ``yolozu.demo``;
imports point down the layers (DESIGN.md), no module imports another in a cycle (the demo included), and few
modules stand at the top of the package.

Modules are found by walking the package directory, so a new module is covered without editing this file.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import yolozu

PACKAGE = Path(yolozu.__file__).resolve().parent
DEMO = PACKAGE / "demo"
DEMO_EXTRAS = ("skimage", "sklearn", "scipy", "mlxtend", "matplotlib", "imagecorruptions", "cv2", "numba")


def module_name(path: Path) -> str:
    """Dotted name of a source file under ``PACKAGE``: ``yolozu/tta/__init__.py`` -> ``yolozu.tta``."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_files() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def library_files() -> list[Path]:
    """Every module of the library: all of ``yolozu`` but ``yolozu/demo``."""
    return [p for p in package_files() if DEMO not in p.parents]


KNOWN = {module_name(p) for p in package_files()}


def imported_modules(path: Path) -> set[str]:
    """Absolute names of the modules ``path`` imports anywhere in it (function bodies included).

    Relative imports are resolved; ``from a import b`` counts as importing ``a.b`` when that is a module, else ``a``;
    ``importlib.import_module("...")`` and ``__import__("...")`` with a literal name count too.
    """
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package.pop()
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package[: len(package) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if full in KNOWN else base)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if called in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                found.add(node.args[0].value)
    return found


def is_demo(module: str) -> bool:
    return module == "yolozu.demo" or module.startswith("yolozu.demo.")


def unit(module: str) -> str | None:
    """The top-level unit of a ``yolozu`` module (``yolozu.tta.engine`` -> ``yolozu.tta``); None outside units."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "yolozu" and len(parts) > 1 else None


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of ``graph`` as its nodes with the first repeated at the end, or None (depth-first search)."""
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        path.pop()
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


_IMPORT_UNDER_BLOCKER = """
import importlib, importlib.abc, json, sys

BLOCKED = set(json.loads(sys.argv[1]))
MODULES = json.loads(sys.argv[2])


class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"{name} is blocked: the demo extra is not installed", name=name)
        return None


sys.meta_path.insert(0, Blocker())
loaded = sorted(n for n in sys.modules if n.partition(".")[0] in BLOCKED)
assert not loaded, f"already imported at start-up: {loaded}"
failures = {}
for name in MODULES:
    try:
        importlib.import_module(name)
    except Exception as e:
        failures[name] = f"{type(e).__name__}: {e}"
try:
    import yolozu.demo.corruptions
    blocker_works = False
except ImportError:
    blocker_works = True
print(json.dumps({"file": sys.modules["yolozu"].__file__, "failures": failures, "blocker_works": blocker_works}))
"""


def test_library_imports_without_demo_extras():
    modules = sorted(module_name(p) for p in library_files())
    assert {"yolozu", "yolozu.functional.step", "yolozu.tta.engine", "yolozu.adapters.detector"} <= set(modules)
    done = subprocess.run(
        [sys.executable, "-c", _IMPORT_UNDER_BLOCKER, json.dumps(DEMO_EXTRAS), json.dumps(modules)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=PACKAGE.parent,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(result["file"]).resolve() == Path(yolozu.__file__).resolve()
    assert result["blocker_works"], "yolozu.demo.corruptions imported with scipy blocked: the check proves nothing"
    assert not result["failures"], f"library modules that need the demo extra: {result['failures']}"


def test_library_never_imports_demo():
    demo_imports = {module_name(p): sorted(m for m in imported_modules(p) if is_demo(m)) for p in library_files()}
    offenders = {name: found for name, found in demo_imports.items() if found}
    assert not offenders, f"library modules importing yolozu.demo: {offenders}"
    # the scan sees demo imports where there are some (else it could pass vacuously)
    assert "yolozu.demo.corruptions" in imported_modules(DEMO / "data.py")


def test_no_import_cycle_between_subpackages():
    graph: dict[str, set[str]] = {}
    for path in package_files():
        source = unit(module_name(path))
        if source is None or module_name(path) in UPWARD_SHIMS:  # a declared shim points up by design
            continue
        targets = {unit(m) for m in imported_modules(path)}
        graph.setdefault(source, set()).update(t for t in targets if t is not None and t != source)
    assert "yolozu.models" in graph["yolozu.adapters"] and "yolozu.adapter" in graph["yolozu.adapters"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle between units of yolozu: " + " -> ".join(cycle)


def test_find_cycle_reports_the_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


LAYERS = {
    "runtime": 0, "functional": 1, "io": 1, "data": 1, "bridge": 2, "models": 2, "adapter": 3, "adapters": 3,
    "metrics": 3, "response_selection": 2, "inference": 4, "tta": 5, "parallel": 6, "cli": 7, "demo": 8,
}
"""Each top-level part of the package and its floor: a module imports only from lower floors or its own part
(``adapter``, YOLOZU's contract module, is one part with ``adapters``)."""
UPWARD_SHIMS = {"yolozu.export", "yolozu.eval", "yolozu.inference.export_predictions_cli"}
"""Old import paths kept for one release: they re-export a command from above, so they may point up."""


def _part(module: str) -> str:
    part = module.split(".")[1] if "." in module else ""
    return "adapters" if part == "adapter" else part


def upward_imports() -> list[str]:
    """Every import in the package that points to a higher floor of ``LAYERS`` or across one floor."""
    found = []
    for path in package_files():
        name = module_name(path)
        if name in UPWARD_SHIMS or _part(name) not in LAYERS:
            continue
        for target in imported_modules(path):
            mine, theirs = _part(name), _part(target)
            if target.startswith("yolozu.") and theirs in LAYERS and theirs != mine and LAYERS[theirs] >= LAYERS[mine]:
                found.append(f"{name} imports {target}")
    return found


def test_imports_point_down_the_layers():
    assert upward_imports() == []
    assert set(LAYERS) | {"", "export", "eval"} >= {_part(m) for m in KNOWN}, "a new part needs its floor here"


def test_no_import_cycle_between_modules_demo_included():
    graph = {module_name(p): {m for m in imported_modules(p) if m in KNOWN} for p in package_files()}
    graph = {name: targets - {name} for name, targets in graph.items()}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_few_modules_at_the_top_of_the_package():
    top = sorted(p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py")
    assert len(top) <= 5, top


TTT_FLOW = ("engine", "schedules", "integration")
"""The modules of ``yolozu.tta`` a TTT run passes through, bottom to top: ``integration.run_ttt`` (YOLOZU's entry)
calls a schedule, a schedule drives the engine, the engine steps through ``functional.driver``."""


def test_the_ttt_flow_reads_top_down():
    imports = {name: imported_modules(PACKAGE / "tta" / f"{name}.py") for name in TTT_FLOW}
    for floor, name in enumerate(TTT_FLOW):
        above = {f"yolozu.tta.{upper}" for upper in TTT_FLOW[floor + 1 :]}
        assert not imports[name] & above, f"yolozu.tta.{name} calls back up: {sorted(imports[name] & above)}"
    # each floor calls the one below it (else the check above could pass on modules that were split apart)
    assert "yolozu.tta.schedules" in imports["integration"] and "yolozu.tta.engine" in imports["schedules"]
    assert "yolozu.functional.driver" in imports["engine"]
    # the export picks a schedule; nothing in the library goes through YOLOZU's entry above them
    assert "yolozu.tta.schedules" in imported_modules(PACKAGE / "cli" / "export.py")
    entry_users = [module_name(p) for p in library_files() if "yolozu.tta.integration" in imported_modules(p)]
    assert entry_users == [], f"library modules that call through yolozu.tta.integration: {entry_users}"
