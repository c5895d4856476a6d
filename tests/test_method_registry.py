"""A method is one value and one registry line: a new method (written here as a user would, in a file of its
own) gets its config fields, flags, meta and every schedule from the registry, with no change to the shell."""

import ast
from pathlib import Path

import attrs
import pytest
import torch
from toy import TensorAdapter, TinyClassifier, seeded

from yolozu.functional import methods
from yolozu.functional.losses import softmax_entropy
from yolozu.functional.methods import METHODS, MethodEntry
from yolozu.functional.settings import number, setting
from yolozu.functional.step import LossOutput, Method

ROOT = Path(__file__).resolve().parents[1]


@attrs.frozen(kw_only=True)
class SharpSettings:
    temperature: float = setting(2.0, "sharp: softmax temperature", number(0, low_open=True))


def sharp_method(apply, optimizer, settings=SharpSettings(), *, readout, bn="running") -> Method:
    """Entropy of temperature-scaled logits: a method the package does not ship."""

    def loss_fn(params, buffers, batch, extra):
        output, new_buffers = apply(params, buffers, batch, bn_mode=bn)
        loss = softmax_entropy(readout.scores(output) / settings.temperature, dim=1).mean()
        return loss, LossOutput(new_buffers, {"temperature": torch.full_like(loss, settings.temperature)}, output)

    return Method(loss_fn, optimizer, metric_names=("temperature",), row_fields={"kind": "sharp"})


@pytest.fixture
def registered(monkeypatch):
    """The one registry line, and the config class and export flags generated from the registry."""
    monkeypatch.setitem(METHODS, "sharp", MethodEntry(sharp_method, SharpSettings, "sharp_"))
    from yolozu.tta import config
    from yolozu.tta import flags as ttt_flags

    cls = config.config_class(METHODS)
    monkeypatch.setattr(config, "TTTConfig", cls)
    monkeypatch.setattr(ttt_flags, "TTTConfig", cls)
    return cls


def test_a_new_method_gets_fields_flags_meta_and_runs(registered):
    from yolozu.cli.export import build_parser, ttt_config, ttt_meta
    from yolozu.tta import run_ttt

    args = build_parser().parse_args(
        ["--dataset", "d", "--output", "o", "--ttt", "--ttt-method", "sharp", "--ttt-sharp-temperature", "3"]
    )
    config = ttt_config(args)
    assert (config.method, config.sharp_temperature) == ("sharp", 3.0)
    assert ttt_meta(config, None)["sharp"] == {"temperature": 3.0}
    with pytest.raises(ValueError, match="TTTConfig.sharp_temperature must be a finite number > 0"):
        registered(sharp_temperature=0.0)
    model = seeded(TinyClassifier)
    images = [torch.randn(3, 12, 12, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    report = run_ttt(TensorAdapter(model), images, config.replace(lr=1e-2, batch_size=2, max_batches=None, steps=2))
    assert report.steps_run == 2
    assert [row["temperature"] for row in report.step_metrics] == [3.0, 3.0]
    assert {row["kind"] for row in report.step_metrics} == {"sharp"}


def test_an_unknown_method_is_an_error_listing_the_registry():
    with pytest.raises(ValueError, match="unknown TTT method 'rotta'; choose one of tent, mim, cotta, eata, sar"):
        methods.entry("rotta")


def _method_name_tests(source: str) -> list[int]:
    """Lines comparing anything with a registered method's name (``method == "tent"``, ``in ("mim", ...)``)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            operands = (node.left, *node.comparators)
            strings = [n.value for o in operands for n in ast.walk(o) if isinstance(n, ast.Constant)]
            if any(isinstance(s, str) and s in METHODS for s in strings):
                found.append(node.lineno)
    return found


def test_the_shell_never_asks_which_method_it_runs():
    assert _method_name_tests('x = 1\nif config.method in ("cotta", "x"):\n    pass\n') == [2]  # the scan works
    shell = [*sorted((ROOT / "yolozu" / "tta").glob("*.py")), ROOT / "yolozu" / "export.py", ROOT / "yolozu" / "cli.py"]
    shell += [ROOT / "yolozu" / "demo" / "bench" / name for name in ("shift.py", "recipes.py")]  # its runner
    found = {str(path.relative_to(ROOT)): _method_name_tests(path.read_text()) for path in shell}
    assert {path: lines for path, lines in found.items() if lines} == {}
