"""The shift benchmark and the continual protocol on another adapter (``--adapter``): the built-in detector by
name, a ``package.module:factory`` plug-in, and the recipes a plug-in cannot run, skipped with the reason."""

import json

import attrs
import pytest

from yolozu.adapters.detector import DetectorAdapter
from yolozu.cli.adapter_flags import AdapterUsageError
from yolozu.demo.bench import continual, recipes, shift
from yolozu.demo.bench.runner import Runner, family_tag
from yolozu.demo.data import write_corrupted_split
from yolozu.demo.synth import SynthSpec, write_split

BUILT = []
"""The options each ``lean_detector`` call got (the plug-in was built, with the export's options)."""


def _no_reconstruction(output):
    raise ValueError("this model has no reconstruction head")


class LeanDetector(DetectorAdapter):
    """The built-in detector without MIM's reconstruction head, and taking no Tent loss option."""

    def ttt_readout(self):
        return attrs.evolve(super().ttt_readout(), recon=_no_reconstruction, recon_kwargs={})


def lean_detector(*, checkpoint=None, device="cpu", batch_size=32):
    """A plug-in factory (``test_bench_adapter:lean_detector``) whose signature refuses ``tent_loss``."""
    BUILT.append({"checkpoint": checkpoint, "device": str(device), "batch_size": batch_size})
    return LeanDetector(checkpoint, device=device, batch_size=batch_size)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    write_split(root, "val", 4, seed=5, spec=SynthSpec(image_size=160))
    write_corrupted_split(root, "fog", 5, seed=0)
    return root


@pytest.fixture
def with_option_recipe(monkeypatch):
    """A recipe carrying an adapter option of the built-in detector (its Tent loss)."""
    recipe = recipes.Recipe("tent-sigmoid", "Tent, sigmoid loss", recipes.RECIPES["tent"].ttt,
                            adapter={"tent_loss": "sigmoid"})
    monkeypatch.setitem(recipes.RECIPES, recipe.name, recipe)
    return recipe.name


def test_the_detector_by_name_writes_the_results_and_report_it_is_given(tiny, tmp_path):
    out, doc = tmp_path / "runs" / "quick-x.json", tmp_path / "out" / "benchmarks-x.md"
    doc.parent.mkdir()
    argv = ["--quick", "--dataset", str(tiny), "--corruptions", "fog", "--images", "4", "--memory-images", "2",
            "--recipes", "source", "bn", "tent", "--adapter", "detector", "--output", str(out), "--docs", str(doc)]
    out.parent.mkdir()
    assert shift.main(argv) == 0
    results = json.loads(out.read_text())
    assert results["model"] == {"adapter": "detector"} and results["skipped"] == {}
    assert {r["method"] for r in results["rows"]} == {"source", "bn", "tent"}
    text = doc.read_text()
    assert "the committed detector" in text and "## Not run" not in text
    assert (doc.parent / "benchmarks-x-severity5.png").is_file()


def test_a_plugin_runs_what_it_supports_and_the_rest_is_skipped_with_the_reason(tiny, tmp_path, with_option_recipe):
    BUILT.clear()
    names = ["source", "bn", "tent", "mim", with_option_recipe]
    runner = Runner("cpu", str(tiny), "test_bench_adapter:lean_detector")
    got = shift.run(str(tiny), ["val", "val-fog-5"], names, images=4, memory_images=2, progress=False, runner=runner)
    assert BUILT and BUILT[0] == {"checkpoint": None, "device": "cpu", "batch_size": 32}
    assert set(got["recipes"]) == {"source", "bn", "tent"}
    assert got["skipped"]["mim"].startswith("not supported on this adapter: ValueError: this model has no recon")
    assert got["skipped"][with_option_recipe] == ("not supported on this adapter: its factory does not take "
                                                  "tent_loss (options for the built-in detector)")
    built_in = shift.run(str(tiny), ["val", "val-fog-5"], ["source", "tent"], images=4, memory_images=2,
                         progress=False)
    scores = {(r["split"], r["method"]): r["map50"] for r in built_in["rows"]}
    assert all(scores[(r["split"], r["method"])] == r["map50"] for r in got["rows"] if r["method"] != "bn")
    from yolozu.demo.bench.report import write_report

    got.update(scope="quick", command="test")
    text = write_report(got, tmp_path / "benchmarks-lean.md", "quick")[0].read_text()
    assert "adapter `test_bench_adapter:lean_detector`" in text
    assert "- mim: not supported on this adapter: ValueError: this model has no reconstruction head" in text


def test_the_built_in_detector_takes_the_recipes_adapter_options(tiny, with_option_recipe):
    runner = Runner("cpu", str(tiny))
    assert runner.unsupported(recipes.RECIPES[with_option_recipe], []) is None
    assert runner.adapter(recipes.RECIPES[with_option_recipe]).tent_loss == "sigmoid"


def test_continual_on_a_plugin_skips_mim_and_names_its_own_files(tiny):
    got = continual.run(str(tiny), ["source", "bn", "mim"], 4, stream_splits=["val-fog-5", "val"], progress=False,
                        runner=Runner("cpu", str(tiny), "test_bench_adapter:lean_detector"))
    assert set(got["recipes"]) == {"source", "bn"} and "mim" in got["skipped"]
    assert got["model"] == {"adapter": "test_bench_adapter:lean_detector"}
    assert shift.default_docs("continual", "test_bench_adapter:lean_detector").name == (
        "benchmarks-continual-test_bench_adapter.md")
    assert shift.default_output("quick", "yolozu.demo.tv_detector:adapter", 1).name == "quick-tv_detector-seed1.json"
    assert shift.default_docs("quick", "detector").name == "docs" and family_tag("detector") == "detector"


def test_an_unknown_adapter_is_an_error_not_a_skipped_recipe(tiny):
    runner = Runner("cpu", str(tiny), "no_such_module_here:factory")
    with pytest.raises(AdapterUsageError, match="cannot import no_such_module_here"):
        shift.run(str(tiny), ["val"], ["source", "tent"], images=2, memory_images=1, progress=False, runner=runner)
    with pytest.raises(AdapterUsageError, match="only --adapter torchvision"):
        Runner("cpu", str(tiny), "detector", model="fcos").options()
