"""The benchmark's update budget: its arithmetic, the recipes' batches, BatchNorm statistics on the method's own
batches, the gains' intervals, the pages' budget and Over BN lines, and the data maker growing val for it."""

import re
from pathlib import Path

import attrs
import numpy as np
import pytest

from yolozu.data import build_manifest
from yolozu.demo.bench import budget, continual, gains, recipes, report, shift
from yolozu.demo.bench.bootstrap import image_matches, map50_gain, paired_interval, resample_weights, weighted_map50
from yolozu.demo.bench.runner import Runner
from yolozu.demo.data import write_corrupted_split
from yolozu.demo.synth import SynthSpec, write_split

ROOT = Path(__file__).resolve().parents[1]
OVER_BN = re.compile(
    r"^Over BN: online, severity 5, (\d+) updates per corruption, points over BatchNorm statistics: "
    r"[a-z]+ [+-]\d+\.\d(, [a-z]+ [+-]\d+\.\d)*$"
)


@pytest.mark.parametrize(("images", "batch", "want"), [(400, 8, 50), (401, 8, 51), (7, 8, 1), (0, 8, 0), (64, 32, 2)])
def test_updates_are_the_batches_of_a_domain(images, batch, want):
    assert budget.updates(images, batch) == want
    recorded = budget.budget(images, batch)
    plural = "" if want == 1 else "s"
    line = f"Budget: {want} update{plural} per corruption ({images} images, batch {batch})"
    assert budget.budget_line(recorded) == line


def test_a_bad_budget_and_a_short_split_are_refused_with_the_remedy():
    with pytest.raises(ValueError, match="batch >= 1"):
        budget.updates(10, 0)
    assert budget.split_images({"val": 4, "val-fog-5": 4}, 4) == 4
    assert budget.split_images({"val": 3, "val-fog-5": 3}, None) == 3
    with pytest.raises(ValueError, match="split val-fog-5 has 300 images .* asks for 400.*--n-val 400"):
        budget.split_images({"val": 400, "val-fog-5": 300}, 400)
    with pytest.raises(ValueError, match="has 2 images where the protocol asks for 3"):
        budget.split_images({"val": 3, "val-fog-5": 2}, None)


def test_make_bench_gives_every_online_method_at_least_50_updates_per_corruption():
    assert budget.updates(shift.IMAGES, recipes.BUDGET_BATCH) >= 50
    assert budget.updates(continual.IMAGES, recipes.STREAM_BATCH) >= 50  # the continual stream at the same budget
    assert continual.IMAGES == shift.IMAGES  # the data step makes val's BENCH_VAL images for both
    assert len(shift.SCOPES["quick"][2]) == 4 and set(shift.SCOPES["full"][2]) == set(shift.CORRUPTIONS)
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^BENCH_VAL := (\d+)$", makefile, re.M).group(1) == str(shift.IMAGES)
    corruptions = re.search(r"^BENCH_CORRUPTIONS := (.+)$", makefile, re.M).group(1).split()
    assert corruptions == list(shift.BENCH_CORRUPTIONS)


def test_baseline_and_methods_share_the_protocol_batch_and_streams_keep_theirs():
    bn = recipes.RECIPES["bn"]
    assert bn.batch == recipes.BUDGET_BATCH
    reset = [r for r in recipes.RECIPES.values() if r.ttt and not r.episodic]
    assert {r.name for r in reset} >= {"tent", "mim", "cotta", "eata", "sar", "align", "tent-pre"}
    assert all(r.batch == bn.batch for r in reset)
    assert recipes.stream_recipe("bn").batch == recipes.STREAM_BATCH
    assert all(recipes.stream_recipe(r.name).batch == recipes.STREAM_BATCH for r in reset)
    assert recipes.stream_recipe("tent").ttt["lr"] == recipes.STREAM_SETTINGS["tent"]["lr"]
    assert recipes.stream_recipe("tent-sample") == recipes.RECIPES["tent-sample"]


def test_adapt_first_takes_as_many_steps_as_the_online_schedule_updates():
    pre = recipes.RECIPES["tent-pre"]
    assert pre.adapts_first and not recipes.RECIPES["tent"].adapts_first
    assert pre.config(400).steps == 50 and pre.config(401).steps == 51
    assert pre.config(400).schedule == "pre" and pre.config(400).max_batches is None


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("budget")
    write_split(root, "val", 16, seed=5, spec=SynthSpec(image_size=160))
    write_corrupted_split(root, "fog", 5, seed=0)
    return root


def _frozen(name: str):
    """Recipe ``name`` with a vanishing step (1e-12; the config refuses 0): what is left of it is the
    normalisation of its own batches."""
    recipe = recipes.RECIPES[name]
    return attrs.evolve(recipe, ttt={**recipe.ttt, "lr": 1e-12})


def _flat(predictions) -> np.ndarray:
    """Every detection's class, score and box, in order."""
    return np.array([[d["class_id"], d["score"], *d["bbox"].values()] for p in predictions for d in p["detections"]])


@pytest.mark.parametrize("name", ["tent", "tent-pre"])
def test_the_baseline_normalises_with_the_very_batches_the_methods_adapt_on(tiny, name):
    runner = Runner(dataset=str(tiny))
    records = build_manifest(str(tiny), "val-fog-5")
    baseline = _flat(runner.predict(recipes.RECIPES["bn"], records)[0])
    frozen = _flat(runner.predict(_frozen(name), records)[0])
    assert baseline.shape == frozen.shape and np.allclose(baseline, frozen, atol=1e-5)
    # the check can fail: statistics over other batches give other predictions
    other = _flat(runner.predict(attrs.evolve(recipes.RECIPES["bn"], bn_batch=16), records)[0])
    assert other.shape != baseline.shape or not np.allclose(other, baseline, atol=1e-5)


def test_method_gains_are_zero_against_itself_and_positive_for_better_matches(tiny):
    runner = Runner(dataset=str(tiny))
    records = build_manifest(str(tiny), "val-fog-5")
    bn = image_matches(runner.predict(recipes.RECIPES["bn"], records)[0], records)
    source = image_matches(runner.predict(recipes.RECIPES["source"], records)[0], records)
    found = gains.method_gains({"val-fog-5": {"bn": bn, "same": bn, "source": source}}, "bn",
                               ["bn", "same", "source"], draws=50)
    assert set(found) == {"same", "source"}
    assert found["same"]["value"] == found["same"]["low"] == found["same"]["high"] == 0.0
    worse = found["source"]  # the source model on fog: far below BatchNorm statistics
    assert worse["high"] < 0 and worse["low"] <= worse["value"] <= worse["high"]
    assert worse["splits"]["val-fog-5"]["value"] == worse["value"]
    # the same draws as the bootstrap module's own paired interval, and the trimmed tail changes no resample
    reference = paired_interval([map50_gain(bn, source)], [len(records)], draws=50)
    assert np.isclose(worse["low"], reference.low) and np.isclose(worse["high"], reference.high)
    weights = resample_weights(len(records), 20, np.random.default_rng(3))
    for m in (bn, source):
        assert len(gains.trimmed(m).tp) < len(m.tp)
        assert np.array_equal(weighted_map50(gains.trimmed(m), weights), weighted_map50(m, weights))
    path = gains.save_matches(tiny / "m.npz", {"val-fog-5": {"bn": bn}})
    back = gains.load_matches(path)["val-fog-5"]["bn"]
    assert all(np.array_equal(a, b) for a, b in zip(back, bn))


def _page_results(gain_of: dict) -> dict:
    """Quick-scope results on the 4 corruptions of make bench, 400 images in batches of 8, with recorded gains."""
    splits = ["val"] + [f"val-{c}-5" for c in shift.BENCH_CORRUPTIONS]
    rows = [{"split": s, "method": m, "map50": 0.5 + g, "map": 0.25, "images": 400, "seconds": 1.0}
            for m, g in gain_of.items() for s in splits]
    interval = {"value": 0.0, "low": -0.01, "high": 0.01}
    found = {m: {"value": g, "low": g - 0.01, "high": g + 0.01, "level": 0.95, "draws": 1000,
                 "splits": {s: interval for s in splits[1:]}} for m, g in gain_of.items() if m not in ("source", "bn")}
    return {
        "recipes": {m: recipes.RECIPES[m].meta() for m in gain_of}, "splits": splits, "rows": rows,
        "budget": budget.budget(400, 8), "gains": found, "images_per_split": 400,
        "peak_memory_bytes": {m: 1e6 for m in gain_of}, "memory_split": "val-fog-5", "memory_images": 4,
        "seconds": 60.0, "date": "2026-12-05", "command": "test", "scope": "quick",
        "machine": {"platform": "p", "processor": "x", "torch_threads": 2, "device": "cpu", "torch": "t"},
    }


def test_the_page_states_its_budget_the_over_bn_line_and_each_gains_interval(tmp_path):
    res = _page_results({"source": -0.1, "bn": 0.0, "tent": 0.025, "mim": -0.003, "tent-pre": 0.01})
    report.write_report(res, tmp_path, "quick")
    lines = (tmp_path / "benchmarks.md").read_text().splitlines()
    over = [line for line in lines if line.startswith("Over BN:")]
    assert len(over) == 1 and OVER_BN.match(over[0]) and OVER_BN.match(over[0]).group(1) == "50"
    assert over[0].endswith("points over BatchNorm statistics: tent +2.5, mim -0.3")
    assert "Budget: 50 updates per corruption (400 images, batch 8), reset per corruption" in "\n".join(lines)
    text = "\n".join(lines)
    assert "| Tent, adapt then predict | **+1.0 [+0.0, +2.0]** |" in text
    assert "tent +2.5 [+1.5, +3.5]: **met**" in text  # the best method's +2.0 target, the interval above 0
    assert "beats BatchNorm statistics alone (batches of 8): +2.50 points (95% interval [+1.5, +3.5])" in text


def test_readme_and_the_benchmark_page_carry_one_over_bn_line_naming_every_method():
    def over_bn(path: Path) -> list[str]:
        return [line for line in path.read_text().splitlines() if line.startswith("Over BN:")]

    readme, page = over_bn(ROOT / "README.md"), over_bn(ROOT / "docs" / "benchmarks.md")
    assert len(readme) == 1 and readme == page
    found = OVER_BN.match(readme[0])
    assert found and int(found.group(1)) >= 50
    named = re.findall(r"([a-z]+) [+-]\d+\.\d", readme[0].split(": ", 1)[1])
    assert named == list(recipes.GRADIENT_METHODS)
