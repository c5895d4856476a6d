"""The update budget of a benchmark protocol: how many gradient updates a method gets per domain, and the line
every page states it in.

The protocols where test-time adaptation methods were established give tens to hundreds of updates per domain
(continual ImageNet-C: 5,000 images at batch 64, 78 updates; reset per corruption: 50,000 images, 782); a
method given a handful cannot show what it does. An online method takes one update per batch, so the budget is
the number of batches of a domain's images.
"""

from __future__ import annotations

from typing import Mapping, Sequence


def updates(images: int, batch: int) -> int:
    """Updates an online method takes on ``images`` images in batches of ``batch`` (one per batch, the last one
    possibly short).

    Args:
      images: images of the domain (>= 0).
      batch: images per batch (>= 1).
    Returns:
      ``ceil(images / batch)``.
    """
    if images < 0 or batch < 1:
        raise ValueError(f"a budget needs images >= 0 and batch >= 1, got images {images}, batch {batch}")
    return -(-images // batch)


def budget(images: int, batch: int) -> dict[str, int]:
    """What a results file records of its protocol's budget: ``images`` per domain, ``batch``, ``updates``."""
    return {"images": images, "batch": batch, "updates": updates(images, batch)}


def budget_line(recorded: Mapping[str, int], domain: str = "corruption") -> str:
    """``Budget: N updates per <domain> (I images, batch B)``, the line each page states its budget in.

    Args:
      recorded: a results file's ``budget`` (``budget``'s dict).
      domain: what one domain is on that page (``corruption``, ``segment``).
    Returns:
      The line.
    """
    n = recorded["updates"]
    updates_text = f"{n} update{'' if n == 1 else 's'}"
    return f"Budget: {updates_text} per {domain} ({recorded['images']} images, batch {recorded['batch']})"


def split_images(counts: Mapping[str, int], wanted: int | None) -> int:
    """The images every split of a run holds: ``wanted`` when given, else the splits' common count. A split with
    fewer images than ``wanted``, or splits of unequal size, would give the methods unequal budgets: refused.

    Args:
      counts: each split's number of images as read (at most ``wanted``).
      wanted: the images per split the protocol asks for, or None for all.
    Returns:
      The images per split.
    Raises:
      ValueError: a split is short or the splits differ in size; the message names the split and the remedy.
    """
    sizes: Sequence[int] = sorted(set(counts.values()))
    target = wanted if wanted is not None else (sizes[-1] if sizes else 0)
    short = {split: n for split, n in counts.items() if n != target}
    if short:
        split, n = next(iter(short.items()))
        raise ValueError(
            f"split {split} has {n} images where the protocol asks for {target} per split; remake the data with more "
            f"val images (tools/make_demo_data.py --n-val {target} ...) or pass --images {n}"
        )
    return target


def recorded_budget(results: Mapping) -> dict[str, int]:
    """A results file's ``budget``; for a file written before budgets were recorded, the one its images per split
    and its batches imply (BatchNorm statistics' batch, else the first online recipe's)."""
    if results.get("budget"):
        return dict(results["budget"])
    recipes = results["recipes"]
    batches = [meta["bn_batch"] for name, meta in recipes.items() if name == "bn" and meta.get("bn_batch")]
    batches += [meta["ttt"]["batch_size"] for meta in recipes.values()
                if meta.get("ttt") and meta["ttt"].get("reset", "stream") == "stream" and "batch_size" in meta["ttt"]]
    if not batches:
        raise ValueError("the results record no budget and no batch size to derive it from")
    return budget(results["images_per_split"], batches[0])
