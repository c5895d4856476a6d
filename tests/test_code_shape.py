"""Mechanical checks of the code's shape: the functional core is pure and device-explicit, library modules and
functions stay small enough to read."""

import ast
import re
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


def _docstring_lines(tree: ast.AST) -> set[int]:
    """The line numbers of every module, class and function docstring in ``tree``."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(
                first.value.value, str
            ):
                lines.update(range(first.lineno, first.end_lineno + 1))
    return lines


def code_lines(source: str) -> int:
    """Lines of ``source`` outside docstrings: what the size limits count, so documenting a function's arguments
    never pushes a module or a function over them."""
    return len(source.splitlines()) - len(_docstring_lines(ast.parse(source)))


def _long_functions(source: str, limit: int) -> list[str]:
    tree = ast.parse(source)
    docs = _docstring_lines(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            n = sum(1 for line in range(node.lineno, node.end_lineno + 1) if line not in docs)
            if n > limit:
                found.append(f"{node.name} ({n} lines)")
    return found


def test_library_modules_and_functions_stay_small():
    long_modules = {str(p.relative_to(ROOT)): n for p in LIBRARY if (n := code_lines(p.read_text())) > 350}
    long_functions = {str(p.relative_to(ROOT)): f for p in LIBRARY if (f := _long_functions(p.read_text(), 60))}
    assert long_modules == {} and long_functions == {}
    assert _long_functions("def f():\n" + "    x = 1\n" * 60, 60) == ["f (61 lines)"]
    documented = 'def f():\n    """One.\n\n    Two.\n    """\n' + "    x = 1\n" * 59
    assert _long_functions(documented, 60) == [] and code_lines('"""Doc."""\n' + documented) == 60


DOCUMENTED = ["functional", "tta", "io", "parallel"]
"""The packages whose public functions and classes carry docstrings in optax's style."""


def _parameters(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    a = fn.args
    names = [x.arg for x in (*a.posonlyargs, *a.args, *a.kwonlyargs)]
    names += [x.arg for x in (a.vararg, a.kwarg) if x is not None]
    return [n for n in names if n not in ("self", "cls")]


def _returns_a_value(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """Annotated as returning something other than None or, unannotated, a ``return`` of a value in its own body
    (not in a function nested in it)."""
    if fn.returns is not None:
        return not (isinstance(fn.returns, ast.Constant) and fn.returns.value is None)
    pending = list(fn.body)
    while pending:
        node = pending.pop()
        if isinstance(node, ast.Return) and node.value is not None:
            return True
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            pending.extend(ast.iter_child_nodes(node))
    return False


def _function_gaps(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    doc = ast.get_docstring(fn)
    if not doc:
        return ["no docstring"]
    if any(ast.unparse(d) == "property" for d in fn.decorator_list):
        return []
    gaps = []
    parameters = _parameters(fn)
    if parameters and "Args:" not in doc:
        gaps.append("no Args")
    elif parameters:
        section = doc.split("Args:", 1)[1]
        missing = [p for p in parameters if not re.search(rf"^\s*{p}( \(.*\))?:", section, re.MULTILINE)]
        gaps += [f"Args misses {', '.join(missing)}"] if missing else []
    if _returns_a_value(fn) and not any(word in doc for word in ("Returns:", "Yields:")):
        gaps.append("no Returns")
    return gaps


def undocumented(source: str) -> list[str]:
    """The public functions, methods and classes of a module ``source`` that lack what a reader of optax's
    docstrings finds: a docstring; for a function, an ``Args:`` section naming every parameter and, when it
    returns a value, a ``Returns:`` (or ``Yields:``) section. Properties need a docstring only; names starting
    with ``_`` are private."""
    found = []
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
            found += [f"{node.lineno}: {node.name}: {gap}" for gap in _function_gaps(node)]
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            if not ast.get_docstring(node):
                found.append(f"{node.lineno}: class {node.name}: no docstring")
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and not item.name.startswith("_"):
                    found += [f"{item.lineno}: {node.name}.{item.name}: {gap}" for gap in _function_gaps(item)]
    return found


@pytest.mark.parametrize(
    "path",
    [p for package in DOCUMENTED for p in sorted((ROOT / "yolozu" / package).rglob("*.py"))],
    ids=lambda p: str(p.relative_to(ROOT / "yolozu")),
)
def test_public_functions_are_documented(path):
    assert undocumented(path.read_text()) == []


@pytest.mark.parametrize(
    "snippet,expected",
    [
        ("def f(x):\n    return x\n", "f: no docstring"),
        ('def f(x):\n    """What."""\n', "f: no Args"),
        ('def f(x, y):\n    """What.\n\n    Args:\n      x: one.\n    """\n', "f: Args misses y"),
        ('def f(s):\n    """What.\n\n    Args:\n      probs: one.\n    """\n', "f: Args misses s"),
        ('def f():\n    """What."""\n    return 1\n', "f: no Returns"),
        ('def f() -> int:\n    """What."""\n', "f: no Returns"),
        ('def f():\n    """What."""\n    if True:\n        return 1\n', "f: no Returns"),
        ("class C:\n    pass\n", "class C: no docstring"),
        ('class C:\n    """C."""\n\n    def m(self, v):\n        """What."""\n', "C.m: no Args"),
    ],
)
def test_the_documentation_check_finds_each_gap(snippet, expected):
    assert any(line.endswith(expected) for line in undocumented(snippet))
    documented = '''
def f(x, *rest, k=1, **options) -> int:
    """What and why.

    Args:
      x: the input.
      rest: more inputs.
      k: a knob.
      options (dict): the rest.
    Returns:
      A number.
    """
    return 1


def _private(x):
    return x


def setup():
    """Installs a callback that returns a value; setup itself returns nothing."""

    def callback():
        return 1

    register(callback)


class C:
    """A class."""

    @property
    def size(self) -> int:
        """Its size."""
        return 1

    def reset(self) -> None:
        """Back to the start."""
'''
    assert undocumented(documented) == []
