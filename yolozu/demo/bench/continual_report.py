"""docs/benchmarks-continual.md and its plot from the continual protocol's results (``yolozu.demo.bench.continual``).

Every line is computed from the measured rows: the ``Continual:`` line (also written into docs/benchmarks.md by
the quick report), the targets met or not, mAP50 per corruption along the stream.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from yolozu.demo.bench.budget import budget_line, recorded_budget
from yolozu.demo.bench.pages import model_name, report_paths, skipped_lines, stream_settings_line, write_text_atomic
from yolozu.demo.bench.results import Results, table

TARGETS = {
    "gain": 2.0,  # points of mean mAP50 over BatchNorm statistics, best method
    "last": 5,  # corruptions at the end of the stream where no method may fall below BatchNorm statistics by more
    # than its interval
    "clean_drop": 1.0,  # points of clean mAP50 below source after the stream, at most
}


def corruptions(res: Results) -> list[str]:
    """The stream's corrupted segments, in order (clean val, at the end, aside)."""
    return [s for s in res.splits if s != "val"]


def mean(res: Results, method: str) -> float:
    return statistics.fmean(res.score(method, s) for s in corruptions(res))


def best_method(res: Results) -> str:
    return max([m for m in res.methods if m not in ("source", "bn")] or ["bn"], key=lambda m: mean(res, m))


def continual_line(results: dict) -> str:
    """``Continual: best method NAME, mean mAP50 over N corruptions at severity 5 in sequence: BatchNorm
    statistics X -> Y (+Z points)``."""
    res = Results(results)
    best = best_method(res)
    bn, value = mean(res, "bn"), mean(res, best)
    return (
        f"Continual: best method {best}, mean mAP50 over {len(corruptions(res))} corruptions at severity 5 in "
        f"sequence: BatchNorm statistics {bn:.3f} -> {value:.3f} ({100 * (value - bn):+.1f} points)"
    )


def _interval(gain: dict | None) -> str:
    """`` [low, high]`` in points, or nothing for results without intervals."""
    return f" [{100 * gain['low']:+.2f}, {100 * gain['high']:+.2f}]" if gain else ""


def below_bn(res: Results, method: str, segment: int) -> bool:
    """Whether ``method`` is below BatchNorm statistics on the stream's segment ``segment`` by more than its
    interval: the paired bootstrap interval of its gain lies below 0 (results without intervals: any shortfall)."""
    gain = res.raw.get("gains", {}).get(method, {}).get("splits", {}).get(str(segment))
    split = res.splits[segment]
    return gain["high"] < 0 if gain else res.score(method, split) < res.score("bn", split)


def target_lines(res: Results) -> list[str]:
    """Each target with its measured value, met or not."""
    best = best_method(res)
    gain = 100 * (mean(res, best) - mean(res, "bn"))
    interval = _interval(res.raw.get("gains", {}).get(best))
    out = [f"- The best method gains at least {TARGETS['gain']:.0f} points over BatchNorm statistics along the "
           f"stream: {best} {gain:+.2f}{interval}: **{'met' if gain >= TARGETS['gain'] else 'not met'}**."]
    last = [i for i, s in enumerate(res.splits) if s != "val"][-TARGETS["last"]:]
    for method in res.methods:
        if method in ("source", "bn"):
            continue
        below = [res.splits[i] for i in last if below_bn(res, method, i)]
        out.append(f"- {method} not below BatchNorm statistics by more than its interval on any of the last "
                   f"{len(last)} corruptions: "
                   + (f"below on {', '.join(below)}: **not met**." if below else "**met**."))
    for method in res.methods:
        drop = res.clean_drop(method)
        out.append(f"- {method}: clean mAP50 after the stream {res.score(method, 'val'):.3f}, {drop:+.2f} points "
                   f"below source: **{'met' if drop <= TARGETS['clean_drop'] else 'not met'}**.")
    return out


def plot_stream(res: Results, path: Path) -> Path:
    """mAP50 along the stream, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4))
    names = [s.removeprefix("val-").removesuffix("-5") if s != "val" else "clean" for s in res.splits]
    for method in res.methods:
        ax.plot(range(len(names)), [res.score(method, s) for s in res.splits], marker="o", label=method)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_ylabel("mAP50")
    ax.set_title("Continual stream (severity 5, no reset), then clean val")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_continual_report(results: dict, docs: Path) -> list[Path]:
    """Write the continual report (``docs``: a folder, or the report's .md path) and its plot; returns the
    paths written."""
    res = Results(results)
    path, stem = report_paths(docs, "continual")
    path.parent.mkdir(parents=True, exist_ok=True)
    plot = plot_stream(res, path.parent / f"{stem}.png")
    m = results["machine"]
    header = ["segment", *res.methods]
    rows = [[s, *(f"{res.score(method, s):.3f}" for method in res.methods)] for s in res.splits]
    rows.append(["mean of the corruptions", *(f"{mean(res, method):.3f}" for method in res.methods)])
    lines = [
        "# Shift benchmark (continual)",
        "",
        continual_line(results),
        "",
        budget_line(recorded_budget(results)) + ", one stream, never reset.",
        "",
        f"The 15 corruptions at severity 5 in the standard order as one stream, never reset, then clean val; "
        f"{results['images_per_split']} images per segment. Measured on {results['date']} by "
        f"`{results['command']}` on {m['processor']}, {m['torch_threads']} torch threads, device {m['device']}, "
        f"torch {m['torch']}; {model_name(results)}; {results['seconds'] / 60:.1f} minutes in all. Episodic recipes "
        "restart at every image, so the stream changes nothing for them: their figures are in "
        "[benchmarks.md](benchmarks.md).",
        "",
        stream_settings_line(results),
        "",
        "## Targets",
        "",
        *target_lines(res),
        "",
        *skipped_lines(results),
        "## mAP50 along the stream",
        "",
        f"![mAP50 along the stream]({plot.name})",
        "",
        *table(header, rows),
        "",
    ]
    write_text_atomic(path, "\n".join(lines))
    return [path, plot]
