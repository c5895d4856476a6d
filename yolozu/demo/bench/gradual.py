"""The gradual protocol (the continual TTA literature's gradual setting): for each of the 15 corruptions in the
standard order, severities 1, 2, 3, 4, 5, 4, 3, 2, 1, all one stream that is never reset, then clean val.

The shift comes and goes slowly, so a method that follows it well should gain over BatchNorm statistics without
drifting; the report gives the mean mAP50 over the stream, per severity and per corruption, the no-collapse
check on the last corruptions and clean val at the end. Same recipes, images and seeds as the continual protocol
(``yolozu.demo.bench.continual.run``); results in ``runs/bench/gradual.json``, report docs/benchmarks-gradual.md.

    python -m yolozu.demo.bench.gradual [--images 64]       # part of make bench-full
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path
from typing import Sequence

from yolozu.demo.bench import continual
from yolozu.demo.bench.budget import budget_line, recorded_budget
from yolozu.demo.bench.continual_report import TARGETS
from yolozu.demo.bench.pages import model_name, report_paths, skipped_lines, stream_settings_line, write_text_atomic
from yolozu.demo.bench.results import table
from yolozu.demo.corruptions import CORRUPTIONS
from yolozu.demo.data import corrupted_split_name

SEVERITIES = (1, 2, 3, 4, 5, 4, 3, 2, 1)
"""The severities each corruption passes through, in order."""
STREAM = [corrupted_split_name(c, s) for c in CORRUPTIONS for s in SEVERITIES] + ["val"]
IMAGES = 64
"""Images per segment by default: 135 segments and clean val, 8,704 images per recipe."""


def _parts(split: str) -> tuple[str, int]:
    name, _, severity = split.removeprefix("val-").rpartition("-")
    return name, int(severity)


class Stream:
    """Lookups over gradual results: the rows of each method in stream order, means over chosen segments."""

    def __init__(self, results: dict) -> None:
        self.raw = results
        self.methods = list(results["recipes"])
        self.rows = {m: sorted((r for r in results["rows"] if r["method"] == m), key=lambda r: r["segment"])
                     for m in self.methods}

    def corrupted(self, method: str) -> list[dict]:
        return [r for r in self.rows[method] if r["split"] != "val"]

    def mean(self, method: str, keep=lambda name, severity: True) -> float:
        """Mean mAP50 over the corrupted segments ``keep(corruption, severity)`` selects."""
        return statistics.fmean(r["map50"] for r in self.corrupted(method) if keep(*_parts(r["split"])))

    def clean(self, method: str) -> float:
        return self.rows[method][-1]["map50"]

    def corruptions(self) -> list[str]:
        return list(dict.fromkeys(_parts(r["split"])[0] for r in self.corrupted(self.methods[0])))

    def best(self) -> str:
        return max([m for m in self.methods if m not in ("source", "bn")] or ["bn"], key=self.mean)


def gradual_line(results: dict) -> str:
    """``Gradual: best method NAME, mean mAP50 over N segments (C corruptions at severities 1-5-1, one stream):
    BatchNorm statistics X -> Y (+Z points)``."""
    s = Stream(results)
    best, bn = s.best(), s.mean("bn")
    return (f"Gradual: best method {best}, mean mAP50 over {len(s.corrupted(best))} segments ({len(s.corruptions())} "
            f"corruptions at severities 1-5-1, one stream): BatchNorm statistics {bn:.3f} -> {s.mean(best):.3f} "
            f"({100 * (s.mean(best) - bn):+.1f} points)")


def target_lines(s: Stream) -> list[str]:
    """The continual protocol's targets on the gradual stream, each with its measured value, met or not."""
    best = s.best()
    gain = 100 * (s.mean(best) - s.mean("bn"))
    out = [f"- The best method gains at least {TARGETS['gain']:.0f} points over BatchNorm statistics along the "
           f"stream: {best} {gain:+.2f}: **{'met' if gain >= TARGETS['gain'] else 'not met'}**."]
    last = s.corruptions()[-TARGETS["last"]:]
    for method in s.methods:
        if method in ("source", "bn"):
            continue
        below = [c for c in last if s.mean(method, lambda n, _, c=c: n == c) < s.mean("bn", lambda n, _, c=c: n == c)]
        out.append(f"- {method} no lower than BatchNorm statistics on each of the last {len(last)} corruptions (mean "
                   "over their severities): " + (f"below on {', '.join(below)}: **not met**." if below else "**met**."))
    for method in s.methods:
        drop = 100 * (s.clean("source") - s.clean(method))
        out.append(f"- {method}: clean mAP50 after the stream {s.clean(method):.3f}, {drop:+.2f} points below source: "
                   f"**{'met' if drop <= TARGETS['clean_drop'] else 'not met'}**.")
    return out


def tables(s: Stream) -> list[str]:
    """Mean mAP50 per severity (both ways through it) and per corruption (over its nine segments)."""
    severities = sorted({_parts(r["split"])[1] for r in s.corrupted(s.methods[0])})
    per_severity = [[f"severity {v}", *(f"{s.mean(m, lambda _, x, v=v: x == v):.3f}" for m in s.methods)]
                    for v in severities]
    per_severity.append(["all segments", *(f"{s.mean(m):.3f}" for m in s.methods)])
    per_severity.append(["clean val at the end", *(f"{s.clean(m):.3f}" for m in s.methods)])
    per_corruption = [[c, *(f"{s.mean(m, lambda n, _, c=c: n == c):.3f}" for m in s.methods)] for c in s.corruptions()]
    return ["## Mean mAP50 per severity", "", *table(["segments", *s.methods], per_severity), "",
            "## Mean mAP50 per corruption (its severities 1-5-1)", "",
            *table(["corruption", *s.methods], per_corruption), ""]


def plot_stream(s: Stream, path: Path) -> Path:
    """mAP50 along the stream, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(14, 4))
    for method in s.methods:
        ax.plot([r["map50"] for r in s.corrupted(method)], label=method, linewidth=1)
    ticks = range(0, len(s.corrupted(s.methods[0])), len(SEVERITIES))
    ax.set_xticks(list(ticks), s.corruptions(), rotation=45, ha="right")
    ax.set_ylabel("mAP50")
    ax.set_title("Gradual stream: severities 1-5-1 per corruption, no reset")
    ax.legend(fontsize=8, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_gradual_report(results: dict, docs: Path) -> list[Path]:
    """Write the gradual report (``docs``: a folder, or the report's .md path) and its plot; returns the paths."""
    s = Stream(results)
    path, stem = report_paths(docs, "gradual")
    path.parent.mkdir(parents=True, exist_ok=True)
    plot = plot_stream(s, path.parent / f"{stem}.png")
    m = results["machine"]
    lines = [
        "# Shift benchmark (gradual)", "", gradual_line(results), "",
        budget_line(recorded_budget(results), "segment") + ", one stream, never reset.", "",
        f"Each of the {len(s.corruptions())} corruptions in the standard order at severities "
        f"{', '.join(map(str, SEVERITIES))}, all one stream, never reset, then clean val; "
        f"{results['images_per_split']} images per segment (the same images at every severity). Measured on "
        f"{results['date']} by `{results['command']}` on {m['processor']}, {m['torch_threads']} torch threads, device "
        f"{m['device']}, torch {m['torch']}; {model_name(results)}; {results['seconds'] / 60:.1f} minutes in all.",
        "", stream_settings_line(results), "",
        "## Targets", "", *target_lines(s), "", *skipped_lines(results), *tables(s),
        "## mAP50 along the stream", "", f"![mAP50 along the stream]({plot.name})", "",
    ]
    write_text_atomic(path, "\n".join(lines))
    return [path, plot]


def main(argv: Sequence[str] | None = None) -> int:
    return continual.protocol_main(argv, "gradual", IMAGES, STREAM, write_gradual_report, __doc__)


if __name__ == "__main__":
    sys.exit(main())
