"""docs/benchmarks.md and its plots from a shift-benchmark results JSON (``yolozu.demo.bench.shift``).

The headline and baseline lines are computed here from the measured rows, never written by hand.
"""

from __future__ import annotations

from pathlib import Path

from yolozu.demo.bench.budget import budget_line, recorded_budget
from yolozu.demo.bench.continual_report import continual_line
from yolozu.demo.bench.families import family_section
from yolozu.demo.bench.gradual import gradual_line
from yolozu.demo.bench.pages import (
    PROTOCOLS,
    companions,
    default_docs,
    provenance,
    report_paths,
    skipped_lines,
    write_text_atomic,
)
from yolozu.demo.bench.recipes import GRADIENT_METHODS
from yolozu.demo.bench.results import Results, table
from yolozu.demo.bench.seeds import seed_section

TARGETS = {
    "gain": 10.0,  # points of mean mAP50 over source at severity 5, best method
    "clean_drop": 1.0,  # points of clean mAP50 lost at most
    "tent_speed": 0.4,  # online Tent images/s relative to the no-TTT export
    "over_bn": 2.0,  # points of mean mAP50 over BatchNorm statistics, best online gradient method
}


def headline_lines(res: Results, continual: dict | None = None, gradual: dict | None = None) -> list[str]:
    """The benchmark's summary lines at severity 5: the best method, the BatchNorm statistics baseline, the
    continual and gradual streams' best methods (from their results, when given) and every online gradient
    method over BN."""

    source = res.mean("source", 5)
    candidates = [m for m in res.methods if not m.startswith(("source", "bn"))] or ["bn"]
    best = max(candidates, key=lambda m: res.mean(m, 5))
    n = len(res.severity_splits(5))

    def line(prefix: str, name: str, method: str) -> str:
        value = res.mean(method, 5)
        return (
            f"{prefix}: {name}, mean mAP50 over {n} corruptions at severity 5: source {source:.3f} -> "
            f"{value:.3f} ({100 * (value - source):+.1f} points)"
        )

    return [
        line("Headline: best method", res.raw["recipes"][best]["label"], best),
        line("Baseline", "BatchNorm statistics only", "bn"),
        *([continual_line(continual)] if continual else []),
        *([gradual_line(gradual)] if gradual else []),
        *over_bn_lines(res),
    ]


def over_bn_lines(res: Results) -> list[str]:
    """``Over BN: online, severity 5, N updates per corruption, points over BatchNorm statistics: tent +a.a, ...``:
    each online gradient method's mean gain at severity 5 (none when no such method ran)."""
    bn = res.mean("bn", 5)
    online = [m for m in GRADIENT_METHODS if m in res.methods]
    if not online:
        return []
    over = ", ".join(f"{m} {100 * (res.mean(m, 5) - bn):+.1f}" for m in online)
    n = recorded_budget(res.raw)["updates"]
    return [f"Over BN: online, severity 5, {n} updates per corruption, points over BatchNorm statistics: {over}"]


def _interval(gain: dict) -> str:
    """``+a.a [+l.l, +h.h]`` in points."""
    return f"{100 * gain['value']:+.1f} [{100 * gain['low']:+.1f}, {100 * gain['high']:+.1f}]"


def gain_section(res: Results) -> list[str]:
    """Each method's gain over BatchNorm statistics of the same batches at severity 5, with its paired bootstrap
    interval over images: for the mean over corruptions and per corruption (none without recorded gains)."""
    gains = res.raw.get("gains") or {}
    if not gains:
        return []
    first = next(iter(gains.values()))
    splits = list(first["splits"])
    names = [s.split("-", 1)[1].rsplit("-", 1)[0] for s in splits]
    header = ["method", f"mean over {len(splits)} corruptions", *names]
    rows = [[res.raw["recipes"][m]["label"], f"**{_interval(g)}**", *(_interval(g["splits"][s]) for s in splits)]
            for m, g in gains.items()]
    return [
        "## Gains over BatchNorm statistics, with 95% intervals",
        "",
        f"Points of mAP50 over BatchNorm statistics of the same batches, severity 5, and the paired bootstrap "
        f"{100 * first['level']:.0f}% interval over images ({first['draws']} resamples of each corruption's images, "
        "the same images for both; `yolozu.demo.bench.bootstrap`; the mean's interval resamples every corruption "
        "independently). An interval that holds 0 is no evidence of a gain.",
        "",
        *table(header, rows),
        "",
    ]


def target_lines(res: Results) -> list[str]:
    """Each target of the benchmark with its measured value and whether it is met."""
    out = []
    source5, bn5 = res.mean("source", 5), res.mean("bn", 5)
    best = max((m for m in res.methods if m != "source"), key=lambda m: res.mean(m, 5))
    gain = 100 * (res.mean(best, 5) - source5)
    out.append(
        f"- Best method gains at least {TARGETS['gain']:.0f} points of mean mAP50 at severity 5 over source: "
        f"{best} {gain:+.1f} points: **{'met' if gain >= TARGETS['gain'] else 'not met'}**."
    )
    batch = recorded_budget(res.raw)["batch"]
    gains = res.raw.get("gains") or {}
    out += best_gain_lines(res)
    for method in res.methods:
        base, _, variant = method.partition("-")
        if base not in GRADIENT_METHODS:
            continue
        delta = 100 * (res.mean(method, 5) - bn5)
        interval = f" (95% interval {_interval(gains[method]).split(' ', 1)[1]})" if method in gains else ""
        line = (
            f"- {res.raw['recipes'][method]['label']} beats BatchNorm statistics alone (batches of {batch}): "
            f"{delta:+.2f} points{interval}: **{'met' if delta > 0 else 'not met'}**"
        )
        episodic = (res.raw["recipes"][method].get("ttt") or {}).get("reset") == "sample"
        if variant and episodic and "bn-sample" in res.methods:
            own = 100 * (res.mean(method, 5) - res.mean("bn-sample", 5))
            line += f"; against per-image BatchNorm statistics, its own normalisation: {own:+.2f} points"
        out.append(line + ".")
    for method in res.methods:
        drop = res.clean_drop(method)
        if drop > TARGETS["clean_drop"]:
            out.append(
                f"- Clean mAP50 drops by at most {TARGETS['clean_drop']:.0f} point: {method} drops {drop:.1f}: "
                f"**not met**."
            )
    worst = max(res.clean_drop(m) for m in res.methods)
    if worst <= TARGETS["clean_drop"]:
        out.append(
            f"- Clean mAP50 drops by at most {TARGETS['clean_drop']:.0f} point for every method (largest drop "
            f"{worst:.1f}): **met**."
        )
    out += episodic_lines(res)
    if "tent" in res.methods:
        ratio = res.speed_ratio("tent")
        out.append(
            f"- Online Tent export runs at least {TARGETS['tent_speed']}x the images/s of the no-TTT export: "
            f"{ratio:.2f}x: **{'met' if ratio >= TARGETS['tent_speed'] else 'not met'}**."
        )
    return out


def best_gain_lines(res: Results) -> list[str]:
    """The budget protocol's target: the best online gradient method gains at least ``TARGETS['over_bn']`` points
    over BatchNorm statistics at severity 5, the lower bound of its interval above 0 (none without intervals)."""
    gains = {m: g for m, g in (res.raw.get("gains") or {}).items() if m in GRADIENT_METHODS}
    if not gains:
        return []
    best = max(gains, key=lambda m: gains[m]["value"])
    g = gains[best]
    met = 100 * g["value"] >= TARGETS["over_bn"] and g["low"] > 0
    return [
        f"- The best online gradient method gains at least {TARGETS['over_bn']:.1f} points of mean mAP50 over "
        f"BatchNorm statistics of the same batches, its 95% interval's lower bound above 0: {best} {_interval(g)}: "
        f"**{'met' if met else 'not met'}**."
    ]


def episodic_lines(res: Results) -> list[str]:
    """The per-image normalisation's target for each episodic recipe (``-sample``): clean mAP50 within a point of
    source, and the severity-5 mean no lower than with per-image statistics alone (``<method>-image`` when run,
    else ``bn-image``)."""
    if "bn-image" not in res.methods:
        return []
    out = []
    for method in (m for m in res.methods if m.endswith("-sample")):
        alone = method.replace("-sample", "-image")
        alone = alone if alone in res.methods else "bn-image"
        drop = res.clean_drop(method)
        delta = 100 * (res.mean(method, 5) - res.mean(alone, 5))
        met = drop <= TARGETS["clean_drop"] and delta >= 0
        out.append(
            f"- {res.raw['recipes'][method]['label']} keeps clean mAP50 within {TARGETS['clean_drop']:.0f} point of "
            f"source, its severity-5 mean no lower than {res.raw['recipes'][alone]['label']}: clean drop {drop:.1f}, "
            f"severity 5 {delta:+.2f} points: **{'met' if met else 'not met'}**."
        )
    return out


def summarytable(res: Results) -> list[str]:
    header = ["method", "mean mAP50 sev 5", "mean mAP sev 5", "vs source", "vs BN stats", "clean mAP50",
              "clean vs source", "images/s", "speed vs no-TTT", "peak MB"]
    rows = []
    clean = res.score("source", "val")
    for m in res.methods:
        rows.append(
            [
                res.raw["recipes"][m]["label"],
                f"{res.mean(m, 5):.3f}",
                f"{res.mean(m, 5, 'map'):.3f}",
                f"{100 * (res.mean(m, 5) - res.mean('source', 5)):+.1f}",
                f"{100 * (res.mean(m, 5) - res.mean('bn', 5)):+.2f}",
                f"{res.score(m, 'val'):.3f}",
                f"{100 * (res.score(m, 'val') - clean):+.1f}",
                f"{res.images_per_second(m):.0f}",
                f"{res.speed_ratio(m):.2f}x",
                f"{res.raw['peak_memory_bytes'][m] / 1e6:.0f}",
            ]
        )
    return table(header, rows)


def corruptiontable(res: Results, severity: int, metric: str = "map50") -> list[str]:
    header = ["corruption"] + res.methods
    rows = []
    for split in res.severity_splits(severity):
        values = [res.score(m, split, metric) for m in res.methods]
        top = max(values)
        cells = [f"**{v:.3f}**" if v == top else f"{v:.3f}" for v in values]
        rows.append([split.split("-", 1)[1].rsplit("-", 1)[0]] + cells)
    rows.append(["**mean**"] + [f"**{res.mean(m, severity, metric):.3f}**" for m in res.methods])
    return table(header, rows)


def severitytable(res: Results) -> list[str]:
    header = ["method"] + [f"sev {s}" for s in res.severities()]
    rows = [[m] + [f"{res.mean(m, s):.3f}" for s in res.severities()] for m in res.methods]
    return table(header, rows)


def plot_severity5(res: Results, path: Path) -> Path:
    """Bars: mAP50 per corruption at severity 5, one bar per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits = res.severity_splits(5)
    names = [s.split("-", 1)[1].rsplit("-", 1)[0] for s in splits] + ["mean"]
    width = 0.8 / len(res.methods)
    fig, ax = plt.subplots(figsize=(15, 5.5))
    for i, m in enumerate(res.methods):
        values = [res.score(m, s) for s in splits] + [res.mean(m, 5)]
        ax.bar([x + i * width for x in range(len(names))], values, width, label=res.raw["recipes"][m]["label"])
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(names))], names, rotation=35, ha="right")
    ax.set_ylabel("mAP50")
    ax.set_title("mAP50 per corruption at severity 5")
    ax.legend(ncol=5, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.28))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(results: dict, docs: Path, scope: str, companions: dict | None = None) -> list[Path]:
    """Write the markdown report and plots; returns the paths written. ``companions``: other results the quick
    report summarises (``continual``, ``gradual``: those protocols'; ``seeds``: the quick scope on other data
    seeds; ``shift.companions``)."""
    from yolozu.demo.plot_log import plot_log

    res = Results(results)
    companions = companions or {}
    path, stem = report_paths(docs, scope)
    path.parent.mkdir(parents=True, exist_ok=True)
    bars = plot_severity5(res, path.parent / f"{stem}-severity5.png")
    written = [bars]
    log = Path(results.get("loss_curve_log") or "")
    if log.is_file():
        written.append(plot_log(log, path.parent / f"{stem}-tent-loss.png"))
    lines = (
        [f"# Shift benchmark ({scope})", ""]
        + headline_lines(res, companions.get("continual"), companions.get("gradual"))
        + [
            "",
            budget_line(recorded_budget(results)) + ", reset per corruption; BatchNorm statistics on the same "
            "batches; an adapt-first recipe takes as many steps over the split before predicting it.",
            "",
            provenance(results, companions.get("continual")),
            "",
            *PROTOCOLS,
            "## Targets",
            "",
            *target_lines(res),
            "",
            *gain_section(res),
            *skipped_lines(results),
            *seed_section(results, companions.get("seeds") or [], companions.get("continual"),
                          companions.get("continual_seeds")),
            *family_section(results, companions.get("reference")),
            "## Summary",
            "",
            "Images/s is each method's whole export (loading, adaptation, prediction) over all splits; peak memory "
            f"is the largest extra allocation while exporting {results['memory_images']} images of "
            f"{results['memory_split']}.",
            "",
            *summarytable(res),
            "",
            "## mAP50 per corruption at severity 5",
            "",
            f"![mAP50 per corruption at severity 5]({bars.name})",
            "",
            *corruptiontable(res, 5),
            "",
            "## mAP@[.5:.95] per corruption at severity 5",
            "",
            *corruptiontable(res, 5, "map"),
            "",
        ]
    )
    if len(res.severities()) > 1:
        lines += ["## Mean mAP50 per severity", "", *severitytable(res), ""]
        for severity in res.severities()[:-1]:
            lines += [f"## mAP50 per corruption at severity {severity}", "", *corruptiontable(res, severity), ""]
    if len(written) > 1:
        lines += [
            "## A TTT log",
            "",
            f"![Tent loss per step]({written[1].name})",
            "",
            "Drawn by `tools/plot_ttt_log.py` from a `--ttt-log-out` file.",
            "",
        ]
    lines += ["## Methods", ""]
    lines += table(["method", "settings"], ([m, f"`{results['recipes'][m]}`"] for m in res.methods))
    lines += [
        "",
        "How the settings were chosen, and why the gradient methods add little over BatchNorm statistics: "
        "[benchmark notes](benchmark-notes.md).",
        "",
    ]
    write_text_atomic(path, "\n".join(lines))
    return [path, *written]


def main(argv: list[str] | None = None) -> int:
    """Regenerate the report from a results JSON: ``python -m yolozu.demo.bench.report runs/bench/quick.json``."""
    import argparse
    import json

    parser = argparse.ArgumentParser(description="Write docs/benchmarks*.md and plots from a results JSON.")
    parser.add_argument("results")
    parser.add_argument("--docs", help="a folder or a .md file (default: where the benchmark wrote it: docs for "
                        "the built-in detector, docs/benchmarks-<tag>.md for another model)")
    args = parser.parse_args(argv)

    results = json.loads(Path(args.results).read_text())
    results.setdefault("scope", "quick")
    results.setdefault("model", {"adapter": "detector"})
    docs = Path(args.docs) if args.docs else default_docs(results["scope"], results["model"]["adapter"])
    for path in write_report(results, docs, results["scope"], companions(Path(args.results), results)):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
