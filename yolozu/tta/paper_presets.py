"""The papers' methods as presets: each run as its paper's reference code runs it, in ``TTTConfig`` field values.

Kept apart from YOLOZU's own presets (``yolozu.tta.presets`` adds these to its table): a paper preset sets more
than YOLOZU's presets do (the optimiser, the BatchNorm mode, the schedule and the method's own settings), and a
plain ``--ttt`` never picks one. docs/ttt.md lists, method by method, what still differs from the paper.
"""

from __future__ import annotations

from typing import Any

PAPERS: dict[str, dict[str, Any]] = {
    # EATA as Niu et al. (ICML 2022) run it on ImageNet-C: SGD at lr 0.00025 with momentum 0.9 on batches of 64,
    # the BatchNorm affine parameters adapted with test-batch statistics, online over every batch, each batch
    # predicted by the forward it adapts on; E0 = 0.4 ln C, d_margin 0.05, alpha 2000 with Fisher data
    # (--ttt-eata-fisher-data; the paper's 2,000 in-distribution images), no step without a kept sample, and
    # none of YOLOZU's floors, stops, L2 anchor or guards
    "eata_paper": {
        "method": "eata", "update_filter": "norm_only", "bn_mode": "batch", "optimizer": "sgd", "lr": 0.00025,
        "momentum": 0.9, "batch_size": 64, "schedule": "online", "max_batches": None, "online_predict": "adapt_forward",
        "eata_conf_min": 0.0, "eata_entropy_min": 0.0, "eata_max_skip_streak": None, "eata_selected_ratio_min": 0.0,
        "eata_min_valid_dets": 1, "eata_anchor_lambda": 0.0, "eata_e_margin": None, "eata_d_margin": 0.05,
        "eata_fisher_alpha": 2000.0,
    },
    # CoTTA as Wang et al. (CVPR 2022) run it on CIFAR10-C: Adam at lr 1e-3 on batches of 200, every parameter
    # adapted with test-batch statistics, online over every batch; the teacher's logits averaged over 32 random
    # strong views for the whole batch when its mean source confidence is below the threshold (0.92, or derived
    # from --ttt-cotta-threshold-data), predictions with the teacher before the update
    "cotta_paper": {
        "method": "cotta", "update_filter": "all", "bn_mode": "batch", "optimizer": "adam", "lr": 1e-3,
        "batch_size": 200, "schedule": "online", "max_batches": None, "cotta_views": "random",
        "cotta_random_views": 32, "cotta_aggregation": "logit_mean", "cotta_threshold_scope": "batch",
        "cotta_predict_with": "teacher_before_update", "cotta_ema_momentum": 0.999, "cotta_restore_prob": 0.01,
        "cotta_confidence_threshold": 0.92,
    },
}  # fmt: skip
"""The papers' methods as their reference code runs them (docs/ttt.md lists what still differs)."""
