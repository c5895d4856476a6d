"""The ImageNet-C corruptions (Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to Common
Corruptions and Perturbations", ICLR 2019) as COCO-C applies them to detection images (Michaelis et al.,
"Benchmarking Robustness in Object Detection", 2019): the reference implementation, the ``imagecorruptions``
package (``imagecorruptions-imaug`` on the index, which ships the frost photographs), for every corruption
but elastic_transform, which is ours because its boxes must move with the objects (docs/data.md).

``CORRUPTIONS`` are the paper's 15 test corruptions, ``HELDOUT_CORRUPTIONS`` its 4 validation corruptions
(for tuning hyperparameters). All randomness comes from the generator passed in, so a corruption is
reproducible: the package draws from numpy's global generator, which is seeded from it for the call and
restored after.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage

__all__ = [
    "CORRUPTIONS", "HELDOUT_CORRUPTIONS", "ALL_CORRUPTIONS", "GEOMETRIC_CORRUPTIONS", "SEVERITIES", "MIN_SIDE",
    "corrupt", "corrupt_with_labels", "reference_corrupt",
]

CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise", "shot_noise", "impulse_noise",
    "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog", "brightness",
    "contrast", "elastic_transform", "pixelate", "jpeg_compression",
)
HELDOUT_CORRUPTIONS: tuple[str, ...] = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
ALL_CORRUPTIONS: tuple[str, ...] = CORRUPTIONS + HELDOUT_CORRUPTIONS
SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)
#: Corruptions that move image content; their labels must move too (``corrupt_with_labels``).
GEOMETRIC_CORRUPTIONS: tuple[str, ...] = ("elastic_transform",)
#: The smallest image side the reference implementation accepts.
MIN_SIDE = 32
#: Corruptions whose reference function takes its own ``seed`` besides numpy's global generator.
_SEEDED = ("impulse_noise", "glass_blur")

Rng = np.random.Generator


def _reference() -> Any:
    """The ``imagecorruptions`` package (imported on first use: the library never needs it)."""
    try:
        import imagecorruptions
    except ImportError as e:
        raise ImportError(
            f"the demo corruptions need the imagecorruptions package ({e}): pip install 'yolozu[demo]' "
            "(imagecorruptions-imaug)"
        ) from e
    return imagecorruptions


def reference_corrupt(image: np.ndarray, name: str, severity: int, rng: Rng) -> np.ndarray:
    """The ``imagecorruptions`` package's corruption ``name`` of an (H, W, 3) uint8 image, H and W >= 32,
    drawing only from ``rng``: numpy's global generator is seeded from it for the call and restored after.

    Returns:
        (H, W, 3) uint8.
    """
    package = _reference()
    seed = int(rng.integers(2**31 - 1))
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        extra = {"seed": seed} if name in _SEEDED else {}
        out = package.corrupt(image, severity=int(severity), corruption_name=name, **extra)
    finally:
        np.random.set_state(state)
    return np.ascontiguousarray(out, dtype=np.uint8)


# --------------------------------------------------------------------------------------------- elastic_transform
def _f(img: np.ndarray) -> np.ndarray:
    return img.astype(np.float32) / 255.0


def _u8(x: np.ndarray) -> np.ndarray:
    return (np.clip(np.nan_to_num(x, nan=0.0), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _affine_from_points(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 2x3 affine matrix mapping three (x, y) points ``src`` onto ``dst``."""
    a = np.hstack([src, np.ones((3, 1))])
    return np.linalg.solve(a, dst).T


def _elastic_maps(rng: Rng, severity: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The random draws of elastic_transform: inverse affine (3x3) and the displacement field (dy, dx).

    The published (alpha, sigma, affine) are multiples of 244 px for 224 px images; here they scale with the
    image side (244 * side / 224), so a 224 px image gets exactly the published values.
    """
    fa, fs, fff = ((2, 0.7, 0.1), (2, 0.08, 0.2), (0.05, 0.01, 0.02), (0.07, 0.01, 0.02), (0.12, 0.01, 0.02))[
        severity - 1
    ]
    unit = 244.0 * min(h, w) / 224.0
    alpha, sigma, affine = fa * unit, fs * unit, fff * unit
    centre = np.array([w // 2, h // 2], dtype=np.float64)
    half = min(h, w) // 3
    pts1 = np.array([centre + half, [centre[0] + half, centre[1] - half], centre - half], dtype=np.float64)
    pts2 = pts1 + rng.uniform(-affine, affine, size=pts1.shape)
    m = _affine_from_points(pts1, pts2)  # output pixel p comes from input m^-1 p
    inv = np.linalg.inv(np.vstack([m, [0, 0, 1]]))
    dx, dy = (
        ndimage.gaussian_filter(rng.uniform(-1, 1, size=(h, w)), sigma, mode="reflect", truncate=3.0) * alpha
        for _ in range(2)
    )
    return inv, dy, dx


def _apply_affine(inv: np.ndarray, y: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return inv[1, 0] * x + inv[1, 1] * y + inv[1, 2], inv[0, 0] * x + inv[0, 1] * y + inv[0, 2]


def _move_boxes(labels: list[dict], src_y: np.ndarray, src_x: np.ndarray, min_kept: float = 0.3) -> list[dict]:
    """Labels after a warp whose output pixel (i, j) shows source point (src_y, src_x)[i, j].

    A box becomes the tight box of the largest connected region of output pixels that show its inside; it is
    dropped when that region is smaller than ``min_kept`` of the box's original area (warped out of the image).
    """
    h, w = src_y.shape
    out = []
    for o in labels:
        x0, x1 = (o["cx"] - o["w"] / 2) * w - 0.5, (o["cx"] + o["w"] / 2) * w - 0.5  # in pixel-centre coordinates
        y0, y1 = (o["cy"] - o["h"] / 2) * h - 0.5, (o["cy"] + o["h"] / 2) * h - 0.5
        inside = (src_x >= x0) & (src_x < x1) & (src_y >= y0) & (src_y < y1)
        regions, n = ndimage.label(inside, structure=np.ones((3, 3)))
        if n == 0:
            continue
        sizes = np.bincount(regions.ravel())[1:]
        if sizes.max() < min_kept * o["w"] * w * o["h"] * h:
            continue
        rows, cols = np.nonzero(regions == 1 + int(sizes.argmax()))
        bx0, bx1, by0, by1 = cols.min(), cols.max() + 1, rows.min(), rows.max() + 1
        out.append({"class_id": o["class_id"], "cx": (bx0 + bx1) / 2 / w, "cy": (by0 + by1) / 2 / h,
                    "w": (bx1 - bx0) / w, "h": (by1 - by0) / h})
    return out


def _elastic(img: np.ndarray, severity: int, rng: Rng, labels: list[dict] | None) -> tuple[np.ndarray, list | None]:
    x = _f(img)
    h, w = x.shape[:2]
    inv, dy, dx = _elastic_maps(rng, severity, h, w)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    warp = _apply_affine(inv, yy, xx)
    warped = np.stack([ndimage.map_coordinates(x[:, :, c], warp, order=1, mode="mirror") for c in range(3)], 2)
    coords = (yy + dy, xx + dx)
    out = np.stack([ndimage.map_coordinates(warped[:, :, c], coords, order=1, mode="reflect") for c in range(3)], 2)
    if labels is None:
        return _u8(out), None
    # where each output pixel comes from in the clean image, both stages composed. Coordinates are not folded
    # at the borders, so the mirrored copies that the border modes show there are not given boxes.
    sy, sx = _apply_affine(inv, coords[0], coords[1])
    return _u8(out), _move_boxes(labels, sy, sx)


def elastic_transform(img: np.ndarray, severity: int, rng: Rng) -> np.ndarray:
    """A random affine warp, then a smooth random displacement field (alpha * Gaussian-smoothed noise), each a
    bilinear resampling. It moves objects: ``corrupt_with_labels`` moves their boxes with them."""
    return _elastic(img, severity, rng, None)[0]


def _check(image: np.ndarray, name: str, severity: int) -> np.ndarray:
    if name not in ALL_CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; allowed: {', '.join(ALL_CORRUPTIONS)}")
    if isinstance(severity, bool) or not isinstance(severity, (int, np.integer)) or severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {', '.join(map(str, SEVERITIES))}, got {severity!r}")
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8, got shape {image.shape} dtype {image.dtype}")
    if min(image.shape[:2]) < MIN_SIDE:
        h, w = image.shape[:2]
        raise ValueError(f"image must be at least {MIN_SIDE} x {MIN_SIDE} pixels, got {w} x {h}")
    return image


def corrupt(image: np.ndarray, name: str, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Apply corruption ``name`` at ``severity`` (1-5) to an (H, W, 3) uint8 image, H and W >= ``MIN_SIDE``;
    returns (H, W, 3) uint8.

    Deterministic given ``rng`` (the only source of randomness).
    """
    image = _check(image, name, severity)
    if name == "elastic_transform":
        out = elastic_transform(image, int(severity), rng)
    else:
        out = reference_corrupt(image, name, int(severity), rng)
    assert out.shape == image.shape and out.dtype == np.uint8
    return out


def corrupt_with_labels(
    image: np.ndarray, labels: list[dict], name: str, severity: int, rng: np.random.Generator
) -> tuple[np.ndarray, list[dict]]:
    """``corrupt`` (same image for the same ``rng``) plus the labels ``[{"class_id", "cx", "cy", "w", "h"}]``
    of the result: boxes follow the warp of the geometric corruptions (``GEOMETRIC_CORRUPTIONS``), which
    would otherwise move objects out of their boxes; other corruptions keep them as they are."""
    if name not in GEOMETRIC_CORRUPTIONS:
        return corrupt(image, name, severity, rng), [dict(o) for o in labels]
    image = _check(image, name, severity)
    out, moved = _elastic(image, int(severity), rng, labels)
    return out, moved  # type: ignore[return-value]
