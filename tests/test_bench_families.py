"""The two-families section of a quick report: figures computed from both results files, methods one family
could not run marked as such, nothing for the built-in detector's own report."""

import json

from yolozu.demo.bench.families import family_rows, family_section


def _results(adapter: str, scores: dict[str, tuple[float, float, float]]) -> dict:
    """Results with clean val and two severity-5 splits per method: ``scores[method] = (val, split a, split b)``."""
    rows = [
        {"split": split, "method": method, "map50": value}
        for method, values in scores.items()
        for split, value in zip(("val", "val-fog-5", "val-snow-5"), values)
    ]
    return {"model": {"adapter": adapter, "checkpoint": f"{adapter}.pt"}, "recipes": {m: {} for m in scores},
            "rows": rows, "splits": ["val", "val-fog-5", "val-snow-5"], "images_per_split": 8, "date": "2026-01-01"}


def test_rows_give_each_familys_figures_and_points_over_batchnorm_statistics():
    reference = _results("detector", {"source": (0.9, 0.2, 0.4), "bn": (0.9, 0.4, 0.6), "tent": (0.9, 0.42, 0.6),
                                      "mim": (0.9, 0.4, 0.58)})
    other = _results("pkg.mod:factory", {"source": (0.8, 0.1, 0.3), "bn": (0.8, 0.5, 0.5), "tent": (0.8, 0.5, 0.49)})
    rows = {what: (a, b) for what, a, b in family_rows(other, reference)}
    assert rows["source, mean mAP50 at severity 5"] == ("0.300", "0.200")
    assert rows["BatchNorm statistics over source, points"] == ("+20.0", "+30.0")
    assert rows["tent over BatchNorm statistics, points"] == ("+1.0", "-0.5")
    assert rows["mim over BatchNorm statistics, points"] == ("-1.0", "not run")
    assert "cotta over BatchNorm statistics, points" not in rows
    section = family_section(other, reference)
    assert section[0] == "## Two families side by side" and "| | built-in detector | pkg.mod:factory.pt |" in section


def test_no_section_without_a_reference_or_for_the_built_in_detector():
    reference = _results("detector", {"source": (0.9, 0.2, 0.4), "bn": (0.9, 0.4, 0.6)})
    assert family_section(reference, reference) == []
    assert family_section(_results("pkg.mod:factory", {"source": (0.8, 0.1, 0.3)}), None) == []


def test_regenerating_another_familys_report_writes_its_own_page_with_the_comparison(tmp_path, monkeypatch):
    """``python -m yolozu.demo.bench.report runs/bench/quick-<tag>.json`` rewrites that family's page (never the
    built-in detector's docs/benchmarks.md) and sets it against the built-in detector's quick.json beside it."""
    from test_bench import _results as full_results

    from yolozu.demo.bench import report

    monkeypatch.chdir(tmp_path)
    runs = tmp_path / "runs" / "bench"
    runs.mkdir(parents=True)
    built_in = full_results({"source": 0.2, "bn": 0.3, "tent": 0.32}, {m: 0.9 for m in ("source", "bn", "tent")},
                            {m: 1.0 for m in ("source", "bn", "tent")})
    other = {**full_results({"source": 0.1, "bn": 0.25, "tent": 0.25}, {m: 0.8 for m in ("source", "bn", "tent")},
                            {m: 1.0 for m in ("source", "bn", "tent")}), "model": {"adapter": "pkg.small_det:adapter"}}
    (runs / "quick.json").write_text(json.dumps(built_in))
    (runs / "quick-small_det.json").write_text(json.dumps(other))
    assert report.main([str(runs / "quick-small_det.json")]) == 0
    assert not (tmp_path / "docs" / "benchmarks.md").exists()
    page = (tmp_path / "docs" / "benchmarks-small_det.md").read_text()
    assert "## Two families side by side" in page
    assert "| tent over BatchNorm statistics, points | +2.0 | +0.0 |" in page
