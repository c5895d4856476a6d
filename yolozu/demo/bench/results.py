"""The benchmark's results as lookups: one recipe's score on one split, its clean drop, its speed; and the
Markdown table every page draws. A leaf: every page module reads results through it."""

from __future__ import annotations

import statistics
from typing import Iterable

from yolozu.demo.corruptions import CORRUPTIONS


def table(header: list[str], rows: Iterable[list[str]]) -> list[str]:
    """A Markdown table: the header, its rule, one line a row."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


class Results:
    """Lookups over a results dict: score(method, split), timing and memory."""

    def __init__(self, results: dict) -> None:
        self.raw = results
        self.methods = list(results["recipes"])
        self.rows = {(r["split"], r["method"]): r for r in results["rows"]}
        self.splits = results["splits"]

    def score(self, method: str, split: str, metric: str = "map50") -> float:
        return self.rows[(split, method)][metric]

    def clean_drop(self, method: str) -> float:
        """Points of clean mAP50 (``val``) the method loses against source."""
        return 100 * (self.score("source", "val") - self.score(method, "val"))

    def severity_splits(self, severity: int) -> list[str]:
        return [f"val-{c}-{severity}" for c in CORRUPTIONS if f"val-{c}-{severity}" in self.splits]

    def severities(self) -> list[int]:
        return sorted({int(s.rsplit("-", 1)[1]) for s in self.splits if s != "val"})

    def mean(self, method: str, severity: int, metric: str = "map50") -> float:
        return statistics.fmean(self.score(method, s, metric) for s in self.severity_splits(severity))

    def speed_ratio(self, method: str) -> float:
        """Images/s of the method's export over the no-TTT (source) export, from total time over all splits."""
        source = sum(self.rows[(s, "source")]["seconds"] for s in self.splits)
        mine = sum(self.rows[(s, method)]["seconds"] for s in self.splits)
        return source / mine

    def images_per_second(self, method: str) -> float:
        return sum(self.rows[(s, method)]["images"] for s in self.splits) / sum(
            self.rows[(s, method)]["seconds"] for s in self.splits
        )
