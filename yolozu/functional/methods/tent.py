"""Tent: test-time entropy minimisation (Wang, Shelhamer, Liu, Olshausen & Darrell, ICLR 2021).

Tent minimises the mean Shannon entropy of the model's own class predictions on the test batch,

    L(theta) = 1/N sum_n H(p_n),   H(p) = -sum_c p_c log p_c,   p_n = softmax(z_n)

(for independent sigmoid scores, H(p) = -sum_c [p_c log p_c + (1 - p_c) log(1 - p_c)]), updating only the
selected parameters (the paper: BatchNorm affine parameters, normalising with test-batch statistics). The
samples z_n are what the readout (``yolozu.functional.readout``) reads from the output: a classifier's logit
rows, or a detector's class logits at its top-k heatmap peaks (``peak_class_logits``).

With ``detector_response`` (YOLOZU 4.12's detector-native variant) the loss is instead the response consistency of
``yolozu.functional.response``: the frozen model's (teacher's) candidates on the batch, read by the readout (query
logits; a dense detector's top-k peaks; torchvision's candidates), select the foreground the student's
responses on a weak photometric view of the batch are pulled towards; a batch with fewer than
``response_min_selected`` selected candidates abstains (no update, buffers kept).
"""

from __future__ import annotations

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor

from yolozu.functional import optim
from yolozu.functional.losses import binary_entropy, softmax_entropy
from yolozu.functional.readout import DEFAULT_READOUT, Readout
from yolozu.functional.response import response_terms, weak_photometric_view
from yolozu.functional.settings import number, setting
from yolozu.functional.step import Apply, LossOutput, Method, TTTState, make_step, undo_where


@attrs.frozen(kw_only=True)
class TentSettings:
    """Tent's learning rate, filter and BatchNorm mode are every method's; its own settings are YOLOZU 4.12's
    auxiliary consistency weights and detector-response variant (off by default: plain entropy minimisation).

    The auxiliary weights act on a dict output's multi-task keys (``AUX_KEYS``) when present: the student's
    outputs on a weak photometric view of the batch are pulled towards the frozen model's on the batch itself
    (L1; smooth L1 for keypoints; BCE to the sigmoid for segmentation logits). The built-in and torchvision
    detectors have none of these outputs, so there they change nothing."""

    def aux_weights(self) -> dict[str, float]:
        """The weight of each auxiliary output key (``AUX_KEYS``), zero ones left out.

        Returns:
          Output key -> weight.
        """
        return aux_key_weights(self.aux_pose_weight, self.aux_keypoints_weight, self.aux_depth_weight,
                               self.aux_seg_weight)  # fmt: skip


    aux_pose_weight: float = setting(
        0.0, "Tent: weight of the pose outputs' consistency (rot6d; log_z, offsets, k_delta scaled)", number(0),
        yolozu=True,
    )
    aux_keypoints_weight: float = setting(
        0.0, "Tent: weight of the keypoints output's consistency", number(0), yolozu=True
    )
    aux_depth_weight: float = setting(
        0.0, "Tent: weight of the depth outputs' consistency (depth, depth_map)", number(0), yolozu=True
    )
    aux_seg_weight: float = setting(
        0.0, "Tent: weight of the segmentation outputs' consistency (seg_logits, mask_logits)", number(0),
        yolozu=True,
    )
    detector_response: bool = setting(
        False, "Tent: foreground response consistency with a frozen teacher instead of entropy", yolozu=True
    )
    response_conf_min: float = setting(
        0.2, "detector response: minimum teacher foreground confidence of a selected candidate", number(0, 1),
        yolozu=True,
    )
    response_topk: int = setting(
        20, "detector response: at most this many selected candidates per image (0: no cap)",
        number(0, integer=True), yolozu=True,
    )
    response_min_selected: int = setting(
        1, "detector response: abstain from the update below this many selected candidates",
        number(1, integer=True), yolozu=True,
    )
    response_class_weight: float = setting(
        1.0, "detector response: weight of the class consistency (KL)", number(0), yolozu=True
    )
    response_bbox_weight: float = setting(
        1.0, "detector response: weight of the box consistency (smooth L1, outputs with a bbox)", number(0),
        yolozu=True,
    )
    response_entropy_weight: float = setting(
        0.05, "detector response: weight of the selected candidates' entropy", number(0), yolozu=True
    )

    def __attrs_post_init__(self) -> None:
        if 0 < self.response_topk < self.response_min_selected:
            raise ValueError(
                f"response_topk ({self.response_topk}) must be 0 or >= response_min_selected "
                f"({self.response_min_selected}): fewer candidates could never reach the minimum"
            )


def aux_key_weights(pose: float, keypoints: float, depth: float, seg: float) -> dict[str, float]:
    """YOLOZU's output keys of each auxiliary task and their weights (pose's secondary keys scaled; ``log_z`` is
    depth's at half weight when pose has none).

    Args:
      pose: the pose weight.
      keypoints: the keypoints weight.
      depth: the depth weight.
      seg: the segmentation weight.
    Returns:
      Output key -> weight, zero weights left out.
    """
    pairs = [("rot6d", pose), ("log_z", pose * 0.5), ("offsets", pose * 0.5), ("k_delta", pose * 0.3),
             ("keypoints", keypoints), ("depth", depth), ("depth_map", depth),
             ("seg_logits", seg), ("mask_logits", seg)]  # fmt: skip
    if depth > 0 and pose == 0:
        pairs.append(("log_z", depth * 0.5))
    return {key: weight for key, weight in pairs if weight > 0}


def aux_consistency(student, teacher, weights: dict[str, float]) -> tuple[Tensor | None, dict[str, Tensor]]:
    """The weighted consistency of the student's multi-task outputs with the teacher's (detached), per key
    present in both dicts with the same shape; (None, {}) when no key applies.

    Args:
      student: the student's output (a dict of tensors, else nothing applies).
      teacher: the teacher's output.
      weights: output key -> weight (``aux_key_weights``).
    Returns:
      (the weighted loss, a 0-d tensor, or None; ``aux_<key>`` -> its detached weighted term).
    """
    total, parts = None, {}
    if not isinstance(student, dict) or not isinstance(teacher, dict):
        return None, parts
    for key, weight in weights.items():
        s, t = student.get(key), teacher.get(key)
        if not isinstance(s, Tensor) or not isinstance(t, Tensor) or s.shape != t.shape:
            continue
        t = t.detach()
        if key in ("seg_logits", "mask_logits"):
            term = F.binary_cross_entropy_with_logits(s, t.sigmoid())
        elif key == "keypoints":
            term = F.smooth_l1_loss(s.reshape(s.shape[0], -1), t.reshape(t.shape[0], -1))
        else:
            term = F.l1_loss(s, t)
        parts[f"aux_{key}"] = (term * weight).detach()
        total = term * weight if total is None else total + term * weight
    return total, parts


def entropy(logits: Tensor, kind: str) -> Tensor:
    """Per-sample entropy ``H(p)`` of class logits (classes on dim 1): softmax or independent sigmoid scores.

    Args:
      logits: class logits ``(N, C, ...)``.
      kind: ``softmax`` or ``sigmoid``.
    Returns:
      ``(N, ...)`` for softmax scores (classes summed); the element-wise entropy ``(N, C, ...)`` for sigmoid ones."""
    return softmax_entropy(logits, dim=1) if kind == "softmax" else binary_entropy(logits)


def tent_loss(output, readout: Readout = DEFAULT_READOUT) -> Tensor:
    """Tent's objective on one forward output: the mean entropy of the class samples the readout gives.

    Args:
      output: a model's forward output.
      readout: reads the class samples from it.
    Returns:
      A 0-d tensor."""
    logits, kind = readout.class_samples(output)
    return entropy(logits, kind).mean()


def tent_method(
    apply: Apply,
    optimizer: optim.GradientTransformation,
    settings: TentSettings = TentSettings(),
    *,
    readout: Readout = DEFAULT_READOUT,
    bn: str = "running",
) -> Method:
    """Tent as a ``Method``: the loss is ``tent_loss(apply(batch))``; no randomness. Its loss is one plain
    forward of the batch, so that forward's output is also the batch's prediction (``clean_forward``). With
    ``settings.detector_response``: ``response_method``.

    Args:
      apply: the model as a pure function (``bridge.make_apply``).
      optimizer: the optimiser of the adapted parameters.
      settings: the method's settings.
      readout: how the method's signals are read from an output.
      bn: the BatchNorm mode while adapting (``step.BN_MODES``).
    Returns:
      The ``Method``."""
    if settings.detector_response:
        return response_method(apply, optimizer, settings, readout=readout, bn=bn)
    if settings.aux_weights():
        return aux_method(apply, optimizer, settings, readout=readout, bn=bn)

    def entropy_loss(params, buffers, batch, extra):
        del extra
        output, new_buffers = apply(params, buffers, batch, bn_mode=bn)
        return tent_loss(output, readout), LossOutput(new_buffers, {}, output)

    return Method(entropy_loss, optimizer, clean_forward=True, yolozu_row=tent_row)


AUX_METRICS = ("loss_entropy", "loss_aux_consistency", "aux_student_view_mean_abs_delta")


def aux_method(
    apply: Apply,
    optimizer: optim.GradientTransformation,
    settings: TentSettings,
    *,
    readout: Readout = DEFAULT_READOUT,
    bn: str = "running",
) -> Method:
    """Tent with YOLOZU's auxiliary consistency: the frozen model (the current weights, detached, stored
    BatchNorm statistics) on the batch is the target; the student on the weak photometric view minimises its
    entropy plus the weighted consistency of its multi-task outputs with the target's (recomputed every batch:
    nothing persists between steps).

    Args:
      apply: the model as a pure function (``bridge.make_apply``).
      optimizer: the optimiser of the adapted parameters.
      settings: Tent's settings (its auxiliary weights).
      readout: how class samples are read from an output.
      bn: the BatchNorm mode while adapting (``step.BN_MODES``).
    Returns:
      The ``Method`` (two forwards and one backward per update).
    """
    weights = settings.aux_weights()

    def loss_fn(params, buffers, batch, extra):
        del extra
        teacher, _ = apply({k: v.detach() for k, v in params.items()}, buffers, batch, bn_mode="eval")
        view = weak_photometric_view(batch)
        student, new_buffers = apply(params, buffers, view, bn_mode=bn)
        ent = tent_loss(student, readout)
        aux, parts = aux_consistency(student, teacher, weights)
        aux = ent * 0.0 if aux is None else aux
        nan = torch.full_like(ent, float("nan")).detach()
        metrics = {"loss_entropy": ent.detach(), "loss_aux_consistency": aux.detach(),
                   "aux_student_view_mean_abs_delta": (view - batch).abs().mean().detach(),
                   **{f"aux_{k}": parts.get(f"aux_{k}", nan) for k in weights}}  # fmt: skip
        return ent + aux, LossOutput(new_buffers, metrics, student)

    names = AUX_METRICS + tuple(f"aux_{k}" for k in weights)
    return Method(
        loss_fn, optimizer, metric_names=names, calls=(2, 1), optional_metrics=names[len(AUX_METRICS):],
        row_fields={"aux_target_current_batch": 1.0}, yolozu_row=tent_row,
    )  # fmt: skip


def tent_row(row: dict) -> dict:
    """YOLOZU's Tent step keys: ``loss_total`` (the step's loss) and, for the response variant, whether the
    update abstained.

    Args:
      row: a step row of Tent.
    Returns:
      YOLOZU's keys for the row (and ``update_skipped`` for the response variant).
    """
    out = {"loss_total": row["loss"]}
    if "update_abstained" in row:
        out["update_skipped"] = row["update_abstained"] == 1.0
    return out


def _boxes(output) -> object:
    """A dict output's ``bbox`` (B, Q, 4), else None."""
    box = output.get("bbox") if isinstance(output, dict) else None
    return box if box is not None and box.ndim == 3 else None


def abstain_or_keep(old: TTTState, new: TTTState, metrics: dict, noise) -> tuple[TTTState, dict]:
    """The response variant's ``finish``: an abstained step keeps the old weights, optimiser state and buffers.

    Args:
      old: the state before the step.
      new: the state after it.
      metrics: the step's metrics (``response_abstained``).
      noise: the step's randomness (unused).
    Returns:
      (the kept state, the metrics with ``update_abstained`` and ``buffers_restored_on_abstention``).
    """
    del noise
    metrics = dict(metrics)
    abstained = metrics["response_abstained"] > 0
    kept = undo_where(abstained, old, new)
    metrics.update(
        update_abstained=abstained.float(),
        buffers_restored_on_abstention=abstained.float(),
        update_norm=metrics["update_norm"] * (~abstained),
    )
    return kept, metrics


def response_method(
    apply: Apply,
    optimizer: optim.GradientTransformation,
    settings: TentSettings,
    *,
    readout: Readout = DEFAULT_READOUT,
    bn: str = "running",
) -> Method:
    """Tent's detector-response variant as a ``Method`` (module docstring): the teacher is the current weights,
    detached, on the batch with stored BatchNorm statistics; the student the same weights on the weak view.

    Args:
      apply: the model as a pure function (``bridge.make_apply``).
      optimizer: the optimiser of the adapted parameters.
      settings: Tent's settings (``response_*``).
      readout: how candidates are read from an output (``Readout.candidates``).
      bn: the student's BatchNorm mode (``step.BN_MODES``).
    Returns:
      The ``Method`` (two forwards and one backward per update).
    """
    s = settings

    def loss_fn(params, buffers, batch, extra):
        del extra
        teacher, _ = apply({k: v.detach() for k, v in params.items()}, buffers, batch, bn_mode="eval")
        student, new_buffers = apply(params, buffers, weak_photometric_view(batch), bn_mode=bn)
        teacher_logits, index = readout.candidates(teacher)
        student_logits, _ = readout.candidates(student, index)
        teacher_box, student_box = _boxes(teacher), _boxes(student)
        loss, metrics = response_terms(
            student_logits, teacher_logits.detach(), student_box if teacher_box is not None else None,
            None if teacher_box is None else teacher_box.detach(),
            confidence_min=s.response_conf_min, topk=s.response_topk, min_selected=s.response_min_selected,
            class_weight=s.response_class_weight, bbox_weight=s.response_bbox_weight,
            entropy_weight=s.response_entropy_weight, kind=readout.sample_kind or readout.score_kind,
            no_object=readout.no_object,
        )  # fmt: skip
        return loss, LossOutput(new_buffers, metrics, student)

    names = ("loss_response_class", "loss_response_bbox", "loss_response_foreground_entropy",
             "response_selected_queries", "response_selected_ratio", "response_selected_confidence_mean",
             "response_abstained", "update_abstained", "buffers_restored_on_abstention")  # fmt: skip
    # two forwards (teacher, student) and one backward per update
    return Method(loss_fn, optimizer, finish=abstain_or_keep, metric_names=names, calls=(2, 1), yolozu_row=tent_row,
                  abstains=lambda metrics: metrics["response_abstained"] > 0)


def make_tent_step(
    apply: Apply,
    optimizer: optim.GradientTransformation,
    *,
    readout: Readout = DEFAULT_READOUT,
    bn: str = "running",
    differentiate: str = "autograd",
    keep_output: bool = False,
    capture: bool = False,
):
    """Build ``tent_step(state, batch, key) -> (new_state, metrics)`` over ``apply`` (``bridge.make_apply``).

    ``key`` is accepted for a uniform step signature and unused (Tent is deterministic). ``bn`` picks the
    BatchNorm mode (``step.BN_MODES``); ``capture`` replays a CUDA graph of the step (``step.make_step``).

    Args:
      apply: the model as a pure function.
      optimizer: the optimiser of the adapted parameters.
      readout: reads the class samples from an output.
      bn: the BatchNorm mode while adapting.
      differentiate: ``autograd`` or ``func`` (``step.DIFFERENTIATE``).
      keep_output: whether the metrics keep the forward output.
      capture: whether (or with which backend) the step is replayed as a CUDA graph.
    Returns:
      ``tent_step``."""
    method = tent_method(apply, optimizer, readout=readout, bn=bn)
    return make_step(method, differentiate=differentiate, keep_output=keep_output, capture=capture)
