"""Machine-readable profiles of the TTT methods (YOLOZU 4.12's ``TTT_METHOD_PROFILES``), true of this project's.

YOLOZU's keys with values that describe the methods here: which paper each follows and where it departs from it
(docs/ttt.md, "How the methods differ from their papers"), how a detector's outputs are read (the readout's
candidates), and the efficacy measured by the project's shift benchmark (docs/benchmarks.md: online, severity 5,
mAP50 points over BatchNorm statistics alone). ``get_ttt_method_profile`` returns a deep copy and fails closed on
an unknown method.
"""

from __future__ import annotations

from copy import deepcopy
from typing import Any

import attrs

from yolozu.tta.methods import entry

_READOUT = {
    "class_axis": "readout",
    "foreground_selection": "none",
    "query_semantics": (
        "the readout's candidates: classifier rows, query logits (B, Q, C) as queries, a dense detector's top-k "
        "heatmap peaks, torchvision's candidates fixed by the image size; each candidate is one class distribution"
    ),
    "query_correspondence": "same_candidates_within_a_step",
    "no_object_semantics": "included_if_present_in_the_scores (softmax); none for sigmoid scores",
    "scope": "readout_scores_or_samples",
}
_EVIDENCE = "docs/benchmarks.md (online, severity 5, mAP50 points over BatchNorm statistics alone)"


def _profile(paper: str, implementation_class: str, efficacy: str, loss: dict, notes: str, **extra) -> dict:
    return {
        "profile_id": "yolozu_ttt_functional_v1",
        "runnable": True,
        "maturity": "research",
        "fidelity": "paper_objective_with_documented_departures",
        "implementation_class": implementation_class,
        "reference_faithful": False,
        "paper": paper,
        "efficacy": efficacy,
        "efficacy_evidence": _EVIDENCE,
        "paper_departures": "docs/ttt.md, How each method differs from its paper",
        "loss": {**loss, "detector_logits": deepcopy(_READOUT)},
        "notes": notes,
        **extra,
    }


TTT_METHOD_PROFILES: dict[str, dict[str, Any]] = {
    "tent": _profile(
        "Wang et al., ICLR 2021",
        "detector_adapted",
        "gain_measured",
        {"primary": "mean_entropy_of_readout_candidates", "optional": "aux_consistency_on_yolozu_output_keys"},
        "The paper's entropy objective over the readout's candidates (a detector's top-k peaks); any parameter "
        "filter, guards.",
    ),
    "mim": _profile(
        "masked image modelling as test-time training (Gandelsman et al., NeurIPS 2022)",
        "conditional_model_hook",
        "no_gain_measured",
        {"primary": "masked_reconstruction_through_the_readout_recon_hook"},
        "Needs the model's reconstruction hook (the readout's recon_kwargs/recon) or YOLOZU's structured hook "
        "(enable_mim: forward(..., return_mim=True) -> output['mim']); other models are refused.",
        runtime_preconditions=["reconstruction_hook"],
    ),
    "cotta": _profile(
        "Wang et al., CVPR 2022",
        "paper_method_on_readout",
        "gain_measured",
        {
            "primary": "cross_entropy_to_ema_teacher_pseudo_labels",
            "augmentation": "teacher_views_mapped_back_by_the_readout_flip",
            "augmented_view_query_correspondence": "established_by_readout_flip_back",
        },
        "EMA teacher, augmentation-averaged pseudo-labels when the teacher is unsure, stochastic restore.",
        paper_preset="cotta_paper",
    ),
    "eata": _profile(
        "Niu et al., ICML 2022",
        "paper_method_on_readout",
        "gain_measured",
        {"primary": "reliable_non_redundant_entropy_plus_fisher_anchor", "selection_unit": "readout_candidate"},
        "Sample selection by entropy margin and cosine redundancy; Fisher anchor when calibration data is given.",
        paper_preset="eata_paper",
    ),
    "sar": _profile(
        "Niu et al., ICLR 2023",
        "paper_method_on_readout",
        "gain_measured",
        {"primary": "sharpness_aware_reliable_entropy"},
        "Reliable-sample entropy, SAM's two passes, model recovery; no step on a batch without reliable samples.",
    ),
}
"""One profile per YOLOZU method (the project's own methods, e.g. selftrain, are described in docs/ttt.md)."""

_RESPONSE_LOSS = {
    "primary": "selected_foreground_response_consistency",
    "components": ["foreground_class_kl", "bbox_smooth_l1", "foreground_entropy"],
    "detector_logits": {
        "class_axis": "last",
        "foreground_selection": "teacher_confidence_and_no_object_margin",
        "query_semantics": "same candidates (queries, or the teacher's top-k peaks) of the original and a weak "
        "photometric view",
        "query_correspondence": "same_query_index_shape_preserving_view",
        "no_object_semantics": "final_class_excluded_from_foreground_distillation",
        "scope": "readout_candidates_and_bbox",
    },
}
_ABSTENTION = {
    "condition": "selected_foreground_queries_below_configured_minimum",
    "effect": "skip_backward_and_optimizer_step_and_restore_norm_buffers_when_no_auxiliary_loss_is_active",
    "report_fields": ["response_abstained", "update_abstained", "buffers_restored_on_abstention", "abstained_steps"],
}


def get_ttt_method_profile(method: str, *, detector_response: bool = False) -> dict[str, Any]:
    """The profile of ``method`` (a deep copy: mutating it changes nothing here); with ``detector_response``
    Tent's response variant.

    Raises:
      ValueError: an unknown method, or ``detector_response`` for a method other than tent.

    Args:
      method: a method name (any case).
      detector_response: the profile of Tent's response variant.
    Returns:
      The profile (a fresh deep copy).
    """
    key = str(method or "").strip().lower()
    if key not in TTT_METHOD_PROFILES:
        choices = ", ".join(sorted(TTT_METHOD_PROFILES))
        raise ValueError(f"unknown TTT method profile {method!r}; expected one of: {choices}")
    profile = deepcopy(TTT_METHOD_PROFILES[key])
    if detector_response:
        if "detector_response" not in attrs.fields_dict(entry(key).settings):
            raise ValueError(f"detector response selection is supported only for tent, not {method!r}")
        profile.update(
            profile_id="yolozu_detection_response_v1",
            loss=deepcopy(_RESPONSE_LOSS),
            abstention=deepcopy(_ABSTENTION),
            efficacy="not_established",
            notes="Detector-native response consistency with a frozen teacher; not benchmarked here.",
        )
    return profile
