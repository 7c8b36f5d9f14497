"""CURE-TSR-style corruptions for 28x28 grayscale float images in [0, 1].

Every kind has five severity levels whose strength grows monotonically. The random
pattern of a corruption (noise field, stain layout, flake positions, ...) depends only on
the seed, never on the severity, so for a fixed seed level ``s + 1`` is the same pattern
as level ``s``, only stronger. That keeps the levels comparable and makes the distance
from the clean image grow with the level image by image, not just on average (the tests
check this per image).

Parameters per level (severity 1 .. 5; the constants below hold the exact values):

* ``noise``: additive Gaussian, sigma 0.05, 0.08, 0.11, 0.15, 0.21.
* ``lens_blur``: anti-aliased disk (defocus) kernel, radius 1.0, 1.5, 2.0, 2.5, 3.0 px.
* ``gaussian_blur``: Gaussian kernel, sigma 0.6, 0.85, 1.1, 1.4, 1.8 px.
* ``dirty_lens``: soft blobs where a smooth random field (unit std, sigma 2.5 px) exceeds
  0.9, 0.75, 0.6, 0.45, 0.3; one field gives dark stains, another bright ones; under a
  stain the image is smudged (blur sigma 1 px) and tinted with opacity 0.5 .. 0.74.
* ``exposure``: per image, at random, over-exposure ``clip(g * x + lift) ** gamma`` with
  g 1.15 .. 2.2, lift 0.02 .. 0.14, gamma 0.95 .. 0.58, or under-exposure
  ``(g * x) ** gamma`` with g 0.8 .. 0.4, gamma 1.05 .. 1.4.
* ``snow``: 0.02 .. 0.09 flakes per pixel (16 .. 71 per image), streaked 0 .. 2.5 px along
  a per-image wind direction, screen-blended over the image whitened by 6 .. 20 %.
* ``haze``: blend toward a smooth uneven fog layer (brightness 0.8 +- 0.08) with mean
  opacity 0.15, 0.25, 0.36, 0.48, 0.6 (thicker where the fog is brighter).

The output for a given seed also depends on the batch size and the position of an image
in the batch (draws are made per chunk of images), not on anything else.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage

from detectors.challenge._checks import clipped_unit_range

CORRUPTIONS: tuple[str, ...] = (
    "noise",
    "lens_blur",
    "gaussian_blur",
    "dirty_lens",
    "exposure",
    "snow",
    "haze",
)
SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)

_SIZE = 28  # parameters below are tuned in pixels for 28x28 images
_CHUNK = 256  # images per vectorised step; part of the seed -> output mapping

_NOISE_SIGMA = (0.05, 0.08, 0.11, 0.15, 0.21)
_GAUSS_SIGMA = (0.6, 0.85, 1.1, 1.4, 1.8)
_LENS_RADIUS = (1.0, 1.5, 2.0, 2.5, 3.0)
# dirty_lens: threshold on a unit-std smooth field (lower = more area), stain opacity
_STAIN_THRESHOLD = (0.9, 0.75, 0.6, 0.45, 0.3)
_STAIN_ALPHA = (0.5, 0.56, 0.62, 0.68, 0.74)
_STAIN_FIELD_SIGMA = 2.5
_STAIN_EDGE = 1.2  # width (in field std) of the soft stain border
_STAIN_SMUDGE_SIGMA = 1.0
# exposure: over = clip(gain * x + lift) ** gamma, under = (gain * x) ** gamma
_OVER_GAIN = (1.15, 1.3, 1.5, 1.8, 2.2)
_OVER_LIFT = (0.02, 0.04, 0.07, 0.1, 0.14)
_OVER_GAMMA = (0.95, 0.87, 0.78, 0.68, 0.58)
_UNDER_GAIN = (0.8, 0.68, 0.57, 0.48, 0.4)
_UNDER_GAMMA = (1.05, 1.12, 1.2, 1.3, 1.4)
# snow: flakes per pixel, streak length in px, whitening of the background image
_SNOW_DENSITY = (0.02, 0.035, 0.05, 0.07, 0.09)
_SNOW_STREAK = (0.0, 0.6, 1.2, 1.8, 2.5)
_SNOW_WHITEN = (0.06, 0.09, 0.12, 0.16, 0.2)
# haze: fog opacity (mean over the image), fog brightness and its spatial spread
_HAZE_ALPHA = (0.15, 0.25, 0.36, 0.48, 0.6)
_HAZE_FOG_LEVEL = 0.8
_HAZE_FOG_SPREAD = 0.08
_HAZE_FIELD_SIGMA = 7.0


def corrupt(images: np.ndarray, kind: str, severity: int, seed: int) -> np.ndarray:
    """Apply corruption ``kind`` at ``severity`` (1..5) to a batch of images.

    ``images`` is (B, 28, 28) or (B, 1, 28, 28), floating point in [0, 1]. Returns float32
    of the same shape, clipped to [0, 1]; the input is not modified. Each image gets its
    own random draw from ``np.random.default_rng(seed)``; the same seed gives the same
    output, and the draws do not depend on ``severity`` (see the module docstring).
    """
    if kind not in _KINDS:
        raise ValueError(
            f"unknown corruption kind {kind!r}; expected one of: {', '.join(CORRUPTIONS)}"
        )
    if isinstance(severity, bool) or not isinstance(severity, int | np.integer):
        raise ValueError(f"severity must be an int in {SEVERITIES}, got {severity!r}")
    if int(severity) not in SEVERITIES:
        raise ValueError(f"severity must be one of {SEVERITIES}, got {severity}")
    x, shape = _as_batch(images)
    rng = np.random.default_rng(seed)
    fn, level = _KINDS[kind], int(severity) - 1
    out = np.empty_like(x)
    # chunks keep temporaries small: large fresh allocations (page faults) dominate otherwise
    for lo in range(0, len(x), _CHUNK):
        out[lo : lo + _CHUNK] = np.clip(fn(x[lo : lo + _CHUNK], level, rng), 0.0, 1.0)
    return out.reshape(shape)


def _as_batch(images: np.ndarray) -> tuple[np.ndarray, tuple[int, ...]]:
    """Validate the input and return a float32 (B, 28, 28) copy plus the original shape."""
    arr = np.asarray(images)
    ok_3d = arr.ndim == 3 and arr.shape[1:] == (_SIZE, _SIZE)
    ok_4d = arr.ndim == 4 and arr.shape[1:] == (1, _SIZE, _SIZE)
    if not (ok_3d or ok_4d):
        raise ValueError(
            f"images must have shape (B, {_SIZE}, {_SIZE}) or (B, 1, {_SIZE}, {_SIZE}), "
            f"got {arr.shape}"
        )
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(
            f"images must be floating point in [0, 1] (e.g. float32), got dtype {arr.dtype}; "
            "convert uint8 images with images.astype(np.float32) / 255"
        )
    x = arr.astype(np.float32).reshape(-1, _SIZE, _SIZE)
    return clipped_unit_range(x), arr.shape


def _smooth_field(rng: np.random.Generator, b: int, sigma: float) -> np.ndarray:
    """Smooth periodic random field per image, zero mean and unit std per image."""
    noise = rng.standard_normal((b, _SIZE, _SIZE), dtype=np.float32)
    f = ndimage.gaussian_filter(noise, sigma=(0, sigma, sigma), mode="wrap", truncate=3.0)
    f -= f.mean(axis=(1, 2), keepdims=True)
    f /= f.std(axis=(1, 2), keepdims=True) + 1e-12
    return f


def _smoothstep(t: np.ndarray) -> np.ndarray:
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _noise(x: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    return x + _NOISE_SIGMA[level] * rng.standard_normal(x.shape, dtype=np.float32)


def _gaussian_blur(x: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    s = _GAUSS_SIGMA[level]
    # 'nearest' keeps the (usually black) border from bleeding in or out
    return ndimage.gaussian_filter(x, sigma=(0, s, s), mode="nearest", truncate=3.0)


def _disk_kernel(radius: float, supersample: int = 8) -> np.ndarray:
    """Normalised disk with anti-aliased edge (pixel coverage by supersampling)."""
    r = int(np.ceil(radius))
    offs = (np.arange(supersample) + 0.5) / supersample - 0.5
    grid = np.arange(-r, r + 1)[:, None] + offs[None, :]  # (2r+1, ss) sub-pixel coords
    yy = grid[:, None, :, None]
    xx = grid[None, :, None, :]
    k = ((yy**2 + xx**2) <= radius**2).mean(axis=(2, 3))
    return k / k.sum()


def _lens_blur(x: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    k = _disk_kernel(_LENS_RADIUS[level]).astype(np.float32)
    return ndimage.convolve(x, k[None], mode="nearest")


def _dirty_lens(x: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    b = x.shape[0]
    fields = _smooth_field(rng, 2 * b, _STAIN_FIELD_SIGMA).reshape(2, b, _SIZE, _SIZE)
    dark_tone = rng.uniform(0.0, 0.15, size=(b, 1, 1))
    bright_tone = rng.uniform(0.7, 0.95, size=(b, 1, 1))
    thr = _STAIN_THRESHOLD[level]
    m_dark = _smoothstep((fields[0] - thr) / _STAIN_EDGE)
    m_bright = _smoothstep((fields[1] - thr) / _STAIN_EDGE) * (1.0 - m_dark)
    m = m_dark + m_bright
    # a smear both blurs what lies under it and tints it
    smudged = ndimage.gaussian_filter(
        x, sigma=(0, _STAIN_SMUDGE_SIGMA, _STAIN_SMUDGE_SIGMA), mode="nearest"
    )
    base = x * (1.0 - m) + smudged * m
    a = _STAIN_ALPHA[level]
    return base * (1.0 - a * m) + a * (m_dark * dark_tone + m_bright * bright_tone)


def _exposure(x: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    over = rng.random(x.shape[0]) < 0.5
    out = np.empty_like(x)
    out[over] = (
        np.clip(x[over] * _OVER_GAIN[level] + _OVER_LIFT[level], 0.0, 1.0) ** _OVER_GAMMA[level]
    )
    out[~over] = (x[~over] * _UNDER_GAIN[level]) ** _UNDER_GAMMA[level]
    return out


def _splat(b: int, img: np.ndarray, ys: np.ndarray, xs: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Bilinearly splat weighted points (flat arrays, ``img`` = batch index) into (b, 28, 28)."""
    # draw on a padded canvas so points near or past the border need no bounds masks
    pad = 8
    side = _SIZE + 2 * pad
    ys = np.clip(ys + pad, 0.0, side - 2.0)
    xs = np.clip(xs + pad, 0.0, side - 2.0)
    y0 = ys.astype(np.int32)  # floor, coordinates are non-negative
    x0 = xs.astype(np.int32)
    fy, fx = ys - y0, xs - x0
    base = (img.astype(np.int64) * side + y0) * side + x0
    idx = np.concatenate([base, base + 1, base + side, base + side + 1])
    wts = np.concatenate(
        [w * (1 - fy) * (1 - fx), w * (1 - fy) * fx, w * fy * (1 - fx), w * fy * fx]
    )
    layer = np.bincount(idx, weights=wts, minlength=b * side * side).reshape(b, side, side)
    return layer[:, pad:-pad, pad:-pad]


def _snow(x: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    b = x.shape[0]
    n_max = round(max(_SNOW_DENSITY) * _SIZE * _SIZE)
    # all draws are sized for the worst level so the pattern does not depend on it
    # flakes start on pixel centres so that single dots stay crisp at 28x28
    start = rng.integers(-3, _SIZE + 1, size=(b, n_max, 2)).astype(np.float32)
    rank = rng.random((b, n_max), dtype=np.float32)
    bright = rng.uniform(0.5, 1.0, size=(b, n_max)).astype(np.float32)
    wind = rng.normal(0.0, 0.4, size=(b, 1))  # per-image fall direction, radians off vertical
    angle = (wind + rng.normal(0.0, 0.1, size=(b, n_max))).astype(np.float32)

    keep = rank < _SNOW_DENSITY[level] / max(_SNOW_DENSITY)  # nested sets across levels
    img = np.broadcast_to(np.arange(b)[:, None], keep.shape)[keep]
    start, bright, angle = start[keep], bright[keep], angle[keep]
    # a flake is a streak of points 0.5 px apart (one point when the length is 0)
    length = _SNOW_STREAK[level]
    n_steps = int(np.ceil(length / 0.5)) + 1
    t = np.linspace(0.0, length, n_steps, dtype=np.float32)
    spacing = length / (n_steps - 1) if n_steps > 1 else 1.0
    ys = start[:, 0:1] + np.cos(angle)[:, None] * t
    xs = start[:, 1:2] + np.sin(angle)[:, None] * t
    w = np.broadcast_to((bright * spacing)[:, None], ys.shape)  # ~ same brightness per px
    img = np.broadcast_to(img[:, None], ys.shape)
    flakes = np.clip(_splat(b, img.ravel(), ys.ravel(), xs.ravel(), w.ravel()), 0.0, 1.0)

    base = x + _SNOW_WHITEN[level] * (1.0 - x)
    return 1.0 - (1.0 - base) * (1.0 - flakes)  # screen blend: flakes only brighten


def _haze(x: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    field = _smooth_field(rng, x.shape[0], _HAZE_FIELD_SIGMA)
    fog = np.clip(_HAZE_FOG_LEVEL + _HAZE_FOG_SPREAD * field, 0.0, 1.0)
    # thicker fog where it is brighter, as with real uneven haze
    alpha = np.clip(_HAZE_ALPHA[level] * (1.0 + 0.15 * field), 0.0, 0.95)
    return x * (1.0 - alpha) + fog * alpha


_KINDS: dict[str, Callable[[np.ndarray, int, np.random.Generator], np.ndarray]] = {
    "noise": _noise,
    "lens_blur": _lens_blur,
    "gaussian_blur": _gaussian_blur,
    "dirty_lens": _dirty_lens,
    "exposure": _exposure,
    "snow": _snow,
    "haze": _haze,
}
assert tuple(_KINDS) == CORRUPTIONS


def plot_corruption_grid(
    images: np.ndarray,
    path: str | Path,
    seed: int = 0,
    kinds: Sequence[str] = CORRUPTIONS,
    dpi: int = 100,
) -> Path:
    """Save a PNG grid: one row per kind; per image, a clean column then severities 1..5."""
    from matplotlib.figure import Figure  # lazy: plotting is optional for users of corrupt()

    x, _ = _as_batch(images)
    n_cols = len(x) * (1 + len(SEVERITIES))
    fig = Figure(figsize=(1.0 * n_cols, 1.05 * len(kinds) + 0.4))
    axes = fig.subplots(len(kinds), n_cols, squeeze=False)
    for row, kind in enumerate(kinds):
        levels = [x] + [corrupt(x, kind, s, seed) for s in SEVERITIES]
        for i in range(len(x)):
            for j, imgs in enumerate(levels):
                ax = axes[row, i * len(levels) + j]
                ax.imshow(imgs[i], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if row == 0:
                    ax.set_title("clean" if j == 0 else f"s{j}", fontsize=8)
                if i == 0 and j == 0:
                    ax.set_ylabel(kind, fontsize=8)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=dpi)
    return out
