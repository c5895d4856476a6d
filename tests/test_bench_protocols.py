"""The gradual protocol (severities 1-5-1 per corruption, one stream) and the data-seed spread of the quick
scope: the streams, the computed report lines, the companion results the quick report reads."""

import json

from test_bench import _results

from yolozu.demo.bench import continual, gradual, pages, recipes, report, seeds, shift
from yolozu.demo.corruptions import CORRUPTIONS
from yolozu.demo.data import write_corrupted_split
from yolozu.demo.synth import SynthSpec, write_split


def test_the_gradual_stream_goes_up_and_down_each_corruption_in_order():
    assert len(gradual.STREAM) == 15 * 9 + 1 and gradual.STREAM[-1] == "val"
    assert gradual.STREAM[:9] == [f"val-gaussian_noise-{s}" for s in (1, 2, 3, 4, 5, 4, 3, 2, 1)]
    assert gradual.STREAM[-10] == "val-jpeg_compression-1" and gradual.STREAM[9] == "val-shot_noise-1"


def _gradual(values: dict) -> dict:
    """Gradual results whose segment i (stream order, clean val last) scores ``values[method](i, split)``."""
    rows = [{"split": split, "segment": i, "method": m, "map50": f(i, split), "map": 0.0, "images": 4,
             "seconds": 1.0} for m, f in values.items() for i, split in enumerate(gradual.STREAM)]
    return {"recipes": {m: {"label": m} for m in values}, "splits": gradual.STREAM, "rows": rows,
            "images_per_split": 4, "budget": {"images": 4, "batch": 32, "updates": 1},
            "seconds": 60.0, "date": "2026-11-26", "command": "test", "scope": "gradual",
            "machine": {"platform": "p", "processor": "x", "torch_threads": 2, "device": "cpu", "torch": "t"}}


def _severity(split: str) -> int:
    return 0 if split == "val" else int(split.rsplit("-", 1)[1])


def test_gradual_report_lines_are_computed_from_the_rows(tmp_path):
    late = list(CORRUPTIONS[-5:])
    res = _gradual({
        "source": lambda i, s: 0.9 if s == "val" else 0.5 - 0.05 * _severity(s),
        "bn": lambda i, s: 0.9 if s == "val" else 0.6 - 0.05 * _severity(s),
        "tent": lambda i, s: 0.88 if s == "val" else 0.63 - 0.05 * _severity(s),
        "cotta": lambda i, s: 0.7 if s == "val" else (0.3 if any(c in s for c in late) else 0.7),
    })
    stream = gradual.Stream(res)
    bn = 0.6 - 0.05 * (2 * (1 + 2 + 3 + 4) + 5) / 9
    assert abs(stream.mean("bn") - bn) < 1e-9
    assert stream.mean("tent", lambda name, sev: sev == 5) == 0.63 - 0.25
    cotta = stream.mean("cotta")
    assert gradual.gradual_line(res) == (
        f"Gradual: best method cotta, mean mAP50 over 135 segments (15 corruptions at severities 1-5-1, one stream): "
        f"BatchNorm statistics {bn:.3f} -> {cotta:.3f} ({100 * (cotta - bn):+.1f} points)")
    targets = "\n".join(gradual.target_lines(stream))
    assert "tent no lower than BatchNorm statistics on each of the last 5 corruptions (mean over their severities): " \
           "**met**" in targets
    assert f"cotta no lower than BatchNorm statistics on each of the last 5 corruptions (mean over their " \
           f"severities): below on {', '.join(late)}: **not met**" in targets
    assert "tent: clean mAP50 after the stream 0.880, +2.00 points below source: **not met**" in targets
    path, plot = gradual.write_gradual_report(res, tmp_path)
    text = path.read_text()
    assert path.name == "benchmarks-gradual.md" and text.splitlines()[2] == gradual.gradual_line(res)
    assert text.splitlines()[4] == "Budget: 1 update per segment (4 images, batch 32), one stream, never reset."
    assert "| severity 5 | 0.250 | 0.350 | 0.380 | 0.567 |" in text and plot.stat().st_size > 1000


def test_the_gradual_stream_scores_a_split_that_comes_back_as_its_own_segment(tmp_path):
    write_split(tmp_path, "val", 4, seed=5, spec=SynthSpec(image_size=160))
    for severity in (1, 2):
        write_corrupted_split(tmp_path, "fog", severity, seed=0)
    splits = ["val-fog-1", "val-fog-2", "val-fog-1", "val"]
    got = continual.run(str(tmp_path), ["source", "bn"], 4, stream_splits=splits, progress=False, scope="gradual")
    rows = [r for r in got["rows"] if r["method"] == "source"]
    assert [r["split"] for r in rows] == splits and [r["segment"] for r in rows] == [0, 1, 2, 3]
    assert rows[0]["map50"] == rows[2]["map50"]  # no state: the same images score alike
    assert got["scope"] == "gradual" and got["skipped"] == {}


def _quick(seed: int, shift_by: float) -> dict:
    sev5 = {"source": 0.2, "bn": 0.3, "tent": 0.31 + shift_by, "mim": 0.3}
    res = _results(sev5, {m: 0.9 for m in sev5}, {m: 1.0 for m in sev5})
    res.update(data_seed=seed, model={"adapter": "detector"})
    return res


def test_the_seed_spread_is_computed_from_both_seeds_results():
    lines = seeds.seed_lines(_quick(0, 0.0), [_quick(1, 0.02)])
    assert lines[0] == ("Seeds: between data seeds 0 and 1 (10 images per split) the mean mAP50 at severity 5 moves "
                        "by at most 2.0 points (tent), the online methods' points over BatchNorm statistics by at most "
                        "2.00 (tent; any recipe: 2.00, tent); best method tent on seed 0, tent on seed 1.")
    assert "| tent | 0.309 | 0.329 | +2.0 | +1.00 | +3.00 | +2.00 |" in lines
    other = _quick(1, 0.0) | {"images_per_split": 20}
    assert seeds.seed_lines(_quick(0, 0.0), [other])[0] == "Data seed 1: not compared (its images per split differ)."


def test_the_continual_seed_spread_reads_the_stream_and_its_last_segments():
    mine, theirs = _quick(0, 0.0), _quick(1, 0.0)
    mine["scope"] = theirs["scope"] = "continual"
    for row in theirs["rows"]:  # tent 3 points better on seed 1's last segment only
        if row["method"] == "tent" and row["split"] == f"val-{CORRUPTIONS[-1]}-5":
            row["map50"] += 0.03
    lines = seeds.continual_seed_lines(mine, [theirs])
    assert lines[0] == (f"Continual: between data seeds 0 and 1 (10 images per segment) a method's points over "
                        f"BatchNorm statistics along the stream move by at most 0.20 (tent); on a single segment of "
                        f"the last 5, by up to 3.00 (tent, val-{CORRUPTIONS[-1]}-5).")
    assert seeds.continual_seed_lines(None, [theirs]) == []
    other = theirs | {"images_per_split": 20}
    assert seeds.continual_seed_lines(mine, [other])[0] == "Continual, data seed 1: not compared (its images per " \
        "split differ)."


def test_the_quick_report_reads_the_protocols_and_other_seeds_beside_its_results(tmp_path):
    results = _quick(0, 0.0)
    out = tmp_path / "quick.json"
    (tmp_path / "quick-seed1.json").write_text(json.dumps(_quick(1, 0.02)))
    (tmp_path / "continual.json").write_text(json.dumps({"model": {"adapter": "other:factory"}}))
    found = shift.companions(out, results)
    assert set(found) == {"seeds", "continual_seeds"} and found["seeds"][0]["data_seed"] == 1
    assert shift.companions(out, _quick(1, 0.0)) == {}  # only the seed-0 report compares
    text = report.write_report(results, tmp_path / "docs", "quick", found)[0].read_text()
    assert "## Data seeds" in text and "moves by at most 2.0 points (tent)" in text


def test_the_protocols_command_lines_write_results_and_reports(tmp_path, monkeypatch):
    write_split(tmp_path, "val", 4, seed=5, spec=SynthSpec(image_size=160))
    write_corrupted_split(tmp_path, "fog", 5, seed=0)
    monkeypatch.setattr(continual, "STREAM", ["val-fog-5", "val"])
    monkeypatch.setattr(gradual, "STREAM", ["val-fog-5", "val-fog-5", "val"])
    for module, name in ((continual, "continual"), (gradual, "gradual")):
        argv = ["--dataset", str(tmp_path), "--images", "4", "--recipes", "source", "bn", "--output",
                str(tmp_path / f"{name}.json"), "--docs", str(tmp_path / "docs")]
        assert module.main(argv) == 0
        results = json.loads((tmp_path / f"{name}.json").read_text())
        assert results["scope"] == name and results["data_seed"] == 0 and results["model"] == {"adapter": "detector"}
        assert (tmp_path / "docs" / f"benchmarks-{name}.md").read_text().startswith(f"# Shift benchmark ({name})")


def test_stream_protocols_run_each_method_with_its_long_stream_settings_and_the_page_says_which():
    for name in continual.CONTINUAL:
        online, stream = recipes.RECIPES[name], recipes.stream_recipe(name)
        changes = recipes.STREAM_SETTINGS.get(name, {})
        batch = {"batch_size": recipes.STREAM_BATCH}  # the streams' batch, the page's budget line
        assert stream.ttt == (None if online.ttt is None else {**online.ttt, **batch, **changes})
        assert stream.config().enabled == (online.ttt is not None)
    results = {"recipes": {n: recipes.stream_recipe(n).meta() for n in ("source", "bn", "cotta", "sar")}}
    line = pages.stream_settings_line(results)
    sar = recipes.STREAM_SETTINGS["sar"]
    assert line.endswith(f"; sar source_pull {sar['source_pull']:g}.")
    assert "--repeat 4" in line and "bn" not in line.split(":", 1)[1]
    # a stream setting the online recipe does not name shows too, a None (no skip stop) included
    online_eata = recipes.RECIPES["eata"].meta()
    stopless = {**online_eata, "ttt": {**online_eata["ttt"], "lr": 3e-3, "eata_max_skip_streak": None}}
    line = pages.stream_settings_line({"recipes": {"bn": recipes.RECIPES["bn"].meta(), "eata": stopless}})
    assert line.endswith(": eata lr 0.003, eata_max_skip_streak None.")
    online = {"recipes": {n: recipes.RECIPES[n].meta() for n in ("source", "bn", "tent")}}
    assert pages.stream_settings_line(online) == "Every method runs its online recipe along the stream."
