"""A method is one value and one registry line: a new method (written as a user would, in a file of its own:
tests/method_plugin.py) gets its config fields, flags, meta and every schedule from the registry, with no change
to the shell; an installed package registers one through the entry-point group ``yolozu.methods``."""

import ast
import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import method_plugin
import pytest
import torch
from toy import TensorAdapter, TinyClassifier, seeded

from yolozu.demo.synth import SynthSpec, write_split
from yolozu.io.predictions import validate_predictions
from yolozu.tta import methods
from yolozu.tta.methods import METHODS

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def registered(monkeypatch):
    """The one registry line, and the config class and export flags generated from the registry."""
    monkeypatch.setitem(METHODS, "sharp", method_plugin.ENTRY)
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
    parts = ("tta", "cli", "inference", "parallel")
    shell = [path for part in parts for path in sorted((ROOT / "yolozu" / part).glob("*.py"))]
    shell += [ROOT / "yolozu" / "demo" / "bench" / name for name in ("shift.py", "recipes.py")]  # its runner
    found = {str(path.relative_to(ROOT)): _method_name_tests(path.read_text()) for path in shell}
    assert {path: lines for path, lines in found.items() if lines} == {}


def _points(**values: str) -> dict:
    return {name: metadata.EntryPoint(name, value, methods.ENTRY_POINT_GROUP) for name, value in values.items()}


def test_plug_ins_load_from_the_entry_point_group_and_bad_ones_say_why():
    found, refused = methods.discover(_points(
        sharp="method_plugin:ENTRY", settings="method_plugin:SharpSettings", tent="method_plugin:ENTRY",
        broken="no_such_module_for_yolozu:ENTRY",
    ))
    assert found == {"sharp": method_plugin.ENTRY}
    assert "not a yolozu.functional.methods.MethodEntry" in refused["settings"]
    assert "takes the name of a built-in method" in refused["tent"]
    assert "failed to load: ModuleNotFoundError" in refused["broken"]


def test_a_plug_in_left_out_is_an_error_that_says_why(monkeypatch):
    monkeypatch.setitem(methods.REFUSED, "broken", "the method plug-in 'broken' failed to load: boom")
    with pytest.raises(ValueError, match="TTT method 'broken' is not available: .*failed to load: boom"):
        methods.entry("broken")


PLUGIN_SCHEDULES = {
    "pre": ["--ttt-schedule", "pre", "--ttt-batch-size", "2", "--ttt-max-batches", "2", "--ttt-steps", "2"],
    "online": ["--ttt-schedule", "online", "--ttt-batch-size", "2"],
    "episodic": ["--ttt-reset", "sample"],
    "streams": ["--ttt-reset", "sample", "--ttt-streams", "2"],
}
RUN_SCHEDULES = """
import json, sys
from yolozu.cli import main
common, outputs, schedules = json.loads(sys.argv[1])
codes = [main(["export", *common, "--output", out, *flags]) for out, flags in zip(outputs, schedules)]
sys.exit(max(codes))
"""


def test_a_method_registered_through_the_entry_point_runs_in_every_schedule(tmp_path):
    """An installed distribution (its metadata on the path) registers tests/method_plugin.py's method; ``yolozu
    export --ttt --ttt-method sharp`` runs it in each schedule, in a fresh interpreter, with no library change."""
    info = tmp_path / "site" / "yolozu_sharp-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: yolozu-sharp\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[yolozu.methods]\nsharp = method_plugin:ENTRY\n")
    data = tmp_path / "data"
    write_split(data, "val", 4, seed=3, spec=SynthSpec(image_size=96))
    common = ["--adapter", "detector", "--dataset", str(data), "--split", "val", "--wrap", "--quiet", "--workers",
              "0", "--ttt", "--ttt-method", "sharp", "--ttt-sharp-temperature", "3", "--ttt-lr", "1e-3"]
    outputs = [str(tmp_path / f"{name}.json") for name in PLUGIN_SCHEDULES]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests"), str(info.parent)])}
    argv = json.dumps([common, outputs, list(PLUGIN_SCHEDULES.values())])
    run = subprocess.run([sys.executable, "-c", RUN_SCHEDULES, argv], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    for name, out in zip(PLUGIN_SCHEDULES, outputs):
        doc = json.loads(Path(out).read_text())
        validate_predictions(doc["predictions"])
        ttt = doc["meta"]["ttt"]
        assert (ttt["method"], ttt["sharp"]) == ("sharp", {"temperature": 3.0}), name
        rows = ttt["report"]["step_metrics"]
        assert ttt["report"]["steps_run"] > 0 and {r["kind"] for r in rows} == {"sharp"}, name
        assert {r["temperature"] for r in rows} == {3.0}, name


def test_the_method_in_docs_ttt_runs_as_written(tmp_path, monkeypatch):
    """docs/ttt.md's complete method, saved as the module it names and found through a real entry point."""
    doc = (ROOT / "docs" / "ttt.md").read_text()
    block = "# my_methods/sharp.py" + doc.split("```python\n# my_methods/sharp.py", 1)[1].split("```", 1)[0]
    (tmp_path / "my_methods").mkdir()
    (tmp_path / "my_methods" / "__init__.py").write_text("")
    (tmp_path / "my_methods" / "sharp.py").write_text(block)
    assert 'sharp = "my_methods.sharp:ENTRY"' in doc
    monkeypatch.syspath_prepend(str(tmp_path))
    found, refused = methods.discover(_points(sharp="my_methods.sharp:ENTRY"))
    assert refused == {} and set(found) == {"sharp"}
    monkeypatch.setitem(METHODS, "sharp", found["sharp"])
    from yolozu.tta import config, run_ttt

    cls = config.config_class(METHODS)
    model = seeded(TinyClassifier)
    images = [torch.randn(3, 12, 12, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    run = cls(enabled=True, method="sharp", sharp_temperature=3.0, lr=1e-2, batch_size=2, max_batches=None, steps=2)
    report = run_ttt(TensorAdapter(model), images, run)
    assert report.steps_run == 2 and [row["temperature"] for row in report.step_metrics] == [3.0, 3.0]
