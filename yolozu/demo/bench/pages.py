"""The text every benchmark page shares: where a report goes, how it is written, its provenance line, the
recipes an adapter could not run, and what each protocol is."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from yolozu.demo.bench.recipes import RECIPES


def write_text_atomic(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same folder, so a reader never sees half a
    report."""
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as f:
        f.write(text)
    os.chmod(f.name, 0o644)
    os.replace(f.name, path)
    return path


def model_name(results: dict) -> str:
    """The model a results file measured: the committed detector, or the adapter spec and its checkpoint."""
    model = results.get("model") or {"adapter": "detector"}
    if model == {"adapter": "detector"}:
        return "the committed detector"
    flags = ", ".join(f"{k} {v}" for k, v in model.items() if k != "adapter")
    return f"adapter `{model['adapter']}`" + (f" ({flags})" if flags else "")


def stream_settings_line(results: dict) -> str:
    """What a stream protocol's results ran with that differs from each method's online recipe (the settings
    tuned for long streams, ``recipes.STREAM_SETTINGS``), as the page states it."""
    changed = []
    for name, meta in results["recipes"].items():
        online = RECIPES[name].ttt if name in RECIPES else None
        if meta.get("ttt") and online:
            diff = [f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in meta["ttt"].items()
                    if online.get(k) != v]
            changed += [f"{name} {', '.join(diff)}"] if diff else []
    if not changed:
        return "Every method runs its online recipe along the stream."
    return ("Every method runs its online recipe along the stream, with the settings tuned for long streams on a "
            f"held-out stream (`python tools/tune_continual.py`): {'; '.join(changed)}.")


def provenance(results: dict, continual: dict | None = None) -> str:
    """When, how and where the results were measured (and, with the continual stream's results, make bench's
    total)."""
    m = results["machine"]
    line = (
        f"Measured on {results['date']} by `{results['command']}` on {m['processor']} ({m['platform']}), "
        f"{m['torch_threads']} torch threads, device {m['device']}, torch {m['torch']}; "
        f"{results['images_per_split']} images per split, {len(results['recipes'])} recipes, {model_name(results)}, "
        f"the same images and seeds for every method; {results['seconds'] / 60:.1f} minutes in all."
    )
    if continual:
        total = (continual["seconds"] + results["seconds"]) / 60
        line += (f" `make bench` is the continual stream ({continual['images_per_split']} images per segment, "
                 f"{continual['seconds'] / 60:.1f} minutes) and then this scope: {total:.1f} minutes of benchmark.")
    return line


PROTOCOLS = [
    "## Protocols", "",
    "Each a scope of the same benchmark, with the same images and seeds for every method: **reset per corruption** "
    "(this page: each split from the source weights; `make bench` at severity 5, `make bench-full` at every "
    "severity), **episodic** (the `, episodic` recipes: every image from the source weights), **continual** (the "
    "15 corruptions at severity 5 as one stream, never reset: [benchmarks-continual.md](benchmarks-continual.md), "
    "`make bench-continual`) and **gradual** (severities 1-5-1 per corruption as one stream: "
    "[benchmarks-gradual.md](benchmarks-gradual.md), `make bench-gradual`). `make bench` runs the quick scope "
    "(the online recipes; BatchNorm statistics and Tent, episodic; BatchNorm statistics per image alone) and the "
    "continual stream; `make bench-full` every protocol and every recipe.", "",
]


def skipped_lines(results: dict) -> list[str]:
    """One line per recipe the adapter could not run, with the reason."""
    skipped = results.get("skipped") or {}
    if not skipped:
        return []
    return ["## Not run", "", *(f"- {name}: {reason}" for name, reason in skipped.items()), ""]


def report_paths(docs: Path, scope: str) -> tuple[Path, str]:
    """Where the report goes: ``docs`` itself when it names a ``.md`` file, else ``docs/benchmarks[-scope].md``;
    and the stem of its plots (beside it)."""
    if docs.suffix == ".md":
        return docs, docs.stem
    return docs / ("benchmarks.md" if scope == "quick" else f"benchmarks-{scope}.md"), (
        "benchmarks" if scope == "quick" else f"benchmarks-{scope}")
