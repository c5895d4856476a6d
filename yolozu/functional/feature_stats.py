"""Feature statistics of named layers: the moments feature alignment matches, computed, combined and stored.

For a layer whose output over a set of images is ``x`` (``(N, C, ...)``), the source statistics are

- per location (ActMAD, Mirza et al. CVPR 2023): the mean and biased variance over the images of every
  channel at every position, ``mean[c, h, w] = 1/N sum_n x[n, c, h, w]`` and ``var`` likewise, shaped like
  one image's output ``(C, ...)``;
- per channel: the same over images and positions, ``(C,)``, which follow from the per-location ones exactly
  (``per_channel``), so the file stores only those;
- pooled (WHW-style): the mean and variance over the images of the spatially averaged feature, ``(C,)``.

``accumulate`` folds one batch's features into running sums (float64), ``finish`` turns the sums into
``LayerStats``; ``yolozu.io.feature_stats`` stores them beside a checkpoint.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, NamedTuple, Sequence

import torch
from torch import Tensor

from yolozu.functional.state import Params


class LayerStats(NamedTuple):
    """One layer's source statistics: per-location ``mean``/``var`` ``(C, ...)`` (biased, over images) and the
    pooled feature's ``pooled_mean``/``pooled_var`` ``(C,)``."""

    mean: Tensor
    var: Tensor
    pooled_mean: Tensor
    pooled_var: Tensor


Sums = dict[str, tuple[Tensor, ...]]
"""Per layer: ``(count, sum x, sum x^2, sum pooled, sum pooled^2)`` over the images seen, float64."""


def pooled(x: Tensor) -> Tensor:
    """The spatially averaged feature of each image.

    Args:
      x: features ``(N, C, ...)``.
    Returns:
      ``(N, C)``: the mean over the positions (``x`` itself when it is ``(N, C)``).
    """
    return x.flatten(2).mean(dim=2) if x.dim() > 2 else x


def accumulate(sums: Sums, features: Mapping[str, Tensor]) -> Sums:
    """One batch's features added to running sums.

    Args:
      sums: the sums so far (``Sums``; ``{}`` to start).
      features: ``{layer: (N, C, ...)}`` of one batch.
    Returns:
      a new ``Sums`` with the batch counted (float64).
    """
    out = dict(sums)
    for name, x in features.items():
        x = x.detach().to(torch.float64)
        p = pooled(x)
        batch = (torch.tensor(float(x.shape[0]), dtype=torch.float64, device=x.device), x.sum(0), (x * x).sum(0),
                 p.sum(0), (p * p).sum(0))
        out[name] = batch if name not in out else tuple(a + b for a, b in zip(out[name], batch))
    return out


def finish(sums: Sums) -> dict[str, LayerStats]:
    """The statistics the sums describe: means and biased variances over the images.

    Args:
      sums: ``Sums`` over at least one image.
    Returns:
      ``{layer: LayerStats}`` in float32.
    """
    stats = {}
    for name, (n, s1, s2, p1, p2) in sums.items():
        mean, pmean = s1 / n, p1 / n
        var, pvar = (s2 / n - mean * mean).clamp_min(0), (p2 / n - pmean * pmean).clamp_min(0)
        stats[name] = LayerStats(*(t.to(torch.float32) for t in (mean, var, pmean, pvar)))
    return stats


def per_channel(mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel moments over images and positions from the per-location ones (equally many images per
    position): ``E[x] = avg mean``, ``Var = avg(var + mean^2) - E[x]^2``.

    Args:
      mean: per-location means ``(C, ...)`` (already per channel when ``(C,)``).
      var: per-location biased variances, shaped like ``mean``.
    Returns:
      ``(mean, var)``, each ``(C,)``.
    """
    if mean.dim() == 1:
        return mean, var
    m, v = mean.flatten(1), var.flatten(1)
    channel_mean = m.mean(dim=1)
    return channel_mean, ((v + m * m).mean(dim=1) - channel_mean * channel_mean).clamp_min(0)


def compute_stats(
    apply: Callable[..., Any],
    params: Params,
    buffers: Params,
    batches: Iterable[Tensor],
    layers: Sequence[str],
    *,
    bn_mode: str,
) -> tuple[dict[str, LayerStats], int]:
    """The statistics of ``layers`` over every image of ``batches``, without gradients.

    Args:
      apply: the model as a pure forward (``bridge.make_apply``), which takes ``taps``.
      params: the model's parameters.
      buffers: the model's buffers.
      batches: input batches ``(N, ...)``.
      layers: the layers to read (``named_modules()`` names).
      bn_mode: the BatchNorm mode of every forward: the one the statistics will be compared under at test time.
    Returns:
      ``(stats, images)``: ``{layer: LayerStats}`` and the number of images read.
    """
    sums: Sums = {}
    images = 0
    with torch.no_grad():
        for x in batches:
            (_, features), _ = apply(params, buffers, x, bn_mode=bn_mode, taps=tuple(layers))
            sums = accumulate(sums, features)
            images += int(x.shape[0])
    if not images:
        raise ValueError("source statistics need at least one image; the split given has none")
    return finish(sums), images


def as_layer_stats(tensors: Mapping[str, Any]) -> dict[str, LayerStats]:
    """Statistics as ``LayerStats``; anything else is a ValueError.

    Args:
      tensors: what a statistics file holds (``{layer: {field: tensor}}``, ``yolozu.io.feature_stats``) or
        ``{layer: LayerStats}`` already.
    Returns:
      ``{layer: LayerStats}``.
    """
    try:
        return {name: s if isinstance(s, LayerStats) else LayerStats(**{k: s[k] for k in LayerStats._fields})
                for name, s in tensors.items()}
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"not source statistics: each layer needs {', '.join(LayerStats._fields)} ({e!r})") from None


__all__ = ["LayerStats", "accumulate", "finish", "per_channel", "compute_stats", "as_layer_stats", "pooled"]
