"""One model shared by the ranks of a process group, composed from three hooks the functional core stays blind to.

Every rank adapts a replica of the same weights on its own part of each global batch. Three pieces keep the
replicas one model, equal to a single process adapting on the whole global batch:

- ``all_reduce_mean()``: a gradient transformation (``optim.chain(all_reduce_mean(), adam(lr))``) averaging
  the gradients over the ranks before clipping and the optimiser see them;
- ``sync_batch_stats()``: a ``bridge.BatchStats`` hook, BatchNorm normalising with the statistics of every
  rank's batch (SyncBatchNorm's maths), differentiable through ``all_reduce_sum``;
- ``global_mean_loss(loss_fn)``: the loss as the mean over the global batch, each rank weighted by its images,
  so that ranks with unequal parts still give the global batch's gradient, and guards that read the loss decide
  the same on every rank.

Every rank must take part in every collective, so a rank with no image of a global batch steps on a padding
batch (a copy of an image another rank holds) through hooks built with ``padding=True``: the statistics, the loss
and the gradient then count nothing of it. ``SharedModel`` bundles the three for ``tta.engine.build_method``;
``SharedModel.padded()`` is the same model's hooks for a padding batch (a value, not a flag flipped between
batches: nothing inside ``apply`` reads state that changes). A custom loop composes them the same way.
``all_reduce_sum`` is a ``torch.autograd.Function`` with ``setup_context``, so it works under ``torch.func.grad``
as well as ``torch.autograd`` (not under ``vmap``: vmapped streams are independent by construction).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import attrs
import torch
import torch.distributed as dist
from torch import Tensor

from yolozu.bridge import BatchStats
from yolozu.functional import optim
from yolozu.functional.state import Params
from yolozu.functional.step import LossFn, LossOutput, Method, TTTState


class _AllReduceSum(torch.autograd.Function):
    """Sum over the ranks; the gradient of every rank's input is the sum of every rank's output gradient."""

    @staticmethod
    def forward(tensor: Tensor, group: Any) -> Tensor:
        out = tensor.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        ctx.group = inputs[1]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def all_reduce_sum(tensor: Tensor, group: Any = None) -> Tensor:
    """The sum of ``tensor`` over the ranks of ``group`` (default: the whole world), differentiable.

    Args:
      tensor: this rank's tensor.
      group: the process group.
    Returns:
      The sum over the ranks, shaped like ``tensor``; its gradient flows back to every rank's input."""
    return _AllReduceSum.apply(tensor, group)


class AllReduceState(NamedTuple):
    """The global norm of the last averaged gradient (what one process adapting on the global batch measures)."""

    grad_norm: Tensor


def all_reduce_mean(group: Any = None) -> optim.GradientTransformation:
    """Average updates over the ranks of a process group (data-parallel gradient averaging, as DDP does).

    Args:
      group: the process group (None: the default one).
    Returns:
      A ``GradientTransformation`` making one flat all-reduce per step, its state an ``AllReduceState``; put it
      first in ``optim.chain`` so that clipping and the optimiser see the averaged gradient.
    """

    def init_fn(params: Params) -> AllReduceState:
        first = next(iter(params.values()), None)
        return AllReduceState(torch.zeros((), device=first.device if first is not None else "cpu"))

    def update_fn(updates: Params, state: AllReduceState, params: Params | None = None):
        del params
        if not updates:
            return updates, state
        leaves = list(updates.values())
        flat = torch.cat([t.reshape(-1) for t in leaves])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        flat = flat / dist.get_world_size(group)
        parts = torch.split(flat, [t.numel() for t in leaves])
        averaged = {name: p.reshape(t.shape).to(t.dtype) for (name, t), p in zip(updates.items(), parts)}
        return averaged, AllReduceState(torch.linalg.vector_norm(flat))

    return optim.GradientTransformation(init_fn, update_fn)


def sync_batch_stats(group: Any = None, *, padding: bool = False) -> BatchStats:
    """A ``bridge.BatchStats`` hook: per-channel mean and biased variance of every rank's BatchNorm input together.

    Each rank sends its count, mean and sum of squared deviations (zeros for a padding batch); they are combined
    with Chan et al.'s pairwise formula, so no large sums of squares cancel. One all-reduce per layer forward,
    one per layer backward.

    Args:
      group: the process group (None: the default one).
      padding: this rank's batches are padding: they count nothing.
    Returns:
      ``stats(x) -> (mean, var, count)``: ``x`` a BatchNorm input ``(B, C, ...)``, ``mean`` and ``var``
      ``(C,)`` over every rank's values, ``count`` their number (0-d).
    """
    keep = 0.0 if padding else 1.0

    def stats(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        work = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        dims = [0, *range(2, work.dim())]
        n = work.numel() // work.shape[1]
        mean = work.sum(dim=dims) / max(n, 1)
        shape = (1, -1) + (1,) * (work.dim() - 2)
        m2 = ((work - mean.reshape(shape)) ** 2).sum(dim=dims)
        row = torch.stack([torch.full_like(mean, float(n)), mean, m2]) * keep
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        table = all_reduce_sum(torch.stack([row if r == rank else torch.zeros_like(row) for r in range(world)]), group)
        counts, means, m2s = table.unbind(1)
        total = counts.sum(0)
        global_mean = (counts * means).sum(0) / total
        var = (m2s + counts * (means - global_mean) ** 2).sum(0) / total
        return global_mean, var, total[0]

    return stats


def _images(batch: Any) -> int:
    """The number of images of a batch: the leading dim of a tensor (or of a tuple's first tensor)."""
    first = batch[0] if isinstance(batch, (tuple, list)) else batch
    return int(first.shape[0])


def global_mean_loss(loss_fn: LossFn, group: Any = None, *, padding: bool = False) -> LossFn:
    """``loss_fn`` as the mean over the global batch: sum over the ranks of images x local loss, over all images.

    With gradients averaged over the ranks (``all_reduce_mean``) each rank's parameters then receive the global
    batch's gradient of a per-image mean loss, whatever each rank's share of the batch (a padding batch counts
    zero images).

    Args:
      loss_fn: the method's ``LossFn`` on this rank's batch.
      group: the process group (None: the default one).
      padding: this rank's batches are padding: they count zero images.
    Returns:
      The global-mean ``LossFn``.
    """

    def loss(params: Params, buffers: Params, batch: Any, extra: Any) -> tuple[Tensor, LossOutput]:
        value, aux = loss_fn(params, buffers, batch, extra)
        n = 0 if padding else _images(batch)
        weighted = value * n if n else torch.where(torch.isfinite(value), value, 0.0) * 0.0
        both = torch.stack([weighted, torch.full_like(value, float(n))])
        total = all_reduce_sum(both, group)
        return total[0] / total[1], aux

    return loss


@attrs.frozen
class SharedModel:
    """The hooks that make the ranks of ``group`` adapt one model (``tta.engine.build_method`` composes them).

    Attributes:
      group: the process group (None: the default one).
      padding: the hooks are those of a padding batch (this rank has no image of the global batch it steps on):
        its statistics and loss count nothing. A value fixed when the hooks are built (``padded()``).
    """

    group: Any = None
    padding: bool = False

    def padded(self) -> "SharedModel":
        """The same model's hooks for a padding batch.

        Returns:
          A ``SharedModel`` of the same group with ``padding`` True.
        """
        return attrs.evolve(self, padding=True)

    def gradients(self) -> optim.GradientTransformation:
        """The gradient transformation to chain before the optimiser.

        Returns:
          ``all_reduce_mean`` over the group.
        """
        return all_reduce_mean(self.group)

    def batch_stats(self) -> BatchStats:
        """The BatchNorm statistics hook for ``bridge.make_apply``.

        Returns:
          ``sync_batch_stats`` over the group, counting nothing for a padding batch.
        """
        return sync_batch_stats(self.group, padding=self.padding)

    def method(self, method: Method) -> Method:
        """``method`` (whose optimiser chains ``gradients()`` first) with its loss averaged over the global batch
        and its steps' ``grad_norm`` that of the averaged gradient.

        Args:
          method: the method built over this model's hooks.
        Returns:
          The shared ``Method``.
        """
        finish = method.finish

        def global_grad_norm(old: TTTState, new: TTTState, metrics: dict, noise: Any) -> tuple[TTTState, dict]:
            new, metrics = finish(old, new, metrics, noise)
            return new, {**metrics, "grad_norm": new.opt_state[0].grad_norm}

        loss_fn = global_mean_loss(method.loss_fn, self.group, padding=self.padding)
        return method._replace(loss_fn=loss_fn, finish=global_grad_norm)
