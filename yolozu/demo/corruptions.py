"""The ImageNet-C corruptions (Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to Common
Corruptions and Perturbations", ICLR 2019), written on numpy/scipy/scikit-image/PIL.

``CORRUPTIONS`` are the paper's 15 test corruptions, ``HELDOUT_CORRUPTIONS`` its 4 validation corruptions
(for tuning hyperparameters). Severity parameters are the published ImageNet-C ones; where the original needs
something unavailable here (ImageMagick, OpenCV, frost photographs) an equivalent is used: see docs/data.md.
All randomness comes from the generator passed in, so a corruption is reproducible.
"""

from __future__ import annotations

import io
from typing import Callable

import numpy as np
from PIL import Image
from scipy import ndimage
from scipy.signal import fftconvolve

__all__ = [
    "CORRUPTIONS", "HELDOUT_CORRUPTIONS", "ALL_CORRUPTIONS", "GEOMETRIC_CORRUPTIONS", "SEVERITIES", "corrupt",
    "corrupt_with_labels",
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

_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
Rng = np.random.Generator


# --------------------------------------------------------------------------------------------- helpers
def _f(img: np.ndarray) -> np.ndarray:
    return img.astype(np.float32) / 255.0


def _u8(x: np.ndarray) -> np.ndarray:
    return (np.clip(np.nan_to_num(x, nan=0.0), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _gaussian(x: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur over the two spatial axes (edge-replicating border, as skimage.filters.gaussian)."""
    s = (sigma, sigma) + (0,) * (x.ndim - 2)
    return ndimage.gaussian_filter(x, sigma=s, mode="nearest", truncate=4.0)


def _filter(x: np.ndarray, kernel: np.ndarray, pad_mode: str) -> np.ndarray:
    """Correlate every channel of (H, W, C) ``x`` with a 2-D ``kernel`` (FFT), padding the border by ``pad_mode``."""
    kh, kw = kernel.shape
    py, px = kh // 2, kw // 2
    padded = np.pad(x, ((py, kh - 1 - py), (px, kw - 1 - px), (0, 0)), mode=pad_mode)
    out = fftconvolve(padded, kernel[::-1, ::-1, None].astype(np.float32), mode="valid", axes=(0, 1))
    return out.astype(np.float32)


def _zoom_center(x: np.ndarray, zoom: float) -> np.ndarray:
    """Magnify the centre of (H, W[, C]) float ``x`` by ``zoom`` >= 1, keeping its size (bilinear)."""
    h, w = x.shape[:2]
    bw, bh = w / zoom, h / zoom
    box = ((w - bw) / 2, (h - bh) / 2, (w + bw) / 2, (h + bh) / 2)
    chans = [x] if x.ndim == 2 else [x[:, :, c] for c in range(x.shape[2])]
    out = [
        np.asarray(Image.fromarray(np.ascontiguousarray(c, dtype=np.float32), mode="F").resize(
            (w, h), Image.BILINEAR, box=box))
        for c in chans
    ]
    return np.array(out[0]) if x.ndim == 2 else np.stack(out, axis=2)


def _motion_kernel(radius: int, sigma: float, angle_deg: float) -> np.ndarray:
    """A one-sided line kernel of 2*radius+1 taps with Gaussian weights (as ImageMagick's -motion-blur).

    Tap ``i`` sits ``i`` px from the centre along ``angle_deg``; taps are splatted bilinearly onto the grid.
    """
    taps = 2 * radius + 1
    i = np.arange(taps, dtype=np.float64)
    weights = np.exp(-(i**2) / (2.0 * sigma**2))
    weights /= weights.sum()
    a = np.deg2rad(angle_deg)
    dx, dy = i * np.cos(a), i * np.sin(a)
    size = 2 * taps + 1
    k = np.zeros((size, size), dtype=np.float64)
    c = taps
    for wt, x, y in zip(weights, dx, dy):
        x0, y0 = int(np.floor(x)), int(np.floor(y))
        fx, fy = x - x0, y - y0
        k[c + y0, c + x0] += wt * (1 - fx) * (1 - fy)
        k[c + y0, c + x0 + 1] += wt * fx * (1 - fy)
        k[c + y0 + 1, c + x0] += wt * (1 - fx) * fy
        k[c + y0 + 1, c + x0 + 1] += wt * fx * fy
    return k


def _motion_blur(x: np.ndarray, radius: int, sigma: float, angle_deg: float) -> np.ndarray:
    """Motion blur of (H, W, C) float ``x``: each pixel averages the pixels behind it along a line."""
    return _filter(x, _motion_kernel(radius, sigma, angle_deg), "edge")


def _rgb2hsv(x: np.ndarray) -> np.ndarray:
    from skimage.color import rgb2hsv

    return rgb2hsv(x).astype(np.float32)


def _hsv2rgb(x: np.ndarray) -> np.ndarray:
    from skimage.color import hsv2rgb

    return hsv2rgb(x).astype(np.float32)


def _plasma(rng: Rng, size: int, decay: float) -> np.ndarray:
    """Diamond-square plasma fractal on a ``size`` x ``size`` torus (size a power of 2), normalised to [0, 1].

    The random offset at each level is ``wibble * U(-wibble, wibble)``, ``wibble`` starting at 100 and divided
    by ``decay`` per level, as in ImageNet-C's fog.
    """
    a = np.zeros((size, size), dtype=np.float64)
    step, wibble = size, 100.0

    def noisy(mean: np.ndarray) -> np.ndarray:
        return mean + wibble * rng.uniform(-wibble, wibble, mean.shape)

    while step >= 2:
        half = step // 2
        corners = a[0::step, 0::step]
        s = corners + np.roll(corners, -1, axis=0)
        s = s + np.roll(s, -1, axis=1)
        a[half::step, half::step] = noisy(s / 4.0)  # square step: centre = mean of 4 corners
        corners, centres = a[0::step, 0::step], a[half::step, half::step]
        # diamond step: each edge midpoint = mean of its 2 corners and the 2 square centres beside it
        top = corners + np.roll(corners, -1, axis=1) + centres + np.roll(centres, 1, axis=0)
        a[0::step, half::step] = noisy(top / 4.0)
        left = corners + np.roll(corners, -1, axis=0) + centres + np.roll(centres, 1, axis=1)
        a[half::step, 0::step] = noisy(left / 4.0)
        step, wibble = half, wibble / decay
    a -= a.min()
    return (a / a.max()).astype(np.float32)


_FROST_BANK: list[np.ndarray] = []
_FROST_SIZE = 512


def _draw_crystal(canvas: np.ndarray, rng: Rng, x: float, y: float, angle: float, length: float, depth: int,
                  intensity: float) -> None:
    """Draw one ice needle (anti-aliased line) and, recursively, side branches at +-60 degrees (hexagonal ice)."""
    from skimage.draw import line_aa

    h, w = canvas.shape
    x2, y2 = x + length * np.cos(angle), y + length * np.sin(angle)
    rr, cc, val = line_aa(int(round(y)), int(round(x)), int(round(y2)), int(round(x2)))
    ok = (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
    np.maximum.at(canvas, (rr[ok], cc[ok]), (val[ok] * intensity).astype(np.float32))
    if depth == 0 or length < 4:
        return
    spacing = max(2.0, length / rng.uniform(5, 9))
    t = spacing * rng.uniform(0.3, 1.0)
    while t < length:
        branch = length * 0.55 * (1 - t / length) * rng.uniform(0.6, 1.2)  # shorter towards the tip: a feather
        for side in (-1, 1):
            if rng.random() < 0.85:
                turn = angle + side * np.pi / 3 + rng.normal(0.0, 0.12)
                bx, by = x + t * np.cos(angle), y + t * np.sin(angle)
                _draw_crystal(canvas, rng, bx, by, turn, branch, depth - 1, intensity * 0.85)
        t += spacing * rng.uniform(0.7, 1.3)


def _frost_texture(seed: int, size: int = _FROST_SIZE) -> np.ndarray:
    """One procedural frost picture (size, size, 3) in [0, 1]: feathery ice crystals over a patchy pale haze,
    tinted blue-white (mean about 0.45). Stands in for the paper's six frost photographs."""
    rng = np.random.default_rng(seed)
    canvas = np.zeros((size, size), dtype=np.float32)
    for _ in range(int(rng.integers(40, 70))):
        x, y = rng.uniform(-20, size + 20, size=2)
        angle, length, strength = rng.uniform(0, 2 * np.pi), rng.uniform(30, 150), rng.uniform(0.5, 1.0)
        _draw_crystal(canvas, rng, x, y, angle, length, 2, strength)
    crystals = ndimage.gaussian_filter(canvas, 0.6)
    haze = ndimage.gaussian_filter(rng.random((size, size)).astype(np.float32), 40)
    grain = ndimage.gaussian_filter(rng.random((size, size)).astype(np.float32), 1.0)
    haze, grain = ((v - v.min()) / max(float(np.ptp(v)), 1e-6) for v in (haze, grain))
    frost = 0.15 + 0.35 * haze + 0.12 * grain + 0.75 * crystals
    tint = np.array([0.86, 0.93, 1.0], dtype=np.float32)
    return np.clip(frost[:, :, None] * tint, 0.0, 1.0).astype(np.float32)


def _frost_crop(rng: Rng, h: int, w: int) -> np.ndarray:
    """A random crop of a random one of six fixed frost pictures (made once, lazily), as the paper does."""
    if not _FROST_BANK:
        _FROST_BANK.extend(_frost_texture(seed) for seed in range(6))
    tex = _FROST_BANK[int(rng.integers(len(_FROST_BANK)))]
    if h > tex.shape[0] or w > tex.shape[1]:  # larger images: stretch the picture to cover them
        f = max(h, w) / tex.shape[0]
        side = int(np.ceil(tex.shape[0] * f))
        tex = np.stack([np.asarray(Image.fromarray(tex[:, :, c], mode="F").resize((side, side), Image.BICUBIC))
                        for c in range(3)], axis=2)
    y0 = int(rng.integers(0, tex.shape[0] - h + 1))
    x0 = int(rng.integers(0, tex.shape[1] - w + 1))
    return tex[y0 : y0 + h, x0 : x0 + w]


# --------------------------------------------------------------------------------------------- noise
def gaussian_noise(img: np.ndarray, severity: int, rng: Rng) -> np.ndarray:
    """Additive Gaussian noise with std c (on [0, 1])."""
    c = (0.08, 0.12, 0.18, 0.26, 0.38)[severity - 1]
    x = _f(img)
    return _u8(x + rng.normal(scale=c, size=x.shape))


def shot_noise(img: np.ndarray, severity: int, rng: Rng) -> np.ndarray:
    """Poisson (photon) noise: Poisson(x * c) / c."""
    c = (60, 25, 12, 5, 3)[severity - 1]
    x = _f(img)
    return _u8(rng.poisson(x * c) / c)


def impulse_noise(img: np.ndarray, severity: int, rng: Rng) -> np.ndarray:
    """Salt-and-pepper noise: a fraction c of the values set to 0 or 1 (even odds)."""
    c = (0.03, 0.06, 0.09, 0.17, 0.27)[severity - 1]
    x = _f(img)
    hit = rng.random(x.shape) < c
    salt = rng.random(x.shape) < 0.5
    return _u8(np.where(hit, salt.astype(np.float32), x))


def speckle_noise(img: np.ndarray, severity: int, rng: Rng) -> np.ndarray:
    """Multiplicative Gaussian noise: x + x * N(0, c)."""
    c = (0.15, 0.2, 0.35, 0.45, 0.6)[severity - 1]
    x = _f(img)
    return _u8(x + x * rng.normal(scale=c, size=x.shape))


# --------------------------------------------------------------------------------------------- blur
def gaussian_blur(img: np.ndarray, severity: int, rng: Rng) -> np.ndarray:
    """Gaussian blur with sigma c px."""
    c = (1, 2, 3, 4, 6)[severity - 1]
    return _u8(_gaussian(_f(img), c))


def defocus_blur(img: np.ndarray, severity: int, rng: Rng) -> np.ndarray:
    """Convolution with a disk of radius r (lightly Gaussian-smoothed against aliasing)."""
    radius, alias = ((3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5))[severity - 1]
    half = max(8, radius)
    ax = np.arange(-half, half + 1, dtype=np.float64)
    xx, yy = np.meshgrid(ax, ax)
    disk = (xx**2 + yy**2 <= radius**2).astype(np.float64)
    disk /= disk.sum()
    ksize = 3 if radius <= 8 else 5
    g = np.exp(-((np.arange(ksize) - ksize // 2) ** 2) / (2.0 * alias**2))
    g /= g.sum()
    disk = ndimage.convolve1d(ndimage.convolve1d(disk, g, axis=0, mode="mirror"), g, axis=1, mode="mirror")
    disk /= disk.sum()
    return _u8(_filter(_f(img), disk, "reflect"))


def _glass_sources(rng: Rng, h: int, w: int, d: int) -> np.ndarray:
    """Flat source index of every pixel after one pass of ImageNet-C's glass-blur shuffle.

    The original visits interior pixels p in reverse raster order and assigns ``x[p], x[q] = x[q], x[p]`` with
    q = p + (dy, dx), dx, dy in [-d, d). On numpy views that tuple assignment copies rather than swaps: x[p]
    takes the *current* value of x[q]. So source(p) = q if q <= p (q not yet visited) else source(q).
    That recursion only climbs to larger indices, so it is resolved exactly by pointer jumping.
    """
    rows = np.arange(h - d, d, -1)
    cols = np.arange(w - d, d, -1)
    p = (rows[:, None] * w + cols[None, :]).ravel()  # visiting order
    r = rng.integers(-d, d, size=(p.size, 2))  # (dx, dy) per visited pixel
    q = p + r[:, 1] * w + r[:, 0]
    nxt = np.arange(h * w)
    nxt[p] = q
    pending = np.zeros(h * w, dtype=bool)
    pending[p] = q > p  # q already visited (or a border pixel, which never changes)
    while pending.any():
        idx = np.flatnonzero(pending)
        t = nxt[idx]
        nxt[idx], pending[idx] = nxt[t], pending[t]
    return nxt


def glass_blur(img: np.ndarray, severity: int, rng: Rng) -> np.ndarray:
    """Gaussian blur, local pixel shuffling (``iterations`` passes, reach d px), Gaussian blur again: frosted
    glass. The shuffle reproduces the original loop's result exactly, vectorised (see ``_glass_sources``)."""
    sigma, d, iterations = ((0.7, 1, 2), (0.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2))[severity - 1]
    x = _u8(_gaussian(_f(img), sigma))  # the original quantises to uint8 here too
    h, w = x.shape[:2]
    flat = x.reshape(h * w, 3)
    for _ in range(iterations):
        flat = flat[_glass_sources(rng, h, w, d)]
    return _u8(_gaussian(_f(flat.reshape(h, w, 3)), sigma))


def motion_blur(img: np.ndarray, severity: int, rng: Rng) -> np.ndarray:
    """Motion blur along a random angle in [-45, 45) degrees (radius, sigma as ImageMagick's motion blur)."""
    radius, sigma = ((10, 3), (15, 5), (15, 8), (15, 12), (20, 15))[severity - 1]
    return _u8(_motion_blur(_f(img), radius, sigma, rng.uniform(-45, 45)))


def zoom_blur(img: np.ndarray, severity: int, rng: Rng) -> np.ndarray:
    """Average of the image with centre-zoomed copies of itself (zoom factors from 1 to 1.1 ... 1.3)."""
    start, stop, step = ((1, 1.11, 0.01), (1, 1.16, 0.01), (1, 1.21, 0.02), (1, 1.26, 0.02), (1, 1.31, 0.03))[
        severity - 1
    ]
    zooms = np.arange(start, stop, step)
    x = _f(img)
    out = np.zeros_like(x)
    for z in zooms:
        out += _zoom_center(x, float(z))
    return _u8((x + out) / (len(zooms) + 1))


# --------------------------------------------------------------------------------------------- weather
def snow(img: np.ndarray, severity: int, rng: Rng) -> np.ndarray:
    """Falling snow: thresholded, zoomed Gaussian noise streaked by motion blur, over a greyed, brightened image."""
    loc, scale, zoom, thresh, radius, sigma, blend = (
        (0.1, 0.3, 3, 0.5, 10, 4, 0.8),
        (0.2, 0.3, 2, 0.5, 12, 4, 0.7),
        (0.55, 0.3, 4, 0.9, 12, 8, 0.7),
        (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65),
        (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55),
    )[severity - 1]
    x = _f(img)
    h, w = x.shape[:2]
    layer = rng.normal(loc=loc, scale=scale, size=(h, w)).astype(np.float32)
    layer = _zoom_center(layer, zoom)
    layer[layer < thresh] = 0
    layer = _motion_blur(np.clip(layer, 0, 1)[:, :, None], radius, sigma, rng.uniform(-135, -45))
    layer = np.clip(layer, 0.0, 1.0)
    grey = (x @ _LUMA)[:, :, None]
    x = blend * x + (1 - blend) * np.maximum(x, grey * 1.5 + 0.5)
    return _u8(x + layer + np.rot90(layer, k=2))


def frost(img: np.ndarray, severity: int, rng: Rng) -> np.ndarray:
    """Blend with a frost picture: c0 * x + c1 * frost (procedural frost pictures, see docs/data.md)."""
    a, b = ((1, 0.4), (0.8, 0.6), (0.7, 0.7), (0.65, 0.7), (0.6, 0.75))[severity - 1]
    x = _f(img)
    return _u8(a * x + b * _frost_crop(rng, x.shape[0], x.shape[1]))


def fog(img: np.ndarray, severity: int, rng: Rng) -> np.ndarray:
    """Add a plasma-fractal haze of strength c0 (roughness c1), then rescale to the original maximum."""
    strength, decay = ((1.5, 2), (2.0, 2), (2.5, 1.7), (2.5, 1.5), (3.0, 1.4))[severity - 1]
    x = _f(img)
    h, w = x.shape[:2]
    size = 256
    while size < max(h, w):
        size *= 2
    max_val = float(x.max())
    x = x + strength * _plasma(rng, size, decay)[:h, :w, None]
    return _u8(x * max_val / (max_val + strength))


def brightness(img: np.ndarray, severity: int, rng: Rng) -> np.ndarray:
    """Raise the HSV value channel by c."""
    c = (0.1, 0.2, 0.3, 0.4, 0.5)[severity - 1]
    hsv = _rgb2hsv(_f(img))
    hsv[:, :, 2] = np.clip(hsv[:, :, 2] + c, 0, 1)
    return _u8(_hsv2rgb(hsv))


def spatter(img: np.ndarray, severity: int, rng: Rng) -> np.ndarray:
    """Water drops (severities 1-3) or mud splashes (4-5) from thresholded blurred noise."""
    loc, scale, sigma, thresh, intensity, mud = (
        (0.65, 0.3, 4, 0.69, 0.6, 0),
        (0.65, 0.3, 3, 0.68, 0.6, 0),
        (0.65, 0.3, 2, 0.68, 0.5, 0),
        (0.65, 0.3, 1, 0.65, 1.5, 1),
        (0.67, 0.4, 1, 0.65, 1.5, 1),
    )[severity - 1]
    x = _f(img)
    h, w = x.shape[:2]
    liquid = _gaussian(rng.normal(loc=loc, scale=scale, size=(h, w)).astype(np.float32), sigma)
    liquid[liquid < thresh] = 0
    if not mud:
        from skimage.feature import canny

        layer = (np.clip(liquid, 0, 1) * 255).astype(np.uint8)
        edges = canny(layer.astype(np.float32), sigma=0.5, low_threshold=50, high_threshold=150)
        dist = ndimage.distance_transform_edt(~edges) if edges.any() else np.full((h, w), 20.0)
        dist = np.minimum(dist, 20.0)
        dist = ndimage.uniform_filter(dist, 3, mode="mirror").astype(np.uint8)
        dist = _equalize_hist(dist)
        emboss = np.array([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]], dtype=np.float64)
        dist = np.clip(np.round(ndimage.correlate(dist.astype(np.float64), emboss, mode="mirror")), 0, 255)
        dist = ndimage.uniform_filter(dist, 3, mode="mirror").astype(np.float32)
        m = layer.astype(np.float32) * dist
        peak = float(m.max())
        m = m / peak * intensity if peak > 0 else m
        water = np.array([175, 238, 238], dtype=np.float32) / 255.0  # pale turquoise
        return _u8(x + m[:, :, None] * water)
    m = _gaussian((liquid > thresh).astype(np.float32), intensity)
    m[m < 0.8] = 0
    mud_colour = np.array([63, 42, 20], dtype=np.float32) / 255.0  # brown
    m = m[:, :, None]
    return _u8(x * (1 - m) + mud_colour * m)


def _equalize_hist(u8: np.ndarray) -> np.ndarray:
    """Histogram equalisation of a uint8 image (cumulative-histogram lookup table)."""
    hist = np.bincount(u8.ravel(), minlength=256)
    cdf = np.cumsum(hist)
    first = cdf[np.flatnonzero(hist)[0]]
    if cdf[-1] == first:
        return u8
    lut = np.clip(np.round((cdf - first) * 255.0 / (cdf[-1] - first)), 0, 255).astype(np.uint8)
    return lut[u8]


# --------------------------------------------------------------------------------------------- digital
def contrast(img: np.ndarray, severity: int, rng: Rng) -> np.ndarray:
    """Pull each channel towards its mean: (x - mean) * c + mean."""
    c = (0.4, 0.3, 0.2, 0.1, 0.05)[severity - 1]
    x = _f(img)
    means = x.mean(axis=(0, 1), keepdims=True)
    return _u8((x - means) * c + means)


def saturate(img: np.ndarray, severity: int, rng: Rng) -> np.ndarray:
    """Scale the HSV saturation: s * c0 + c1 (severities 1-2 desaturate, 3-5 oversaturate)."""
    a, b = ((0.3, 0), (0.1, 0), (2, 0), (5, 0.1), (20, 0.1))[severity - 1]
    hsv = _rgb2hsv(_f(img))
    hsv[:, :, 1] = np.clip(hsv[:, :, 1] * a + b, 0, 1)
    return _u8(_hsv2rgb(hsv))


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


def pixelate(img: np.ndarray, severity: int, rng: Rng) -> np.ndarray:
    """Box-downsample to a fraction c of the size, then box-upsample back."""
    c = (0.6, 0.5, 0.4, 0.3, 0.25)[severity - 1]
    h, w = img.shape[:2]
    small = Image.fromarray(img).resize((max(1, int(w * c)), max(1, int(h * c))), Image.BOX)
    return np.asarray(small.resize((w, h), Image.BOX)).copy()


def jpeg_compression(img: np.ndarray, severity: int, rng: Rng) -> np.ndarray:
    """JPEG round trip at quality c."""
    c = (25, 18, 15, 10, 7)[severity - 1]
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=c)
    buf.seek(0)
    return np.asarray(Image.open(buf).convert("RGB")).copy()


_FUNCS: dict[str, Callable[[np.ndarray, int, Rng], np.ndarray]] = {
    name: globals()[name] for name in ALL_CORRUPTIONS
}


def _check(image: np.ndarray, name: str, severity: int) -> np.ndarray:
    if name not in _FUNCS:
        raise ValueError(f"unknown corruption {name!r}; allowed: {', '.join(ALL_CORRUPTIONS)}")
    if isinstance(severity, bool) or not isinstance(severity, (int, np.integer)) or severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {', '.join(map(str, SEVERITIES))}, got {severity!r}")
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8, got shape {image.shape} dtype {image.dtype}")
    return image


def corrupt(image: np.ndarray, name: str, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Apply corruption ``name`` at ``severity`` (1-5) to an (H, W, 3) uint8 image; returns (H, W, 3) uint8.

    Deterministic given ``rng`` (the only source of randomness).
    """
    image = _check(image, name, severity)
    out = _FUNCS[name](image, int(severity), rng)
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
