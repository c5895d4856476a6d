"""The text every benchmark page shares: where a report goes, how it is written, its provenance line, the
recipes an adapter could not run, and what each protocol is."""

from __future__ import annotations

import json
import os
import platform
import tempfile
from pathlib import Path

import torch

from yolozu.demo.bench.recipes import RECIPES
from yolozu.demo.bench.runner import family_tag


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
                    if (k not in online or online[k] != v) and k != "batch_size"]  # the batch: the page's budget line
            changed += [f"{name} {', '.join(diff)}"] if diff else []
    if not changed:
        return "Every method runs its online recipe along the stream."
    return ("Every method runs its online recipe along the stream, with the settings tuned for long streams on a "
            "held-out stream as long as the test stream, on two data seeds (`python tools/tune_continual.py --repeat 4 "
            f"--dataset data/demo data/demo-seed2`): "
            f"{'; '.join(changed)}.")


def provenance(results: dict, continual: dict | None = None) -> str:
    """When, how and where the results were measured (and, with the continual stream's results, how long that
    stream took)."""
    m = results["machine"]
    line = (
        f"Measured on {results['date']} by `{results['command']}` on {m['processor']} ({m['platform']}), "
        f"{m['torch_threads']} torch threads, device {m['device']}, torch {m['torch']}; "
        f"{results['images_per_split']} images per split, {len(results['recipes'])} recipes, {model_name(results)}, "
        f"the same images and seeds for every method; {results['seconds'] / 60:.1f} minutes in all."
    )
    if continual:
        line += (f" The continual stream (`make bench-continual`, {continual['images_per_split']} images per "
                 f"segment) took {continual['seconds'] / 60:.1f} minutes.")
    return line


PROTOCOLS = [
    "## Protocols", "",
    "Each a scope of the same benchmark, with the same images and seeds for every method: **reset per corruption** "
    "(this page: each split from the source weights, 400 images in batches of 8, 50 updates per corruption; "
    "`make bench` on one corruption of each family at severity 5, `make bench-full` on all 15 at every "
    "severity), **online** (adapt on a batch, then predict it) beside **adapt then predict** (`, adapt then "
    "predict`: YOLOZU's `pre` flow, one step per batch over the split, then every image predicted in the same "
    "batches), **episodic** (the `, episodic` recipes: every image from the source weights), **continual** (the "
    "15 corruptions at severity 5 as one stream, never reset: [benchmarks-continual.md](benchmarks-continual.md), "
    "`make bench-continual`) and **gradual** (severities 1-5-1 per corruption as one stream: "
    "[benchmarks-gradual.md](benchmarks-gradual.md), `make bench-gradual`). `make bench` runs the quick scope "
    "(the online recipes; Tent, adapt then predict; BatchNorm statistics and Tent, episodic; BatchNorm statistics "
    "per image alone); `make bench-full` every protocol and every recipe.", "",
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


def machine(device: str) -> dict:
    """Where a benchmark ran (for its provenance line)."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "torch": torch.__version__,
    }


def data_root(dataset: str | None, seed: int) -> str:
    """``--dataset``, else the demo data of ``--seed`` (``data/demo`` for 0, ``data/demo-seed<S>`` for others)."""
    return dataset or ("data/demo" if seed == 0 else f"data/demo-seed{seed}")


def default_output(scope: str, adapter: str, seed: int) -> Path:
    """``runs/bench/<scope>[-<adapter tag>][-seed<S>].json``: the built-in detector on seed 0 is ``<scope>.json``."""
    tag = "" if adapter == "detector" else f"-{family_tag(adapter)}"
    return Path(f"runs/bench/{scope}{tag}{'' if seed == 0 else f'-seed{seed}'}.json")


def default_docs(scope: str, adapter: str) -> Path:
    """``docs`` for the built-in detector; else ``docs/benchmarks[-<scope>]-<adapter tag>.md``, so another model's
    report never replaces the detector's."""
    if adapter == "detector":
        return Path("docs")
    return Path(f"docs/benchmarks{'' if scope == 'quick' else f'-{scope}'}-{family_tag(adapter)}.md")


def companions(output: Path, results: dict) -> dict:
    """The results the quick report reads beside its own in ``output``'s folder: the continual and gradual
    protocols' (same model), the quick scope's and the continual stream's on other data seeds
    (``quick-seed<S>.json``, ``continual-seed<S>.json``) and, for another
    family, the built-in detector's (``quick.json``: ``families``)."""
    if results["scope"] != "quick":
        return {}
    tag = "" if results["model"]["adapter"] == "detector" else f"-{family_tag(results['model']['adapter'])}"
    found = {}
    for protocol in ("continual", "gradual"):
        path = output.parent / f"{protocol}{tag}.json"
        data = json.loads(path.read_text()) if path.is_file() else None
        if data and data.get("model", {"adapter": "detector"}) == results["model"]:
            found[protocol] = data
    if results.get("data_seed", 0) == 0:
        for key, scope in (("seeds", "quick"), ("continual_seeds", "continual")):
            found[key] = [json.loads(p.read_text()) for p in sorted(output.parent.glob(f"{scope}{tag}-seed*.json"))]
    reference = output.parent / "quick.json"  # the built-in detector's, beside another family's
    if tag and reference.is_file():
        found["reference"] = json.loads(reference.read_text())
    return found
