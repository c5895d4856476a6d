"""How an export is spread over the ranks of a torchrun job: the semantics, the shard rule, each rank's part.

Semantics (``meta.distributed.semantics``):

- ``predict-only`` (no ``--ttt``) and ``episodic`` (``--ttt-reset sample``): images are independent, so the
  shards give exactly the single-process predictions;
- ``independent-streams`` (``--ttt-reset stream``, ``--ttt-dist-sync none``): each rank adapts its own model on
  its shard, one stream per rank;
- ``shared-model`` (``--ttt-dist-sync grads``, online schedule): gradients and BatchNorm batch statistics are
  all-reduced, so every rank holds the same weights, those of one process adapting on the global batch of
  ``--ttt-batch-size`` x world images.

Shard rules (``shard_rule``): ``contiguous-batches`` cuts the records into batches of ``shard_unit`` images (the
batches the single process forms) and gives each rank a contiguous run of whole batches, the first ranks one more
when they do not divide evenly; ``global-batch-parts`` cuts them into global batches of ``shard_unit`` x world
images and gives rank r the r-th contiguous part of each (``shard_unit`` images; the last global batch split as
evenly as possible, so a rank's part of it may be empty: that rank then steps on a copy of the global batch's
first image as padding, which adds nothing to the statistics, the loss or the gradient, and is not predicted).
Random keys and log rows use whole-run indices, so a shard's images get the keys they get in one process.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import attrs

from yolozu.adapter import Record, loader_of
from yolozu.parallel.collectives import SharedModel
from yolozu.parallel.world import Lockstep, World
from yolozu.tta.config import TTTConfig
from yolozu.tta.methods import entry
from yolozu.tta.part import WHOLE, Batches, Part
from yolozu.tta.report import TTTReport

DIST_SYNC = ("none", "grads")


def contiguous_batches(n: int, unit: int, world: int) -> list[range]:
    """Each rank's records: a contiguous run of whole batches of ``unit`` records, split as evenly as possible.

    Args:
      n: the number of records.
      unit: records per batch.
      world: the number of ranks.
    Returns:
      One ``range`` of record indices per rank."""
    batches = -(-n // unit)
    per, extra = divmod(batches, world)
    starts = [r * per + min(r, extra) for r in range(world + 1)]
    return [range(min(starts[r] * unit, n), min(starts[r + 1] * unit, n)) for r in range(world)]


def global_batch_parts(n: int, batch: int, world: int) -> list[list[range]]:
    """Each rank's part of every global batch of ``batch`` x ``world`` consecutive records (contiguous parts of
    ``batch``; the last, shorter global batch split as evenly as possible, first parts one more).

    Args:
      n: the number of records.
      batch: each rank's share of a global batch.
      world: the number of ranks.
    Returns:
      Per rank, one ``range`` per global batch (possibly empty: that rank steps on padding)."""
    size = batch * world
    parts: list[list[range]] = [[] for _ in range(world)]
    for start in range(0, n, size):
        per, extra = divmod(min(size, n - start), world)
        for r in range(world):
            first = start + r * per + min(r, extra)
            parts[r].append(range(first, first + per + (r < extra)))
    return parts


@attrs.frozen
class Plan:
    """The semantics and shard rule of a distributed export, and every rank's batches of whole-run indices."""

    semantics: str
    rule: str
    unit: int
    dist_sync: str
    parts: tuple[tuple[range, ...], ...]

    def indices(self, rank: int) -> list[int]:
        """The whole-run indices of ``rank``'s records, in the order it predicts them.

        Args:
          rank: the rank.
        Returns:
          The indices."""
        return [i for part in self.parts[rank] for i in part]

    def meta(self, world: World) -> dict:
        """``meta.distributed``: the world, the semantics, the shard rule and each rank's image count.

        Args:
          world: the job's ``World``.
        Returns:
          The JSON-ready dict."""
        out = {"world_size": world.size, "backend": world.backend, "semantics": self.semantics}
        out.update(shard_rule=self.rule, shard_unit=self.unit, dist_sync=self.dist_sync)
        if self.semantics == "shared-model":
            out["global_batch_size"] = self.unit * world.size
        return {**out, "images_per_rank": [len(self.indices(r)) for r in range(world.size)]}


def check_dist_sync(config: TTTConfig, dist_sync: str) -> None:
    """A ValueError naming the setting when ``--ttt-dist-sync grads`` cannot share one model for ``config``.

    Args:
      config: the run's TTT settings.
      dist_sync: ``none`` or ``grads``.
    Raises:
      ValueError: naming the setting that prevents sharing one model."""
    if dist_sync != "grads":
        return
    if config.streams > 1:
        raise ValueError("--ttt-dist-sync grads adapts one unvmapped model per rank; drop --ttt-streams")
    if config.reset != "stream" or config.schedule != "online":
        raise ValueError(
            "--ttt-dist-sync grads shares one model over the ranks of an online run: it needs --ttt-schedule online "
            "and --ttt-reset stream (--ttt-reset sample shards exactly without it)"
        )
    if not entry(config.method).shared_model:
        raise ValueError(
            f"--ttt-dist-sync grads cannot keep method {config.method!r} one model: it decides per batch from "
            "its own samples (selection, recovery); use --ttt-dist-sync none"
        )


def plan_for(config: TTTConfig, batch_size: int, n: int, world: int, dist_sync: str) -> Plan:
    """The plan of an export of ``n`` records over ``world`` ranks (``batch_size``: the prediction batch).

    Args:
      config: the run's TTT settings.
      batch_size: the prediction batch.
      n: the number of records.
      world: the number of ranks.
      dist_sync: ``none`` or ``grads``.
    Returns:
      The ``Plan``."""
    if not config.enabled:
        semantics, unit = "predict-only", batch_size
    elif config.reset == "sample":
        semantics, unit = "episodic", config.streams
    elif dist_sync == "grads":
        parts = global_batch_parts(n, config.batch_size, world)
        return Plan("shared-model", "global-batch-parts", config.batch_size, dist_sync, tuple(map(tuple, parts)))
    else:
        semantics, unit = "independent-streams", config.batch_size
    shards = contiguous_batches(n, unit, world)
    return Plan(semantics, "contiguous-batches", unit, dist_sync, tuple((shard,) for shard in shards))


def _lockstep_batches(lockstep: Lockstep, parts: Sequence[range], pads: Sequence[Record]) -> Batches:
    """Batches of a shared-model rank: its part of each global batch (an empty one replaced by the global batch's
    first image and marked as padding), each read checked with every rank first."""

    def batches(adapter: Any, records: Sequence[Record], size: int) -> Iterator[tuple[Sequence[Record], Any, bool]]:
        del size
        start = 0
        for part, pad in zip(parts, pads):
            chunk = list(records[start : start + len(part)]) or [pad]
            start += len(part)
            try:
                (x,) = loader_of(adapter, chunk, len(chunk))
            except Exception:
                lockstep.check(failed=True)
                raise
            lockstep.check()
            yield chunk, x, not part

    return batches


def part_for(plan: Plan, rank: int, records: Sequence[Record], lockstep: Lockstep) -> Part:
    """``rank``'s ``tta.part.Part`` of the run over ``records`` (the whole run's).

    Args:
      plan: the run's plan.
      rank: this rank.
      records: the whole run's records.
      lockstep: the ranks' failure checks (a shared model's batches are read in lockstep).
    Returns:
      The ``Part``."""
    first = plan.indices(rank)[0] if plan.indices(rank) else 0
    if plan.semantics == "episodic":
        return Part(offset=first)
    if plan.semantics == "independent-streams":
        return Part(offset=first // plan.unit)
    if plan.semantics == "shared-model":
        pads = [records[part.start - part.start % (plan.unit * len(plan.parts))] for part in plan.parts[rank]]
        return Part(shared=SharedModel(), batches=_lockstep_batches(lockstep, plan.parts[rank], pads))
    return WHOLE


def in_order(plan: Plan, gathered: Sequence[list]) -> list:
    """The ranks' predictions (``gathered[r]`` in rank r's order, a padding batch's last) in the whole run's
    order, without those of padding.

    Args:
      plan: the run's plan.
      gathered: each rank's predictions.
    Returns:
      One prediction per record of the run, in order.
    Raises:
      RuntimeError: a rank returned a wrong number of predictions."""
    out: dict[int, Any] = {}
    for rank, predictions in enumerate(gathered):
        indices = plan.indices(rank)
        pads = sum(1 for part in plan.parts[rank] if not part) if plan.semantics == "shared-model" else 0
        if len(predictions) != len(indices) + pads:
            raise RuntimeError(f"rank {rank} returned {len(predictions)} predictions for {len(indices)} images")
        out.update(zip(indices, predictions))
    return [out[i] for i in range(len(out))]


def merge_reports(plan: Plan, reports: Sequence[TTTReport]) -> TTTReport:
    """One report of the run: rank 0's for a shared model (every rank took the same steps), else the ranks'
    steps in rank order (renumbered) and their counts summed; seconds are the slowest rank's.

    Args:
      plan: the run's plan.
      reports: each rank's ``TTTReport``, in rank order.
    Returns:
      The run's ``TTTReport``."""
    first = reports[0]
    seconds = max(r.seconds for r in reports)
    if plan.semantics in ("shared-model", "predict-only") or len(reports) == 1:
        return attrs.evolve(first, seconds=seconds)
    rows = [dict(row) for report in reports for row in report.step_metrics]
    for step, row in enumerate(rows):
        row["step"] = step
    ratios = [(r.mask_ratio * r.steps_run, r.steps_run) for r in reports if r.mask_ratio is not None]
    stops = [r.stop_reason for r in reports if r.stop_reason is not None]
    return attrs.evolve(
        first,
        steps_requested=sum(r.steps_requested for r in reports),
        steps_run=sum(r.steps_run for r in reports),
        batches_used=sum(r.batches_used for r in reports),
        seconds=seconds,
        losses=[loss for r in reports for loss in r.losses],
        mask_ratio=sum(m for m, _ in ratios) / max(1, sum(k for _, k in ratios)) if ratios else None,
        stopped_early=any(r.stopped_early for r in reports),
        stop_reason=stops[0] if stops else None,
        step_metrics=rows,
        warnings=[w for r in reports for w in r.warnings],
    )
