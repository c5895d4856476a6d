"""Feature alignment: the test batch's feature moments pulled towards the source's (ActMAD, with a WHW-style term).

ActMAD (Mirza, Micorek, Possegger & Bischof, CVPR 2023) matches, for several layers l, the test batch's mean and
variance of every channel at every location with the source's, computed once on the training split:

    L = sum_l  mean |mu_l(x_test) - mu_l^src| + mean |sigma2_l(x_test) - sigma2_l^src|

(moments over the images of the batch, per location ``(C, H, W)``, with ``per_location``; by default the positions
are pooled too, per channel ``(C,)``, which the held-out corruptions preferred on the demo detector). A second,
optional term in the spirit of WHW (CVPR 2024) pulls the batch's mean pooled feature towards the source's with a
diagonal Mahalanobis distance, ``mean_c (p_c - mu_c)^2 / sigma2_c``, weighted by ``pooled_weight``.

The features are the named layers' outputs in the same forward that predicts (``apply(..., taps=layers)``): one
forward per update, its output the batch's prediction. For small batches the moments are running test moments:
the state keeps an exponential moving average of the first and second moments, and a batch of n images weighs
``min(1, n / moment_images)`` in it (gradients flow through the batch's share only); a batch of
``moment_images`` or more uses its own moments alone, as ActMAD.

With ``noise_floor`` k > 0 a gap within k standard errors of the source's sampling noise counts as none
(``norm_stats.soft_threshold``, as the shrunk BatchNorm statistics): a clean batch then pulls nothing, so
the updates stop chasing the noise of 8 images' moments and the pull back to the source undoes the drift. The
standard error of a batch mean over n images is ``sqrt(v / n)``, v the source's variance across images of the
feature the mean averages (the pooled feature's per channel, the location's per location); that of a variance
``var * sqrt(2 / n)`` (Gaussian features, images the independent unit: an over-estimate per channel).

Deviations from the paper: per-channel moments by default (ActMAD's per-location ones with ``per_location``);
ActMAD updates every parameter with Adam at a fixed learning rate, here the shell's update filter, optimiser and
BatchNorm mode apply as for every method. The layers and the source statistics come
from the adapter's readout (``Readout.layers``, ``Readout.source_stats``) unless the settings name others.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import attrs
import torch
from torch import Tensor

from yolozu.functional import optim
from yolozu.functional.feature_stats import LayerStats, as_layer_stats, per_channel, pooled
from yolozu.functional.norm_stats import soft_threshold
from yolozu.functional.readout import DEFAULT_READOUT, Readout
from yolozu.functional.settings import number, setting, str_tuple
from yolozu.functional.state import Params
from yolozu.functional.step import Apply, LossOutput, Method

Moments = tuple[Tensor, Tensor, Tensor, Tensor]
"""``(mean, second moment, pooled mean, pooled second moment)`` of one layer's features."""


class AlignState(NamedTuple):
    """The source's moments per layer ``(mean, var, pooled mean, pooled var)`` on the state's device, and the
    running test moments per layer (``Moments``; NaN before the first batch)."""

    source: dict[str, tuple[Tensor, Tensor, Tensor, Tensor]]
    running: dict[str, Moments]


def _optional_str(instance, attribute, value) -> None:
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{type(instance).__name__}.{attribute.name} must be a path or None, got {value!r}")


@attrs.frozen(kw_only=True)
class AlignSettings:
    """Feature alignment's settings."""

    layers: tuple[str, ...] | None = setting(
        None, "align: layers whose features are matched (none: the adapter's)", type=tuple, converter=str_tuple
    )
    stats: str | None = setting(
        None, "align: source statistics file (tools/source_stats.py; none: the one beside the checkpoint)",
        _optional_str, type=str,
    )
    per_location: bool = setting(
        False, "align: moments per channel and location (ActMAD's); off: per channel (chosen on held-out data)"
    )
    moment_images: float = setting(
        8.0, "align: images the running test moments summarise (a batch of n weighs n/this)", number(1)
    )
    var_weight: float = setting(1.0, "align: weight of the variance term", number(0))
    pooled_weight: float = setting(0.0, "align: weight of the pooled-feature Mahalanobis term (WHW-style)", number(0))
    noise_floor: float = setting(
        0.0, "align: standard errors of the source's sampling noise within which a moment gap counts as none "
        "(0: every gap counts)", number(0)
    )


def batch_moments(x: Tensor, per_location: bool) -> Moments:
    """The batch's first and second moments.

    Args:
      x: one layer's features ``(N, C, ...)``.
      per_location: moments over the images only (``(C, ...)``), else over images and positions (``(C,)``).
    Returns:
      ``Moments``: mean, second moment, and the pooled feature's mean and second moment ``(C,)``.
    """
    dims = (0,) if per_location or x.dim() == 2 else (0, *range(2, x.dim()))
    p = pooled(x)
    return x.mean(dim=dims), (x * x).mean(dim=dims), p.mean(dim=0), (p * p).mean(dim=0)


def running_moments(old: Moments, new: Moments, weight: float) -> Moments:
    """Running test moments: ``weight * new + (1 - weight) * old``.

    Args:
      old: the running moments (NaN before the first batch, which then sets them).
      new: the batch's moments.
      weight: the batch's share, ``min(1, n / moment_images)``.
    Returns:
      the new running moments; gradients reach the current batch's share only (``old`` is detached).
    """
    return tuple(
        torch.where(torch.isfinite(o), weight * n + (1 - weight) * o.detach(), n) for o, n in zip(old, new)
    )


def sampling_noise(source: tuple[Tensor, ...], images: float, per_location: bool) -> tuple[Tensor, Tensor]:
    """The standard errors of a source batch's moments: what ``images`` source images' mean and variance stray
    from the source's by chance.

    Args:
      source: the source's ``(mean, var, pooled mean, pooled var)``.
      images: the images the moments summarise.
      per_location: whether the moments are per location (``var`` is then the variance across images).
    Returns:
      ``(se of the mean, se of the variance)``, shaped like the source's mean: ``sqrt(v / n)`` with v the
      variance across images of what the mean averages, and ``var * sqrt(2 / n)``.
    """
    _, var, _, pooled_var = source
    across = var if per_location else pooled_var
    return (across / images).sqrt(), var * (2.0 / images) ** 0.5


def moment_gap(moments: Moments, source: tuple[Tensor, ...], s: AlignSettings, images: float) -> Tensor:
    """One layer's loss.

    Args:
      moments: the test moments (``Moments``).
      source: the source's ``(mean, var, pooled mean, pooled var)``, shaped like the moments.
      s: the settings (``var_weight``, ``pooled_weight``, ``noise_floor``, ``per_location``).
      images: the images the moments summarise (for ``noise_floor``).
    Returns:
      a 0-d tensor: the L1 gaps of the mean and (weighted) the variance, each less ``noise_floor`` standard
      errors (``sampling_noise``) and at least 0, plus (weighted) the pooled mean's diagonal Mahalanobis distance
      from the source's.
    """
    m1, m2, p1, p2 = moments
    mean, var, pooled_mean, pooled_var = source
    mean_gap, var_gap = m1 - mean, m2 - m1 * m1 - var
    if s.noise_floor:
        mean_se, var_se = sampling_noise(source, images, s.per_location)
        mean_gap = soft_threshold(mean_gap, s.noise_floor * mean_se)
        var_gap = soft_threshold(var_gap, s.noise_floor * var_se)
    loss = mean_gap.abs().mean() + s.var_weight * var_gap.abs().mean()
    if s.pooled_weight:
        loss = loss + s.pooled_weight * ((p1 - pooled_mean).square() / (pooled_var + 1e-6)).mean()
    return loss


def _resolve(
    settings: AlignSettings, readout: Readout, files: Mapping[str, Any]
) -> tuple[tuple[str, ...], dict[str, LayerStats]]:
    """The layers and source statistics to align: the settings' (the shell loads the ``stats`` file into
    ``files``) or else the readout's; a clear error for none."""
    layers = tuple(settings.layers or readout.layers)
    if not layers:
        raise ValueError("align needs layers to match: this adapter names none; give --ttt-align-layers")
    stats = files.get("stats", readout.source_stats)
    if stats is None:
        raise ValueError(
            "align needs source statistics: none beside this checkpoint; make them with "
            "`python tools/source_stats.py` or give --ttt-align-stats"
        )
    stats = as_layer_stats(stats)
    missing = [name for name in layers if name not in stats]
    if missing:
        raise ValueError(f"the source statistics have no layer {missing[0]!r} (they hold {', '.join(stats)})")
    flat = [name for name in layers if stats[name].mean.dim() == 1]
    if settings.per_location and flat:
        raise ValueError(
            f"the source statistics of {flat[0]!r} are per channel; drop --ttt-align-per-location or make "
            "per-location ones (tools/source_stats.py without --per-channel)"
        )
    return layers, stats


def align_method(
    apply: Apply,
    optimizer: optim.GradientTransformation,
    settings: AlignSettings = AlignSettings(),
    *,
    readout: Readout = DEFAULT_READOUT,
    bn: str = "running",
    files: Mapping[str, Any] | None = None,
) -> Method:
    """Feature alignment as a ``Method`` (the module docstring has the loss). One plain forward per update, whose
    output predicts the batch (``clean_forward``).

    Args:
      apply: the model as a pure forward (``bridge.make_apply``; it must take ``taps``).
      optimizer: the update's optimiser.
      settings: ``AlignSettings``.
      readout: the adapter's readout: its ``layers`` and ``source_stats`` unless the settings name others.
      bn: the BatchNorm mode of the forward (``step.BN_MODES``).
      files: the contents of the input files the settings name (``{"stats": ...}`` when ``stats`` is given;
        ``MethodEntry.files``).
    Returns:
      the ``Method``; its metrics add ``mean_gap`` (the summed L1 gap of the means).
    """
    layers, stats = _resolve(settings, readout, files or {})

    def init(trainable: Params) -> AlignState:
        some = next(iter(trainable.values()))
        source, running = {}, {}
        for name in layers:
            s = stats[name]
            mean, var = (s.mean, s.var) if settings.per_location else per_channel(s.mean, s.var)
            tensors = (mean, var, s.pooled_mean, s.pooled_var)
            source[name] = tuple(t.to(device=some.device, dtype=some.dtype) for t in tensors)
            nan = [torch.full_like(t, float("nan")) for t in source[name]]
            running[name] = (nan[0], nan[1], nan[2], nan[3])
        return AlignState(source, running)

    def align_loss(params, buffers, batch, own: AlignState):
        (output, features), new_buffers = apply(params, buffers, batch, bn_mode=bn, taps=layers)
        weight = min(1.0, batch.shape[0] / settings.moment_images)
        images = max(float(batch.shape[0]), settings.moment_images)
        total, mean_gap, running = 0.0, 0.0, {}
        for name in layers:
            moments = running_moments(own.running[name], batch_moments(features[name], settings.per_location), weight)
            running[name] = tuple(t.detach() for t in moments)  # the state carries values, not the graph
            total = total + moment_gap(moments, own.source[name], settings, images)
            mean_gap = mean_gap + (moments[0] - own.source[name][0]).abs().mean().detach()
        return total, LossOutput(new_buffers, {"mean_gap": mean_gap}, output, own._replace(running=running))

    def prepare(state, batch, noise) -> AlignState:
        del batch, noise
        return state.method_state

    return Method(align_loss, optimizer, prepare=prepare, init=init, metric_names=("mean_gap",),
                  clean_forward=True)
