"""Adapters from outside the package: ``--adapter package.module:factory``, the ``yolozu.adapters`` entry-point
group, and the complete user adapter of docs/adapters.md, run as the doc shows it (so the doc cannot rot)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.toy import UNGUARDED
from yolozu.adapters import UnknownAdapterError, adapter_names, build_adapter
from yolozu.adapters.plugins import ENTRY_POINT_GROUP, PluginError
from yolozu.cli.export import main

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "adapters.md"


def doc_example() -> str:
    """The python block that follows the doc's example marker."""
    text = DOC.read_text()
    match = re.search(r"<!-- the example: .*? -->\n```python\n(.*?)```", text, re.S)
    assert match, "docs/adapters.md lost its example block"
    return match.group(1)


@pytest.fixture
def plugin_dir(tmp_path, monkeypatch):
    """A folder on sys.path holding the doc's ``my_detector.py``."""
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / "my_detector.py").write_text(doc_example())
    monkeypatch.syspath_prepend(str(folder))
    yield folder
    import sys

    sys.modules.pop("my_detector", None)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("plugin-data")
    (root / "images" / "val").mkdir(parents=True)
    (root / "labels" / "val").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(root / "images" / "val" / f"{i}.png")
        (root / "labels" / "val" / f"{i}.txt").write_text("3 0.5 0.5 0.2 0.2\n")
    return root


def _export(dataset: Path, out: Path, adapter: str, *extra: str) -> int:
    return main(["--adapter", adapter, "--dataset", str(dataset), "--output", str(out), "--quiet", *extra])


def test_the_docs_example_is_a_complete_adapter_in_under_40_lines(plugin_dir, dataset, tmp_path):
    assert len(doc_example().splitlines()) < 40
    import my_detector

    mine = my_detector.MyAdapter()
    checkpoint = tmp_path / "mine.pt"
    torch.save(mine.get_model().state_dict(), checkpoint)
    plain, adapted = tmp_path / "plain.json", tmp_path / "adapted.json"
    assert _export(dataset, plain, "my_detector:MyAdapter", "--checkpoint", str(checkpoint)) == 0
    records = [{"image": str(p), "labels": []} for p in sorted((dataset / "images" / "val").iterdir())]
    assert json.loads(plain.read_text()) == mine.predict(records)
    ttt = ["--ttt", "--ttt-method", "tent", "--ttt-update-filter", "norm_only", "--ttt-lr", "0.5", "--wrap", *UNGUARDED]
    assert _export(dataset, adapted, "my_detector:MyAdapter", "--checkpoint", str(checkpoint), *ttt) == 0
    doc = json.loads(adapted.read_text())
    assert doc["meta"]["ttt"]["report"]["steps_run"] == 1
    assert doc["predictions"] != json.loads(plain.read_text())  # the adapted BatchNorm predicts differently


def test_an_installed_package_registers_an_adapter_by_name(plugin_dir, dataset, tmp_path, monkeypatch):
    """A distribution on sys.path (its dist-info names the entry point) is found through importlib.metadata."""
    info = plugin_dir / "my_detector_pkg-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: my-detector-pkg\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\nmine = my_detector:MyAdapter\n")
    assert "mine" in adapter_names()
    assert type(build_adapter("mine")).__name__ == "MyAdapter"
    assert _export(dataset, tmp_path / "p.json", "mine") == 0


class NotAnAdapter:
    def __init__(self, **options):
        self.options = options


NOT_CALLABLE = 3


@pytest.mark.parametrize(
    "name,expected,code",
    [
        ("yolo11", "unknown adapter 'yolo11'; choose one of: detector, dummy, torchvision", 2),
        ("no_such_module:build", "cannot import no_such_module", 1),
        ("test_adapter_plugins:nothing", "has no nothing", 1),
        ("test_adapter_plugins:NOT_CALLABLE", "not a factory", 1),
        ("test_adapter_plugins:NotAnAdapter", "not a ModelAdapter: it needs predict(records)", 1),
        (":build", "package.module:factory", 1),
    ],
)
def test_a_bad_adapter_is_one_line_naming_it(name, expected, code, dataset, tmp_path, capsys):
    """An unknown name is a bad command line (exit 2, with the usage line); a plug-in that cannot be loaded or
    built is a failed run (exit 1, one line)."""
    out = tmp_path / "p.json"
    assert _export(dataset, out, name) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert expected in err[-1] and len(err) == code and not out.exists()
    with pytest.raises((UnknownAdapterError, PluginError), match=re.escape(expected)):
        build_adapter(name)


@pytest.mark.parametrize(
    "args,expected",
    [
        (["--adapter", "detector", "--model", "ssd300_vgg16"], "--model: only --adapter torchvision"),
        (["--adapter", "dummy", "--num-classes", "3"], "--num-classes does not apply to --adapter dummy"),
        (["--adapter", "torchvision", "--checkpoint", "x.pt"], "needs --model NAME and --checkpoint FILE"),
        (["--adapter", "torchvision", "--model", "yolov8", "--checkpoint", "x.pt"], "'yolov8' is not supported"),
    ],
)
def test_model_flags_fit_their_adapter(args, expected, dataset, tmp_path, capsys):
    out = tmp_path / "p.json"
    assert main([*args, "--dataset", str(dataset), "--output", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert expected in err and not out.exists()
    if "supported" in expected or "needs" in expected:
        assert "fasterrcnn_resnet50_fpn, fasterrcnn_resnet50_fpn_v2" in err  # the supported models are listed
