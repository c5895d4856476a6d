"""Plug-in adapters are untrusted code with a contract (tests/hostile_plugins.py: one misbehaviour each): every
failure of a plug-in (its spec, its import, its factory, its predict, its predictions) is one line naming it and
exit 1, with every existing output byte-identical."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cli_cases import OLD, blank_dataset
from yolozu.cli import main as cli


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return blank_dataset(tmp_path_factory.mktemp("plugin-contract"), label="0 0.5 0.5 0.2 0.2")


@pytest.fixture()
def modules(tmp_path, monkeypatch):
    """A folder on sys.path with plug-in modules that fail as they are imported."""
    folder = tmp_path / "mods"
    folder.mkdir()
    (folder / "plugin_bad_syntax.py").write_text("def factory(**options)\n    return None\n")
    (folder / "plugin_raises_at_import.py").write_text("raise RuntimeError('the plug-in cannot start')\n")
    (folder / "plugin_exits_at_import.py").write_text("import sys\nsys.exit(0)\n")
    monkeypatch.syspath_prepend(str(folder))
    return folder


def _export(capsys, dataset: Path, out: Path, adapter: str) -> tuple[int | str, list[str]]:
    try:
        code = cli(["export", "--adapter", adapter, "--dataset", str(dataset), "--split", "val", "--quiet",
                    "--output", str(out)])
    except BaseException as e:  # noqa: B036 - report what escaped (SystemExit included) instead of ending the session
        code = f"escaped: {type(e).__name__}"
    return code, capsys.readouterr().err.strip().splitlines()


CASES = {
    "os:system": "the factory raised TypeError",
    "../../etc:passwd": "is not a module name",
    "plugin_bad_syntax:factory": "has a syntax error (plugin_bad_syntax.py, line 1)",
    "plugin_raises_at_import:factory": "plugin_raises_at_import raised RuntimeError: the plug-in cannot start",
    "plugin_exits_at_import:factory": "importing plugin_exits_at_import called sys.exit(0)",
    "hostile_plugins:raises": "the factory raised RuntimeError: the factory failed",
    "hostile_plugins:no_kwargs": "the factory raised TypeError",
    "hostile_plugins:exits": "the factory called sys.exit(0)",
    "hostile_plugins:not_callable": "not a factory",
    "hostile_plugins:predict_raises": "predict raised KeyError: 'boom'",
    "hostile_plugins:predict_generator": "predictions must be a list of per-image entries, got generator",
    "hostile_plugins:numpy_scores": "predictions[0].detections[0].score: must be a finite number",
    "hostile_plugins:too_few": "1 predictions for 2 images",
    "hostile_plugins:score_5": "predictions[0].detections[0].score: must be in [0, 1]",
    "hostile_plugins:class_minus_1": "predictions[0].detections[0].class_id: must be a non-negative int",
    "hostile_plugins:other_image": "predictions[0].image is '/elsewhere/other.png'",
}


@pytest.mark.parametrize("adapter", CASES)
def test_a_failing_plug_in_is_one_line_naming_it(tmp_path, dataset, modules, capsys, adapter):
    out = tmp_path / "p.json"
    out.write_bytes(OLD)
    code, err = _export(capsys, dataset, out, adapter)
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith(f"error: adapter {adapter!r}")
    assert CASES[adapter] in err[0]
    assert out.read_bytes() == OLD


def test_a_plug_in_that_keeps_the_contract_is_written(tmp_path, dataset, capsys):
    out = tmp_path / "p.json"
    out.write_bytes(OLD)
    code, err = _export(capsys, dataset, out, "hostile_plugins:good")
    assert code == 0, err
    assert out.read_bytes() != OLD
