"""Two detector families side by side: is what the benchmark found on one detector true on the other?

A quick-scope report for another family (``--adapter``) gains a section that sets its figures against the
built-in detector's quick results (``runs/bench/quick.json``), per method, in points of mean mAP50 at severity 5:
what BatchNorm statistics win over the source model, and what each method adds over BatchNorm statistics.
"""

from __future__ import annotations

from yolozu.demo.bench.recipes import GRADIENT_METHODS
from yolozu.demo.bench.results import Results


def _mean5(res: Results, method: str) -> float | None:
    """Mean mAP50 of ``method`` over the severity-5 corruption splits; None where the method did not run."""
    return res.mean(method, 5) if method in res.methods else None


def _clean(res: Results, method: str) -> float | None:
    return res.score(method, "val") if method in res.methods else None


def _points(value: float | None, base: float | None) -> str:
    return "not run" if value is None or base is None else f"{100 * (value - base):+.1f}"


def _model_name(results: dict) -> str:
    model = results.get("model") or {}
    return model.get("checkpoint") or model.get("adapter") or "this model"


def family_rows(results: dict, reference: dict) -> list[tuple[str, str, str]]:
    """(what, on the reference detector, on this one) per comparison: source and BatchNorm statistics at
    severity 5 and clean, then each gradient method in points over BatchNorm statistics."""
    both = (Results(reference), Results(results))
    rows = []
    for label, method in (("source, mean mAP50 at severity 5", "source"),
                          ("BatchNorm statistics, mean mAP50 at severity 5", "bn")):
        values = [_mean5(r, method) for r in both]
        rows.append((label, *("not run" if v is None else f"{v:.3f}" for v in values)))
    clean = [_clean(r, "source") for r in both]
    rows.append(("source, clean mAP50", *("not run" if v is None else f"{v:.3f}" for v in clean)))
    rows.append(("BatchNorm statistics over source, points",
                 *(_points(_mean5(r, "bn"), _mean5(r, "source")) for r in both)))
    for method in GRADIENT_METHODS:
        if any(method in r.methods for r in both):
            rows.append((f"{method} over BatchNorm statistics, points",
                         *(_points(_mean5(r, method), _mean5(r, "bn")) for r in both)))
    return rows


def family_section(results: dict, reference: dict | None) -> list[str]:
    """The markdown section comparing ``results`` (another family's quick scope) with ``reference`` (the built-in
    detector's); nothing when there is no reference or ``results`` is the built-in detector's own."""
    if not reference or results.get("model", {}).get("adapter", "detector") == "detector":
        return []
    theirs = _model_name(results)
    lines = [
        "## Two families side by side",
        "",
        f"The built-in detector's quick scope ({reference.get('images_per_split')} images per split, "
        f"{reference.get('date')}) against this one's ({results.get('images_per_split')} images per split), "
        "the same corruptions and recipes:",
        "",
        f"| | built-in detector | {theirs} |",
        "|---|---|---|",
    ]
    lines += [f"| {what} | {a} | {b} |" for what, a, b in family_rows(results, reference)]
    return [*lines, ""]
