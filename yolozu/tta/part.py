"""``Part``: the share of a run one process adapts and predicts when a run is spread over several.

The default ``WHOLE`` is a run on its own. A rank of a distributed export (``yolozu.parallel.plan``) gets the index at
which its records start in the whole run (so random keys and log rows use the whole run's indices), the hooks
of a model shared with the other ranks, and the batches it must step through in lockstep with them.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import attrs

from yolozu.adapter import Record

Batches = Callable[[Any, Sequence[Record], int], Iterator[tuple[Sequence[Record], Any, bool]]]
"""``batches(adapter, records, batch_size) -> iterator of (records of the batch, input batch, padding)``;
``padding`` marks a batch this part steps on only to take part in the ranks' collectives (its images belong
to another part: they count nothing and their predictions are dropped)."""


@attrs.frozen
class Part:
    """This process's share of a run.

    Attributes:
      offset: the whole-run index of its first batch (``online``/``pre``) or image (reset ``sample``).
      shared: a ``parallel.collectives.SharedModel`` when the ranks adapt one model (None: this part adapts alone).
      batches: how its records become batches (None: consecutive slices read through ``build_loader``).
    """

    offset: int = 0
    shared: Any = None
    batches: Batches | None = None


WHOLE = Part()
"""A run on its own."""
