"""Mechanical checks of the code's shape: the functional core is pure and device-explicit, library modules and
functions stay small enough to read."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "yolozu" / "functional"
LIBRARY = [p for p in sorted((ROOT / "yolozu").rglob("*.py")) if "demo" not in p.relative_to(ROOT / "yolozu").parts]

FACTORIES = {"zeros", "ones", "full", "empty", "tensor", "as_tensor", "arange", "linspace", "eye", "scalar_tensor",
             "rand", "randn", "randint", "randperm"}
RANDOM = {"rand", "randn", "randint", "randperm", "bernoulli", "multinomial", "normal", "poisson", "rand_like",
          "randn_like", "randint_like"}
IMPURE_CALLS = {"open", "print", "input", "functional_call", "load_state_dict", "state_dict", "copy_", "train", "eval",
                "register_buffer", "register_parameter"}
IMPURE_MODULES = {"os", "sys", "io", "json", "pathlib", "logging", "pickle", "tempfile", "shutil", "subprocess",
                  "socket", "random", "time", "numpy", "torch.distributed"}
MODULE_ATTRIBUTES = {"training", "_parameters", "_buffers", "_modules"}


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
            owner = f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else None
            yield node, owner, name


def impurities(source: str) -> list[str]:
    """What in ``source`` would make a core module impure: I/O, global RNG, module mutation, imports from
    outside the core, tensor factories without a device."""
    tree = ast.parse(source)
    found = []
    moved = {id(n.func.value) for n in ast.walk(tree) if isinstance(n, ast.Call)
             and isinstance(n.func, ast.Attribute) and n.func.attr == "to"}
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for name in names:
                if name.split(".")[0] in IMPURE_MODULES or name in IMPURE_MODULES:
                    found.append(f"{node.lineno}: imports {name}")
                if name.startswith("yolozu") and not name.startswith("yolozu.functional"):
                    found.append(f"{node.lineno}: imports {name} from outside the core")
        if isinstance(node, ast.Attribute) and node.attr in MODULE_ATTRIBUTES:
            found.append(f"{node.lineno}: touches a module's {node.attr}")
    for node, owner, name in _calls(tree):
        keywords = {k.arg for k in node.keywords}
        if name in IMPURE_CALLS:
            found.append(f"{node.lineno}: calls {name}()")
        if owner == "torch" and name in ("manual_seed", "seed"):
            found.append(f"{node.lineno}: torch.{name}() seeds the global generator")
        if owner == "torch" and name in RANDOM and "generator" not in keywords:
            found.append(f"{node.lineno}: torch.{name}() draws from the global generator")
        if owner == "torch" and name in FACTORIES and "device" not in keywords and id(node) not in moved:
            found.append(f"{node.lineno}: torch.{name}() names no device")
    return found


@pytest.mark.parametrize("path", sorted(CORE.rglob("*.py")), ids=lambda p: p.name)
def test_the_core_is_pure_and_device_explicit(path):
    assert impurities(path.read_text()) == []


@pytest.mark.parametrize(
    "snippet,expected",
    [
        ("import os", "imports os"),
        ("from yolozu.bridge import make_apply", "from outside the core"),
        ("model.training = True", "touches a module's training"),
        ("torch.func.functional_call(m, p, x)", "calls functional_call()"),
        ("x = torch.rand(3, generator=g)", "names no device"),
        ("x = torch.randn(3, device=d)", "global generator"),
        ("x = torch.zeros(())", "names no device"),
        ("m.load_state_dict(sd)", "calls load_state_dict()"),
        ("torch.manual_seed(0)", "seeds the global generator"),
    ],
)
def test_the_purity_check_finds_each_impurity(snippet, expected):
    assert any(expected in line for line in impurities(snippet))
    assert impurities("y = torch.zeros((), device=x.device)\nz = torch.rand(3, generator=g).to(x.device)") == []


def distributed_uses(source: str) -> list[str]:
    """Where ``source`` imports or names ``torch.distributed`` (the core leaves scale-out to the shell)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [f"{node.lineno}: imports {a.name}" for a in node.names if a.name.startswith("torch.distributed")]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            names = [f"{module}.{a.name}" for a in node.names]
            found += [f"{node.lineno}: imports {n}" for n in names if n.startswith("torch.distributed")]
        elif isinstance(node, ast.Attribute) and node.attr == "distributed":
            found.append(f"{node.lineno}: names {ast.unparse(node)}")
    return found


@pytest.mark.parametrize("path", sorted(CORE.rglob("*.py")), ids=lambda p: p.name)
def test_the_core_never_uses_torch_distributed(path):
    assert distributed_uses(path.read_text()) == []


@pytest.mark.parametrize(
    "snippet",
    ["import torch.distributed as dist", "from torch import distributed", "from torch.distributed.nn import functional",
     "torch.distributed.all_reduce(x)", "import torch.distributed.nn"],
)
def test_the_distributed_check_finds_each_use(snippet):
    assert distributed_uses(snippet) != []
    assert distributed_uses("import torch\nfrom yolozu.functional import optim") == []


def _long_functions(source: str, limit: int) -> list[str]:
    return [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(ast.parse(source))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > limit
    ]


def test_library_modules_and_functions_stay_small():
    long_modules = {str(p.relative_to(ROOT)): n for p in LIBRARY if (n := len(p.read_text().splitlines())) > 350}
    long_functions = {str(p.relative_to(ROOT)): f for p in LIBRARY if (f := _long_functions(p.read_text(), 60))}
    assert long_modules == {} and long_functions == {}
    assert _long_functions("def f():\n" + "    x = 1\n" * 60, 60) == ["f (61 lines)"]
