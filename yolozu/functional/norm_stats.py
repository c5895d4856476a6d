"""BatchNorm statistics for small test batches: the batch's own combined with the source's stored ones.

A single image's statistics are a noisy estimate and replace what the source statistics knew, which costs clean
accuracy; both functions here keep the stored statistics where the batch gives little evidence against them.
Pure: ``(mean, var)`` of the batch and of the source in, the statistics to normalise with out. ``count`` is the
number of values per channel the batch's statistics summarise, ``size`` the values per channel of one image.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def mixed_stats(
    mean: Tensor, var: Tensor, source_mean: Tensor, source_var: Tensor, *, count: Any, size: int, prior: float
) -> tuple[Tensor, Tensor]:
    """Schneider et al. (NeurIPS 2020): the stored statistics as a prior of N = ``prior`` images mixed with the
    batch's n images, ``N/(N+n) source + n/(N+n) batch``, the same for the variance.

    Args:
      mean: the batch's per-channel mean ``(C,)``.
      var: the batch's per-channel biased variance ``(C,)``.
      source_mean: the stored running mean ``(C,)``.
      source_var: the stored running variance ``(C,)``.
      count: the values per channel the batch statistics came from (images x positions).
      size: the values per image (positions), so that ``count / size`` is the batch's images n.
      prior: N, the strength of the stored statistics in images.
    Returns:
      ``(mean, var)``, each ``(C,)``."""
    images = count / size
    weight = prior / (prior + images)
    return torch.lerp(mean, source_mean, weight), torch.lerp(var, source_var, weight)


def soft_threshold(x: Tensor, threshold: Tensor) -> Tensor:
    """``sign(x) max(|x| - threshold, 0)``: zero within the threshold, shrunk by it beyond.

    Args:
      x: any tensor.
      threshold: a non-negative tensor broadcastable to ``x``.
    Returns:
      The thresholded tensor, shaped like ``x``."""
    return torch.sign(x) * (x.abs() - threshold).clamp_min(0)


def shrunk_stats(
    mean: Tensor, var: Tensor, source_mean: Tensor, source_var: Tensor, *, count: Any, size: int, k: float
) -> tuple[Tensor, Tensor]:
    """Instance-aware BatchNorm (Gong et al., NeurIPS 2022, "NOTE"): the batch's deviation from the stored
    statistics, soft-thresholded at ``k`` standard errors of a mean and a variance of L = ``count`` values drawn
    from the source (``sqrt(var_s / L)``, ``var_s sqrt(2 / (L - 1))``). Deviations within sampling noise keep the
    source statistics (a clean image keeps the source's accuracy); a shift beyond it moves them by its excess.

    Args:
      mean: the batch's per-channel mean ``(C,)``.
      var: the batch's per-channel biased variance ``(C,)``.
      source_mean: the stored running mean ``(C,)``.
      source_var: the stored running variance ``(C,)``.
      count: L, the values per channel the batch statistics came from.
      size: unused (the signature of ``mixed_stats``).
      k: the threshold in standard errors.
    Returns:
      ``(mean, var)``, each ``(C,)``."""
    del size
    values = torch.as_tensor(count, dtype=mean.dtype, device=mean.device)
    mean_error = torch.sqrt(source_var / values)
    var_error = source_var * torch.sqrt(2.0 / (values - 1).clamp_min(1))
    return (
        source_mean + soft_threshold(mean - source_mean, k * mean_error),
        source_var + soft_threshold(var - source_var, k * var_error),
    )
