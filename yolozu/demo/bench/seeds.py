"""How much the quick scope's headline moves with the demo data's seed: a guard against tuning to our own images.

The quick scope run on data made with another seed (``tools/make_demo_data.py --seed 1 --root data/demo-seed1``,
then ``python -m yolozu.demo.bench.shift --quick --seed 1``) writes ``runs/bench/quick-seed1.json``; the seed-0
report compares each method's mean mAP50 at severity 5 and its points over BatchNorm statistics between the seeds.
The continual stream on the other seed (``python -m yolozu.demo.bench.continual --seed 1``,
``runs/bench/continual-seed1.json``) gives the same comparison for the ``Continual:`` line.
"""

from __future__ import annotations

import statistics

from yolozu.demo.bench.continual_report import TARGETS, corruptions
from yolozu.demo.bench.recipes import GRADIENT_METHODS
from yolozu.demo.bench.results import Results, table


def comparable(results: dict, other: dict) -> str | None:
    """Why two quick results cannot be compared (another scope, images per split, splits or model), or None."""
    for key in ("images_per_split", "splits", "model", "scope"):
        if results.get(key) != other.get(key):
            return f"its {key.replace('_', ' ')} differ"
    return None


def _figures(res: Results, method: str) -> tuple[float, float]:
    """Mean mAP50 at severity 5 and its points over BatchNorm statistics."""
    return res.mean(method, 5), 100 * (res.mean(method, 5) - res.mean("bn", 5))


def seed_spread(results: dict, other: dict) -> dict:
    """Per method (in both results) the mean mAP50 and points over BN on each seed; the largest moves."""
    mine, theirs = Results(results), Results(other)
    methods = [m for m in mine.methods if m in theirs.methods]
    rows = {m: (*_figures(mine, m), *_figures(theirs, m)) for m in methods}
    gradient = [m for m in methods if results["recipes"][m]["ttt"] is not None]
    online = [m for m in GRADIENT_METHODS if m in methods] or gradient or methods
    best = [max(gradient, key=lambda m, r=r: r.mean(m, 5)) if gradient else None for r in (mine, theirs)]
    return {
        "rows": rows,
        "map50": max(methods, key=lambda m: abs(rows[m][2] - rows[m][0])),
        "over_bn": max(online, key=lambda m: abs(rows[m][3] - rows[m][1])),
        "over_bn_any": max(gradient or methods, key=lambda m: abs(rows[m][3] - rows[m][1])),
        "best": best,
    }


def seed_lines(results: dict, others: list[dict]) -> list[str]:
    """The report's ``Seeds:`` line and table for each other data seed (or why it is left out)."""
    out: list[str] = []
    seed = results.get("data_seed", 0)
    for other in others:
        theirs = other.get("data_seed")
        why = comparable(results, other)
        if why:
            out += [f"Data seed {theirs}: not compared ({why}).", ""]
            continue
        spread = seed_spread(results, other)
        rows = spread["rows"]
        a, b, c = spread["map50"], spread["over_bn"], spread["over_bn_any"]
        out += [
            f"Seeds: between data seeds {seed} and {theirs} ({results['images_per_split']} images per split) the mean "
            f"mAP50 at severity 5 moves by at most {100 * abs(rows[a][2] - rows[a][0]):.1f} points ({a}), the online "
            f"methods' points over BatchNorm statistics by at most {abs(rows[b][3] - rows[b][1]):.2f} ({b}; any "
            f"recipe: {abs(rows[c][3] - rows[c][1]):.2f}, {c}); best method {spread['best'][0]} on seed {seed}, "
            f"{spread['best'][1]} on seed {theirs}.",
            "",
            *table(
                ["method", f"mAP50 seed {seed}", f"mAP50 seed {theirs}", "moves (points)", f"over BN seed {seed}",
                 f"over BN seed {theirs}", "moves (points)"],
                ([m, f"{r[0]:.3f}", f"{r[2]:.3f}", f"{100 * (r[2] - r[0]):+.1f}", f"{r[1]:+.2f}", f"{r[3]:+.2f}",
                  f"{r[3] - r[1]:+.2f}"] for m, r in rows.items()),
            ),
            "",
        ]
    return out


def continual_seed_lines(continual: dict | None, others: list[dict]) -> list[str]:
    """How far the continual stream's points over BatchNorm statistics move on another data seed
    (``continual-seed<S>.json``): along the stream (the ``Continual:`` line's figure) and on a single segment of
    the last five (what its no-collapse check reads)."""
    if continual is None:
        return []
    out: list[str] = []
    mine = Results(continual)
    for other in others:
        why = comparable(continual, other)
        if why:
            out += [f"Continual, data seed {other.get('data_seed')}: not compared ({why}).", ""]
            continue
        theirs = Results(other)
        methods = [m for m in mine.methods if m in theirs.methods and m not in ("source", "bn")]
        stream = corruptions(mine)
        last = stream[-TARGETS["last"]:]

        def over(res: Results, method: str, splits: list[str]) -> list[float]:
            return [100 * (res.score(method, s) - res.score("bn", s)) for s in splits]

        along = {m: abs(statistics.fmean(over(theirs, m, stream)) - statistics.fmean(over(mine, m, stream)))
                 for m in methods}
        single = {(m, s): abs(b - a) for m in methods
                  for s, a, b in zip(last, over(mine, m, last), over(theirs, m, last))}
        a, (b_method, b_split) = max(along, key=along.get), max(single, key=single.get)
        out += [
            f"Continual: between data seeds {continual.get('data_seed', 0)} and {other.get('data_seed')} "
            f"({continual['images_per_split']} images per segment) a method's points over BatchNorm statistics along "
            f"the stream move by at most {along[a]:.2f} ({a}); on a single segment of the last {len(last)}, by up "
            f"to {single[b_method, b_split]:.2f} ({b_method}, {b_split}).",
            "",
        ]
    return out


def seed_section(results: dict, others: list[dict], continual: dict | None = None,
                 continual_others: list[dict] | None = None) -> list[str]:
    """The ``Data seeds`` section: how far the figures move on demo data made with other seeds (the quick scope's
    ``others``; the continual stream's ``continual_others``, against ``continual``)."""
    if not others:
        return []
    return ["## Data seeds", "", "The same scope, recipes and image counts on demo data made with another seed "
            "(`tools/make_demo_data.py --seed S --root data/demo-seedS --n-train 0 --n-val 400 --corruptions all "
            "--severities 5`, "
            "then `python -m yolozu.demo.bench.shift --quick --seed S`): how far the figures move when only the "
            "images change.", "", *seed_lines(results, others),
            *continual_seed_lines(continual, continual_others or [])]
