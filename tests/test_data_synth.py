"""Synthetic digit data: determinism, YOLO layout, labels that match the pasted digits."""

import time
from pathlib import Path

import numpy as np
import pytest

from yolozu.data import build_manifest
from yolozu.demo import synth
from yolozu.demo.synth import SynthSpec, make_dataset, render_sample, write_split

SPEC = SynthSpec(image_size=64, min_objects=2, max_objects=5, min_digit=10, max_digit=24)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path):
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        write_split(tmp_path / name, "val", 6, seed=seed, spec=SPEC)
    a, b, c = (_files(tmp_path / n) for n in "abc")
    assert len(a) == 12 and a == b
    assert a.keys() == c.keys() and a != c
    assert sorted(a)[0] == "images/val/000000.png" and "labels/val/000005.txt" in a


def test_make_dataset_layout_reads_back(tmp_path):
    make_dataset(tmp_path, seed=1, n_train=5, n_val=3, spec=SPEC)
    train, val = build_manifest(tmp_path, "train"), build_manifest(tmp_path, "val")
    assert len(train) == 5 and len(val) == 3
    assert all(SPEC.min_objects <= len(r["labels"]) <= SPEC.max_objects for r in train + val)
    assert not list((tmp_path / "images").glob(".tmp*"))  # temporary folders are gone


def test_train_and_val_use_different_samples(tmp_path):
    make_dataset(tmp_path, seed=1, n_train=3, n_val=3, spec=SPEC)
    for i in range(3):
        train, val = (tmp_path / f"images/{s}/{i:06d}.png" for s in ("train", "val"))
        assert train.read_bytes() != val.read_bytes()


@pytest.mark.parametrize("split", ["train", "val"])
def test_labels_in_range_and_count(split):
    rng = np.random.default_rng(0)
    classes = []
    for _ in range(60):
        img, labels = render_sample(rng, SPEC, split)
        assert img.shape == (64, 64, 3) and img.dtype == np.uint8
        assert SPEC.min_objects <= len(labels) <= SPEC.max_objects
        for o in labels:
            assert set(o) == {"class_id", "cx", "cy", "w", "h"}
            assert 0 <= o["class_id"] <= 9
            assert 0 <= o["cx"] - o["w"] / 2 and o["cx"] + o["w"] / 2 <= 1 + 1e-9
            assert 0 <= o["cy"] - o["h"] / 2 and o["cy"] + o["h"] / 2 <= 1 + 1e-9
            assert 0.8 * SPEC.min_digit <= o["h"] * 64 <= SPEC.max_digit
            assert o["w"] > 0
        classes += [o["class_id"] for o in labels]
    assert set(classes) == set(range(10))


def _pixel_box(o: dict, s: int) -> tuple[int, int, int, int]:
    x0, y0 = round((o["cx"] - o["w"] / 2) * s), round((o["cy"] - o["h"] / 2) * s)
    return x0, y0, x0 + round(o["w"] * s), y0 + round(o["h"] * s)


@pytest.mark.parametrize("seed", range(8))
def test_boxes_are_the_tight_boxes_of_the_pasted_ink(seed):
    s = SPEC.image_size
    background = synth._background(np.random.default_rng(seed), SPEC, "val")  # the first draws of render_sample
    img, labels = render_sample(np.random.default_rng(seed), SPEC, "val")
    changed = np.any(img != background, axis=2)
    inside = np.zeros_like(changed)
    for o in labels:
        x0, y0, x1, y1 = _pixel_box(o, s)
        inside[y0:y1, x0:x1] = True
        patch = changed[y0:y1, x0:x1]
        assert patch.mean() > 0.1  # a digit was pasted there
        # tight: ink reaches every side of the box
        assert patch[0].any() and patch[-1].any() and patch[:, 0].any() and patch[:, -1].any()
    assert not (changed & ~inside).any()  # no ink outside the boxes


def test_train_and_val_digits_are_disjoint():
    pool = synth._digit_pool("mnist")
    for k in range(10):
        train = {d.tobytes() + bytes(d.shape) for d in pool["train"][k]}
        val = {d.tobytes() + bytes(d.shape) for d in pool["val"][k]}
        assert len(val) >= 50 and len(train) >= 4 * len(val) - 10
        assert not train & val


def test_jitter_is_deterministic_and_changes_the_image():
    a = render_sample(np.random.default_rng(5), SPEC, jitter=True)
    b = render_sample(np.random.default_rng(5), SPEC, jitter=True)
    c = render_sample(np.random.default_rng(5), SPEC, jitter=False)
    assert np.array_equal(a[0], b[0]) and a[1] == b[1]
    assert not np.array_equal(a[0], c[0])


def test_other_options_and_errors():
    img, labels = render_sample(np.random.default_rng(0), SynthSpec(image_size=48, min_digit=8, max_digit=20,
                                                                   digits="sklearn"), "val")
    assert img.shape == (48, 48, 3) and labels
    held = SynthSpec(val_backgrounds="heldout")
    assert synth._background_names(held, "val") == synth.HELDOUT_PHOTOS
    assert not set(synth._background_names(held, "train")) & set(synth.HELDOUT_PHOTOS)
    with pytest.raises(ValueError, match="split must be"):
        render_sample(np.random.default_rng(0), SPEC, "test")
    with pytest.raises(ValueError, match="min_objects"):
        SynthSpec(min_objects=3, max_objects=2)
    with pytest.raises(ValueError, match="max_digit"):
        SynthSpec(image_size=32)


def test_render_is_fast():
    rng = np.random.default_rng(0)
    render_sample(rng)  # loads the digit pool and photographs
    t = time.perf_counter()
    for _ in range(100):
        render_sample(rng)
    assert (time.perf_counter() - t) / 100 < 0.02  # about 1 ms on one core; generous for shared machines
