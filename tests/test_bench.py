"""The shift benchmark: recipes, the run on a tiny dataset, the report's computed headline, the log plot."""

import json
import re

import pytest

from yolozu.cli.export import build_parser, ttt_config
from yolozu.demo.bench import recipes, report, shift
from yolozu.demo.corruptions import CORRUPTIONS
from yolozu.demo.data import write_corrupted_split
from yolozu.demo.plot_log import load_rows, plot_log
from yolozu.demo.synth import SynthSpec, write_split


@pytest.mark.parametrize("name", list(recipes.RECIPES))
def test_recipe_flags_give_the_recipe_config_through_the_cli(name):
    recipe = recipes.RECIPES[name]
    args = build_parser().parse_args(["--dataset", "d", "--output", "o", *recipes.export_flags(name)])
    if recipe.ttt is None:
        assert not args.ttt and (args.bn_stats != "running") == recipe.bn_stats
        assert args.bn_stats == recipe.bn or not recipe.bn_stats
    else:
        assert ttt_config(args).replace(seed=0) == recipe.config()


def _results(sev5: dict, clean: dict, seconds: dict) -> dict:
    rows = []
    for method in sev5:
        rows.append(
            {
                "split": "val",
                "method": method,
                "map50": clean[method],
                "map": clean[method] / 2,
                "images": 10,
                "seconds": seconds[method],
            }
        )
        for i, c in enumerate(CORRUPTIONS):
            value = sev5[method] + (0.01 if i % 2 else -0.01)  # the mean over 15 is sev5[method] - 0.01/15
            rows.append(
                {
                    "split": f"val-{c}-5",
                    "method": method,
                    "map50": value,
                    "map": value / 2,
                    "images": 10,
                    "seconds": seconds[method],
                }
            )
    return {
        "recipes": {m: {"label": recipes.RECIPES[m].label, "ttt": recipes.RECIPES[m].ttt} for m in sev5},
        "splits": ["val"] + [f"val-{c}-5" for c in CORRUPTIONS],
        "rows": rows,
        "peak_memory_bytes": {m: 1e6 for m in sev5},
        "memory_split": "val-fog-5",
        "memory_images": 4,
        "images_per_split": 10,
        "budget": {"images": 10, "batch": 8, "updates": 2},
        "seconds": 60.0,
        "date": "2026-11-26",
        "command": "test",
        "scope": "quick",
        "machine": {"platform": "p", "processor": "x", "torch_threads": 2, "device": "cpu", "torch": "t"},
    }


def test_headline_and_targets_are_computed_from_the_rows(tmp_path):
    sev5 = {"source": 0.20, "bn": 0.30, "tent": 0.35, "mim": 0.29}
    res = _results(
        sev5, {"source": 0.90, "bn": 0.895, "tent": 0.88, "mim": 0.9}, {m: 1.0 for m in sev5} | {"tent": 3.0}
    )
    lines = report.headline_lines(report.Results(res))
    mean = {m: v - 0.01 / 15 for m, v in sev5.items()}
    assert lines[0] == (
        f"Headline: best method: {recipes.RECIPES['tent'].label}, mean mAP50 over 15 corruptions at "
        f"severity 5: source {mean['source']:.3f} -> {mean['tent']:.3f} (+15.0 points)"
    )
    assert lines[1].startswith(
        "Baseline: BatchNorm statistics only, mean mAP50 over 15 corruptions at severity 5: "
        "source 0.199 -> 0.299 (+10.0 points)"
    )
    targets = "\n".join(report.target_lines(report.Results(res)))
    assert "tent +15.0 points: **met**" in targets
    assert re.search(r"Tent, online beats .*: \+5\.00 points: \*\*met\*\*", targets)
    assert re.search(r"MIM, online beats .*: -1\.00 points: \*\*not met\*\*", targets)
    assert "tent drops 2.0: **not met**" in targets
    assert "0.33x: **not met**" in targets
    written = report.write_report(res, tmp_path, "quick")
    text = (tmp_path / "benchmarks.md").read_text()
    assert text.splitlines()[2] == lines[0] and text.splitlines()[3] == lines[1]
    assert (tmp_path / "benchmarks-severity5.png").stat().st_size > 1000 and len(written) == 2


def test_episodic_targets_compare_clean_drop_and_severity_5_with_per_image_statistics_alone():
    sev5 = {"source": 0.20, "bn": 0.30, "bn-image": 0.33, "bn-sample": 0.34, "tent-sample": 0.32, "tent-image": 0.31}
    clean = {"source": 0.90, "bn": 0.895, "bn-image": 0.85, "bn-sample": 0.895, "tent-sample": 0.88, "tent-image": 0.8}
    res = report.Results(_results(sev5, clean, {m: 1.0 for m in sev5}))
    lines = report.episodic_lines(res)
    assert len(lines) == 2  # the two -sample recipes
    assert re.search(r"per image, shrunk.* no lower than BatchNorm statistics only \(per image, alone\): clean drop "
                     r"0\.5, severity 5 \+1\.00 points: \*\*met\*\*", lines[0])
    # Tent episodic is measured against Tent on per-image statistics alone, and its clean drop of 2 points fails
    assert re.search(r"Tent, episodic keeps .* than Tent, episodic, per-image statistics alone: clean drop 2\.0, "
                     r"severity 5 \+1\.00 points: \*\*not met\*\*", lines[1])
    without = {m: v for m, v in sev5.items() if m != "bn-image"}
    assert report.episodic_lines(report.Results(_results(without, clean, {m: 1.0 for m in without}))) == []


def test_benchmark_runs_end_to_end_on_a_tiny_dataset(tmp_path):
    write_split(tmp_path, "val", 4, seed=5, spec=SynthSpec(image_size=160))
    write_corrupted_split(tmp_path, "fog", 5, seed=0)
    results = shift.run(
        str(tmp_path),
        ["val", "val-fog-5"],
        ["source", "bn", "tent", "mim-sample"],
        images=4,
        memory_images=2,
        log_dir=str(tmp_path / "logs"),
        progress=False,
    )
    got = {(r["split"], r["method"]) for r in results["rows"]}
    assert got == {(s, m) for s in ("val", "val-fog-5") for m in ("source", "bn", "tent", "mim-sample")}
    assert all(0.0 <= r["map50"] <= 1.0 and r["seconds"] > 0 for r in results["rows"])
    assert all(results["peak_memory_bytes"][m] > 0 for m in ("source", "bn", "tent", "mim-sample"))
    method, rows = load_rows(results["loss_curve_log"])
    assert method == "tent" and rows
    json.dumps(results)


def test_plot_ttt_log_draws_a_log_and_rejects_other_files(tmp_path):
    log = tmp_path / "log.json"
    log.write_text(
        json.dumps(
            {
                "output": "p.json",
                "ttt": {
                    "method": "tent",
                    "report": {
                        "step_metrics": [
                            {
                                "loss": 1.0 - 0.1 * i,
                                "grad_norm": 0.5,
                                "update_norm": 0.1,
                                "total_update_norm": 0.1 * (i + 1),
                                "rolled_back": i == 3,
                            }
                            for i in range(5)
                        ]
                    },
                },
            }
        )
    )
    out = plot_log(log, tmp_path / "log.png")
    assert out.stat().st_size > 1000
    (tmp_path / "bad.json").write_text(json.dumps({"predictions": []}))
    with pytest.raises(ValueError, match="not a TTT log"):
        plot_log(tmp_path / "bad.json", tmp_path / "bad.png")


def _continual(scores: dict) -> dict:
    """Continual results whose segments (the 15 corruptions, then clean val) score ``scores[method][i]``."""
    splits = [f"val-{c}-5" for c in CORRUPTIONS] + ["val"]
    rows = [{"split": s, "method": m, "map50": v[i], "map": v[i] / 2, "images": 10, "seconds": 1.0}
            for m, v in scores.items() for i, s in enumerate(splits)]
    return {"recipes": {m: {"label": m} for m in scores}, "splits": splits, "rows": rows, "images_per_split": 10,
            "budget": {"images": 10, "batch": 32, "updates": 1},
            "seconds": 60.0, "date": "2026-11-26", "command": "test",
            "machine": {"platform": "p", "processor": "x", "torch_threads": 2, "device": "cpu", "torch": "t"}}


def test_continual_line_and_targets_are_computed_from_the_rows(tmp_path):
    from yolozu.demo.bench import continual_report

    flat = [0.5] * 15
    late_drop = [0.54] * 10 + [0.49] * 5  # better early, below BN statistics on the last five: a collapse
    res = _continual({"source": flat + [0.9], "bn": flat + [0.89], "tent": [0.53] * 15 + [0.85],
                      "cotta": late_drop + [0.895]})
    line = continual_report.continual_line(res)
    assert line == ("Continual: best method tent, mean mAP50 over 15 corruptions at severity 5 in sequence: "
                    "BatchNorm statistics 0.500 -> 0.530 (+3.0 points)")
    targets = "\n".join(continual_report.target_lines(report.Results(res)))
    assert "tent +3.00: **met**" in targets
    assert "tent not below BatchNorm statistics by more than its interval on any of the last 5 corruptions: **met**" \
        in targets
    assert ("cotta not below BatchNorm statistics by more than its interval on any of the last 5 corruptions: below on "
            "val-brightness-5, val-contrast-5, val-elastic_transform-5, val-pixelate-5, val-jpeg_compression-5: "
            "**not met**") in targets
    assert "tent: clean mAP50 after the stream 0.850, +5.00 points below source: **not met**" in targets
    assert "cotta: clean mAP50 after the stream 0.895, +0.50 points below source: **met**" in targets
    continual_report.write_continual_report(res, tmp_path)
    assert (tmp_path / "benchmarks-continual.md").read_text().splitlines()[2] == line
    assert (tmp_path / "benchmarks-continual.png").stat().st_size > 1000
    quick = _results({"source": 0.2, "bn": 0.3, "tent": 0.35}, {"source": 0.9, "bn": 0.9, "tent": 0.9},
                     {"source": 1.0, "bn": 1.0, "tent": 1.0})
    lines = report.headline_lines(report.Results(quick), res)
    assert lines[2] == line
    assert lines[3] == ("Over BN: online, severity 5, 2 updates per corruption, points over BatchNorm statistics: "
                        "tent +5.0")
    page = (tmp_path / "benchmarks-continual.md").read_text().splitlines()
    assert "Budget: 1 update per corruption (10 images, batch 32), one stream, never reset." in page


def test_continual_targets_read_the_per_segment_intervals_when_the_results_have_them():
    from yolozu.demo.bench import continual_report

    flat = [0.5] * 15
    res = _continual({"source": flat + [0.9], "bn": flat + [0.89], "cotta": [0.49] * 15 + [0.895]})
    within = {"low": -0.03, "high": 0.01}  # 1 point below, inside its interval
    res["gains"] = {"cotta": {"value": -0.01, "low": -0.012, "high": -0.008,
                              "splits": {str(i): dict(within) for i in range(15)}}}
    targets = "\n".join(continual_report.target_lines(report.Results(res)))
    assert "cotta -1.00 [-1.20, -0.80]: **not met**" in targets
    assert "cotta not below BatchNorm statistics by more than its interval on any of the last 5 corruptions: **met**" \
        in targets
    res["gains"]["cotta"]["splits"]["12"] = {"low": -0.03, "high": -0.001}  # elastic_transform: below it
    targets = "\n".join(continual_report.target_lines(report.Results(res)))
    assert "last 5 corruptions: below on val-elastic_transform-5: **not met**" in targets


def test_continual_stream_scores_each_segment_of_one_run(tmp_path):
    from yolozu.demo.bench import continual

    write_split(tmp_path, "val", 4, seed=5, spec=SynthSpec(image_size=160))
    write_corrupted_split(tmp_path, "fog", 5, seed=0)
    splits = ["val-fog-5", "val"]
    stream = continual.run(str(tmp_path), ["source", "bn", "tent"], 4, stream_splits=splits, progress=False)
    reset = shift.run(str(tmp_path), splits, ["source", "bn", "tent"], images=4, memory_images=2, progress=False)
    got = {(r["split"], r["method"]): r["map50"] for r in stream["rows"]}
    want = {(r["split"], r["method"]): r["map50"] for r in reset["rows"]}
    assert set(got) == set(want)
    assert all(got[(s, "source")] == want[(s, "source")] for s in splits)  # no state: the segments score alike
    assert stream["splits"] == splits and all(r["images"] == 4 for r in stream["rows"])
    # the gains over BatchNorm statistics with their intervals, for the corrupted segment (index 0) only
    tent = stream["gains"]["tent"]
    assert set(tent["splits"]) == {"0"} and tent["low"] <= tent["value"] <= tent["high"]
    assert tent["value"] == pytest.approx(got[("val-fog-5", "tent")] - got[("val-fog-5", "bn")], abs=1e-9)
