"""Flip TTA: mapping boxes back, weighted box fusion and NMS merges."""

import pytest

from yolozu.inference.flip import FlipTTAConfig, iou, merge_flip, mirror_detections, nms_merge, weighted_box_fusion


def det(cls, score, cx, cy=0.5, w=0.2, h=0.2):
    return {"class_id": cls, "score": score, "bbox": {"cx": cx, "cy": cy, "w": w, "h": h}}


def test_mirror_maps_cx_and_keeps_the_rest():
    d = det(3, 0.9, 0.2, 0.4, 0.1, 0.3)
    (m,) = mirror_detections([d])
    assert m["bbox"] == {"cx": 0.8, "cy": 0.4, "w": 0.1, "h": 0.3} and m["class_id"] == 3 and m["score"] == 0.9
    (twice,) = mirror_detections(mirror_detections([d]))
    assert twice["bbox"]["cx"] == pytest.approx(0.2)


def test_iou_closed_forms():
    assert iou(det(0, 1, 0.5)["bbox"], det(0, 1, 0.5)["bbox"]) == pytest.approx(1.0)
    assert iou(det(0, 1, 0.2)["bbox"], det(0, 1, 0.8)["bbox"]) == 0.0
    # half-overlapping squares of side 0.2 shifted by 0.1: inter 0.02, union 0.06
    assert iou(det(0, 1, 0.5)["bbox"], det(0, 1, 0.6)["bbox"]) == pytest.approx(1 / 3)


def test_wbf_fuses_matching_boxes_by_score_weight_and_halves_lone_ones():
    a, b = det(1, 0.9, 0.50), det(1, 0.3, 0.52)
    lone = det(2, 0.8, 0.2)
    fused = weighted_box_fusion([[a, lone], [b]], iou_threshold=0.55)
    assert len(fused) == 2
    pair = next(f for f in fused if f["class_id"] == 1)
    assert pair["bbox"]["cx"] == pytest.approx((0.9 * 0.50 + 0.3 * 0.52) / 1.2)
    assert pair["score"] == pytest.approx(0.6)
    assert next(f for f in fused if f["class_id"] == 2)["score"] == pytest.approx(0.4)


def test_wbf_never_fuses_different_classes():
    assert len(weighted_box_fusion([[det(1, 0.9, 0.5)], [det(2, 0.9, 0.5)]])) == 2


def test_nms_keeps_the_best_of_overlapping_same_class_boxes():
    kept = nms_merge([[det(1, 0.9, 0.5), det(2, 0.7, 0.5)], [det(1, 0.8, 0.51)]])
    assert [(d["class_id"], d["score"]) for d in kept] == [(1, 0.9), (2, 0.7)]


def test_merge_of_a_symmetric_branch_pair_is_the_identity_branch():
    identity = [det(0, 0.9, 0.3), det(0, 0.9, 0.7)]
    merged = merge_flip(identity, identity, FlipTTAConfig())
    assert sorted(d["bbox"]["cx"] for d in merged) == pytest.approx([0.3, 0.7])
    assert all(d["score"] == pytest.approx(0.9) for d in merged)


def test_merge_caps_detections():
    many = [det(0, 1 - i / 100, i / 50, w=0.01, h=0.01) for i in range(40)]
    assert len(merge_flip(many, [], FlipTTAConfig(max_detections=10))) == 10
