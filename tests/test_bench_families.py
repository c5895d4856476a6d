"""The two-families section of a quick report: figures computed from both results files, methods one family
could not run marked as such, nothing for the built-in detector's own report."""

from yolozu.demo.bench.families import family_rows, family_section


def _results(adapter: str, scores: dict[str, tuple[float, float, float]]) -> dict:
    """Results with clean val and two severity-5 splits per method: ``scores[method] = (val, split a, split b)``."""
    rows = [
        {"split": split, "method": method, "map50": value}
        for method, values in scores.items()
        for split, value in zip(("val", "val-fog-5", "val-snow-5"), values)
    ]
    return {"model": {"adapter": adapter, "checkpoint": f"{adapter}.pt"}, "recipes": {m: {} for m in scores},
            "rows": rows, "images_per_split": 8, "date": "2026-01-01"}


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
