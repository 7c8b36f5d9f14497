"""CURE-TSR-style corruptions for float images in [0, 1], grayscale or RGB, of any size.

Images are (B, H, W) grayscale or (B, C, H, W) channels-first with C = 1 or 3, and
H, W >= 8. Every kind has five severity levels whose strength grows monotonically. The
random pattern of a corruption (noise field, stain layout, flake positions, blur
direction, ...) depends only on the seed, never on the severity, so for a fixed seed level
``s + 1`` is the same pattern as level ``s``, only stronger. That keeps the levels
comparable and makes the distance from the clean image grow with the level image by image,
not just on average (the tests check this per image).

Size: the parameters were tuned in pixels for 28x28 images. Every length in pixels below
(blur sigmas and radii, smooth-field sigmas, streak and motion lengths, pixelation blocks,
flake size and margins) is multiplied by ``scale = min(H, W) / 28``, the short side
relative to 28 px, and flake counts per pixel are divided by ``scale ** 2``; so a 224-px
image gets 8x wider blurs and haze structures and the same number of (8x larger) snow
flakes as a 28-px one, and looks about as corrupted. The short side is used because it
bounds the size of a centred object. At 28x28 (scale 1) the output is bit-for-bit what the
28x28-only version of this module produced. Not scaled: noise sigma (camera noise is per
pixel), tone curves, opacities and JPEG quality (JPEG works on 8x8-pixel blocks, as in the
camera). Below about 16 px the weakest blur levels shrink under a pixel and barely change
the image; the tuned range is 20 px and up.

Colour (C = 3): noise is drawn independently per channel (colour noise), blurs and JPEG
act on each channel (JPEG with the usual 4:2:0 chroma subsampling), haze is a grey-white
layer with the same opacity on every channel (a grey image stays grey), snow flakes are
white, dirty-lens stains get a per-image tint between neutral grey and brown (dark stains)
or beige (bright ones), exposure and contrast apply the same curve to every channel.

Parameters per level (severity 1 .. 5; the constants below hold the exact values; px at
28x28, times ``scale`` otherwise):

``CORRUPTIONS`` (these define the default challenge data; unchanged):

* ``noise``: additive Gaussian, sigma 0.05, 0.08, 0.11, 0.15, 0.21.
* ``lens_blur``: anti-aliased disk (defocus) kernel, radius 1.0, 1.5, 2.0, 2.5, 3.0 px.
* ``gaussian_blur``: Gaussian kernel, sigma 0.6, 0.85, 1.1, 1.4, 1.8 px.
* ``dirty_lens``: soft blobs where a smooth random field (unit std, sigma 2.5 px) exceeds
  0.9, 0.75, 0.6, 0.45, 0.3; one field gives dark stains, another bright ones; under a
  stain the image is smudged (blur sigma 1 px) and tinted with opacity 0.5 .. 0.74.
* ``exposure``: per image, at random, over-exposure ``clip(g * x + lift) ** gamma`` with
  g 1.15 .. 2.2, lift 0.02 .. 0.14, gamma 0.95 .. 0.58, or under-exposure
  ``(g * x) ** gamma`` with g 0.8 .. 0.4, gamma 1.05 .. 1.4.
* ``snow``: 0.02 .. 0.09 flakes per (scaled) pixel (16 .. 71 per image), streaked
  0 .. 2.5 px along a per-image wind direction, screen-blended over the image whitened by
  6 .. 20 %; flakes are dilated to a disk of diameter ``scale`` px when that reaches two
  pixels.
* ``haze``: blend toward a smooth uneven fog layer (brightness 0.8 +- 0.08, field sigma
  7 px) with mean opacity 0.15, 0.25, 0.36, 0.48, 0.6 (thicker where the fog is brighter).

``EXTRA_CORRUPTIONS`` (camera effects; not part of the default challenge data):

* ``jpeg``: JPEG re-compression with PIL, per image: level s saves the image at quality
  30, then re-saves it at 20, 13, 9, 6 up to the s-th of these (generation loss, as for a
  picture re-shared several times; grayscale as mode L, RGB with 4:2:0 chroma).
* ``pixelate``: area-average down to blocks of 1.4, 1.8, 2.4, 3.0, 4.0 px, then nearest
  upsampling; level s pixelates the level s - 1 result again (non-integer grids do not
  nest, and a coarser grid that happens to line up with the edges could otherwise look
  closer to the clean image). Block counts are forced to fall strictly with the level and
  to stay below the image size (only matters for tiny images).
* ``contrast``: blend toward the per-image mean (over all channels), keeping 75, 60, 45, 32,
  20 % of the contrast.
* ``motion_blur``: anti-aliased line kernel centred on the pixel, length 2, 3, 4.5, 6, 8 px,
  at a random angle per image (uniform over 0 .. 180 degrees).
* ``decolor``: for RGB, remove 30, 45, 60, 75, 90 % of the saturation (toward Rec. 601
  luma) and shift the white balance by per-channel gains ``1 + k * (t, m, -t)`` with k
  0.04, 0.07, 0.10, 0.13, 0.16, t = +-1 (warm or cool, per image) and a green/magenta
  component m uniform in [-0.3, 0.3]. For grayscale there is no colour to lose, so it is a
  faded print instead: a tone curve ``f + (1 - 2 f) * x ** g`` that lifts the blacks and
  dims the whites by f = 0.04, 0.07, 0.1, 0.14, 0.18, with ``g = exp(+-k)``, k = 0.08,
  0.14, 0.2, 0.27, 0.35 (darker or lighter mid-tones, per image).

The output for a given seed also depends on the batch size and the position of an image
in the batch (draws are made per chunk of images; chunks hold fewer images when the images
are large), not on anything else.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import scipy.fft
from PIL import Image
from scipy import ndimage, signal

from detectors.fit.challenge._checks import clipped_unit_range

CORRUPTIONS: tuple[str, ...] = (
    "noise",
    "lens_blur",
    "gaussian_blur",
    "dirty_lens",
    "exposure",
    "snow",
    "haze",
)
EXTRA_CORRUPTIONS: tuple[str, ...] = (
    "jpeg",
    "pixelate",
    "contrast",
    "motion_blur",
    "decolor",
)
ALL_CORRUPTIONS: tuple[str, ...] = CORRUPTIONS + EXTRA_CORRUPTIONS
SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)

_REF_SIZE = 28  # pixel parameters below are tuned for 28x28 images
_MIN_SIZE = 8  # smaller images cannot show the structures at all (and JPEG blocks are 8 px)
_CHANNELS = (1, 3)
_CHUNK = 256  # images per vectorised step; part of the seed -> output mapping
_CHUNK_VALUES = 1 << 22  # ... fewer when an image is large, so temporaries stay ~16 MiB
# above these sizes (px) a filter goes through the FFT: direct cost grows with kernel area
_DIRECT_MAX_SIDE = 9  # disk kernels
_DIRECT_MAX_SIGMA = 4.0  # separable Gaussian, 'nearest' borders
_FIELD_FFT_SIGMA = 8.0  # periodic smooth fields

_NOISE_SIGMA = (0.05, 0.08, 0.11, 0.15, 0.21)
_GAUSS_SIGMA = (0.6, 0.85, 1.1, 1.4, 1.8)
_LENS_RADIUS = (1.0, 1.5, 2.0, 2.5, 3.0)
# dirty_lens: threshold on a unit-std smooth field (lower = more area), stain opacity
_STAIN_THRESHOLD = (0.9, 0.75, 0.6, 0.45, 0.3)
_STAIN_ALPHA = (0.5, 0.56, 0.62, 0.68, 0.74)
_STAIN_FIELD_SIGMA = 2.5
_STAIN_EDGE = 1.2  # width (in field std) of the soft stain border
_STAIN_SMUDGE_SIGMA = 1.0
# RGB stain tints at full strength (times the grey tone): brown grime, beige dust
_STAIN_DARK_TINT = np.array([1.3, 1.0, 0.6]).reshape(1, 3, 1, 1)
_STAIN_BRIGHT_TINT = np.array([1.0, 0.95, 0.82]).reshape(1, 3, 1, 1)
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
_SNOW_MARGIN = 3.0  # flakes may start this far above/left of the frame and drift in
# haze: fog opacity (mean over the image), fog brightness and its spatial spread
_HAZE_ALPHA = (0.15, 0.25, 0.36, 0.48, 0.6)
_HAZE_FOG_LEVEL = 0.8
_HAZE_FOG_SPREAD = 0.08
_HAZE_FIELD_SIGMA = 7.0
# extra kinds
_JPEG_QUALITY = (30, 20, 13, 9, 6)
_PIXELATE_BLOCK = (1.4, 1.8, 2.4, 3.0, 4.0)
_CONTRAST_KEEP = (0.75, 0.6, 0.45, 0.32, 0.2)
_MOTION_LENGTH = (2.0, 3.0, 4.5, 6.0, 8.0)
_DECOLOR_DESATURATE = (0.3, 0.45, 0.6, 0.75, 0.9)
_DECOLOR_WHITE_BALANCE = (0.04, 0.07, 0.1, 0.13, 0.16)
_DECOLOR_FADE = (0.04, 0.07, 0.1, 0.14, 0.18)
_DECOLOR_GAMMA = (0.08, 0.14, 0.2, 0.27, 0.35)
_LUMA = np.array([0.299, 0.587, 0.114], np.float32).reshape(1, 3, 1, 1)  # Rec. 601

_Kind = Callable[[np.ndarray, int, np.random.Generator, float], np.ndarray]


def corrupt(images: np.ndarray, kind: str, severity: int, seed: int) -> np.ndarray:
    """Apply corruption ``kind`` (any of ``ALL_CORRUPTIONS``) at ``severity`` (1..5).

    ``images`` is (B, H, W) or (B, C, H, W) with C in (1, 3) and H, W >= 8, floating point
    in [0, 1]. Returns float32 of the same shape, clipped to [0, 1]; the input is not
    modified. Each image gets its own random draw from ``np.random.default_rng(seed)``; the
    same seed gives the same output, and the draws do not depend on ``severity``. Pixel
    parameters scale with ``min(H, W) / 28`` (see the module docstring).
    """
    if kind not in _KINDS:
        raise ValueError(
            f"unknown corruption kind {kind!r}; expected one of: {', '.join(ALL_CORRUPTIONS)}"
        )
    if isinstance(severity, bool) or not isinstance(severity, int | np.integer):
        raise ValueError(f"severity must be an int in {SEVERITIES}, got {severity!r}")
    if int(severity) not in SEVERITIES:
        raise ValueError(f"severity must be one of {SEVERITIES}, got {severity}")
    x, shape = _as_batch(images)
    _, c, h, w = x.shape
    scale = min(h, w) / _REF_SIZE
    chunk = max(1, min(_CHUNK, _CHUNK_VALUES // (c * h * w)))
    rng = np.random.default_rng(seed)
    fn, level = _KINDS[kind], int(severity) - 1
    out = np.empty_like(x)
    # chunks keep temporaries small: large fresh allocations (page faults) dominate otherwise
    for lo in range(0, len(x), chunk):
        out[lo : lo + chunk] = np.clip(fn(x[lo : lo + chunk], level, rng, scale), 0.0, 1.0)
    return out.reshape(shape)


def _as_batch(images: np.ndarray) -> tuple[np.ndarray, tuple[int, ...]]:
    """Validate the input; return a float32 (B, C, H, W) copy plus the original shape."""
    arr = np.asarray(images)
    ok = (arr.ndim == 3 or (arr.ndim == 4 and arr.shape[1] in _CHANNELS)) and min(
        arr.shape[-2:]
    ) >= _MIN_SIZE
    if not ok:
        raise ValueError(
            "images must have shape (B, H, W) or (B, C, H, W) (channels first) with C in "
            f"{_CHANNELS} and H, W >= {_MIN_SIZE}, got {arr.shape}"
        )
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(
            f"images must be floating point in [0, 1] (e.g. float32), got dtype {arr.dtype}; "
            "convert uint8 images with images.astype(np.float32) / 255"
        )
    b, (h, w) = arr.shape[0], arr.shape[-2:]
    c = arr.shape[1] if arr.ndim == 4 else 1
    x = arr.astype(np.float32).reshape(b, c, h, w)
    return clipped_unit_range(x), arr.shape


def _smooth_field(rng: np.random.Generator, b: int, sigma: float, h: int, w: int) -> np.ndarray:
    """Smooth periodic random field (b, h, w), zero mean and unit std per image."""
    noise = rng.standard_normal((b, h, w), dtype=np.float32)
    if sigma <= _FIELD_FFT_SIGMA:
        f = ndimage.gaussian_filter(noise, sigma=(0, sigma, sigma), mode="wrap", truncate=3.0)
    else:  # the same periodic smoothing, at a cost independent of sigma
        spec = ndimage.fourier_gaussian(scipy.fft.rfft2(noise), sigma=(0, sigma, sigma), n=w)
        f = scipy.fft.irfft2(spec, s=(h, w)).astype(np.float32)
    f -= f.mean(axis=(1, 2), keepdims=True)
    f /= f.std(axis=(1, 2), keepdims=True) + 1e-12
    return f


def _smoothstep(t: np.ndarray) -> np.ndarray:
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _fft_convolve(x: np.ndarray, kernels: np.ndarray) -> np.ndarray:
    """Convolve (b, C, H, W) with odd-sized kernels (b or 1, 1, kh, kw); 'nearest' borders."""
    ry, rx = kernels.shape[-2] // 2, kernels.shape[-1] // 2
    padded = np.pad(x, ((0, 0), (0, 0), (ry, ry), (rx, rx)), mode="edge")
    out = signal.fftconvolve(padded, kernels.astype(np.float32), mode="valid", axes=(2, 3))
    return out.astype(np.float32, copy=False)


def _gaussian(x: np.ndarray, sigma: float, truncate: float) -> np.ndarray:
    """Gaussian blur of every channel of (b, C, H, W) with 'nearest' borders."""
    if sigma <= _DIRECT_MAX_SIGMA:
        # 'nearest' keeps the (usually black) border from bleeding in or out
        flat = x.reshape(-1, *x.shape[2:])
        out = ndimage.gaussian_filter(
            flat, sigma=(0, sigma, sigma), mode="nearest", truncate=truncate
        )
        return out.reshape(x.shape)
    r = int(truncate * sigma + 0.5)  # the kernel scipy's gaussian_filter would use
    g = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    g /= g.sum()
    return _fft_convolve(x, np.outer(g, g)[None, None])


def _noise(x: np.ndarray, level: int, rng: np.random.Generator, scale: float) -> np.ndarray:
    # per pixel and per channel: sensor noise does not grow with the resolution
    return x + _NOISE_SIGMA[level] * rng.standard_normal(x.shape, dtype=np.float32)


def _gaussian_blur(x: np.ndarray, level: int, rng: np.random.Generator, scale: float) -> np.ndarray:
    return _gaussian(x, _GAUSS_SIGMA[level] * scale, truncate=3.0)


def _disk_kernel(radius: float, supersample: int = 8) -> np.ndarray:
    """Normalised disk with anti-aliased edge (pixel coverage by supersampling)."""
    r = int(np.ceil(radius))
    offs = (np.arange(supersample) + 0.5) / supersample - 0.5
    grid = np.arange(-r, r + 1)[:, None] + offs[None, :]  # (2r+1, ss) sub-pixel coords
    yy = grid[:, None, :, None]
    xx = grid[None, :, None, :]
    k = ((yy**2 + xx**2) <= radius**2).mean(axis=(2, 3))
    return k / k.sum()


def _lens_blur(x: np.ndarray, level: int, rng: np.random.Generator, scale: float) -> np.ndarray:
    k = _disk_kernel(_LENS_RADIUS[level] * scale).astype(np.float32)
    if len(k) > _DIRECT_MAX_SIDE:
        return _fft_convolve(x, k[None, None])
    flat = x.reshape(-1, *x.shape[2:])
    return ndimage.convolve(flat, k[None], mode="nearest").reshape(x.shape)


def _dirty_lens(x: np.ndarray, level: int, rng: np.random.Generator, scale: float) -> np.ndarray:
    b, c, h, w = x.shape
    fields = _smooth_field(rng, 2 * b, _STAIN_FIELD_SIGMA * scale, h, w).reshape(2, b, 1, h, w)
    dark_tone = rng.uniform(0.0, 0.15, size=(b, 1, 1, 1))
    bright_tone = rng.uniform(0.7, 0.95, size=(b, 1, 1, 1))
    if c == 3:
        # grime ranges from neutral grey to brown (dust: grey to beige), per image
        warmth = rng.uniform(0.0, 1.0, size=(b, 1, 1, 1))
        dark_tone = dark_tone * (1.0 + warmth * (_STAIN_DARK_TINT - 1.0))
        bright_tone = bright_tone * (1.0 + warmth * (_STAIN_BRIGHT_TINT - 1.0))
    thr = _STAIN_THRESHOLD[level]
    m_dark = _smoothstep((fields[0] - thr) / _STAIN_EDGE)
    m_bright = _smoothstep((fields[1] - thr) / _STAIN_EDGE) * (1.0 - m_dark)
    m = m_dark + m_bright
    # a smear both blurs what lies under it and tints it
    smudged = _gaussian(x, _STAIN_SMUDGE_SIGMA * scale, truncate=4.0)
    base = x * (1.0 - m) + smudged * m
    a = _STAIN_ALPHA[level]
    return base * (1.0 - a * m) + a * (m_dark * dark_tone + m_bright * bright_tone)


def _exposure(x: np.ndarray, level: int, rng: np.random.Generator, scale: float) -> np.ndarray:
    over = rng.random(x.shape[0]) < 0.5
    out = np.empty_like(x)
    out[over] = (
        np.clip(x[over] * _OVER_GAIN[level] + _OVER_LIFT[level], 0.0, 1.0) ** _OVER_GAMMA[level]
    )
    out[~over] = (x[~over] * _UNDER_GAIN[level]) ** _UNDER_GAMMA[level]
    return out


def _splat(
    b: int, img: np.ndarray, ys: np.ndarray, xs: np.ndarray, w: np.ndarray, shape: tuple[int, int]
) -> np.ndarray:
    """Bilinearly splat weighted points (flat arrays, ``img`` = batch index) into (b, *shape)."""
    # draw on a padded canvas so points near or past the border need no bounds masks
    pad = 8
    side_y, side_x = shape[0] + 2 * pad, shape[1] + 2 * pad
    ys = np.clip(ys + pad, 0.0, side_y - 2.0)
    xs = np.clip(xs + pad, 0.0, side_x - 2.0)
    y0 = ys.astype(np.int32)  # floor, coordinates are non-negative
    x0 = xs.astype(np.int32)
    fy, fx = ys - y0, xs - x0
    base = (img.astype(np.int64) * side_y + y0) * side_x + x0
    idx = np.concatenate([base, base + 1, base + side_x, base + side_x + 1])
    wts = np.concatenate(
        [w * (1 - fy) * (1 - fx), w * (1 - fy) * fx, w * fy * (1 - fx), w * fy * fx]
    )
    layer = np.bincount(idx, weights=wts, minlength=b * side_y * side_x)
    return layer.reshape(b, side_y, side_x)[:, pad:-pad, pad:-pad]


def _snow(x: np.ndarray, level: int, rng: np.random.Generator, scale: float) -> np.ndarray:
    b, _, h, w = x.shape
    # as many flakes per image as at 28x28 (per scaled pixel), each `scale` times larger
    n_max = round(max(_SNOW_DENSITY) * h * w / scale**2)
    margin = round(_SNOW_MARGIN * scale)
    high = h + 1 if h == w else np.array([h + 1, w + 1])
    # all draws are sized for the worst level so the pattern does not depend on it
    # flakes start on pixel centres so that single dots stay crisp at 28x28
    start = rng.integers(-margin, high, size=(b, n_max, 2)).astype(np.float32)
    rank = rng.random((b, n_max), dtype=np.float32)
    bright = rng.uniform(0.5, 1.0, size=(b, n_max)).astype(np.float32)
    wind = rng.normal(0.0, 0.4, size=(b, 1))  # per-image fall direction, radians off vertical
    angle = (wind + rng.normal(0.0, 0.1, size=(b, n_max))).astype(np.float32)

    keep = rank < _SNOW_DENSITY[level] / max(_SNOW_DENSITY)  # nested sets across levels
    img = np.broadcast_to(np.arange(b)[:, None], keep.shape)[keep]
    start, bright, angle = start[keep], bright[keep], angle[keep]
    # a flake is a streak of points 0.5 px apart (one point when the length is 0)
    length = _SNOW_STREAK[level] * scale
    n_steps = int(np.ceil(length / 0.5)) + 1
    t = np.linspace(0.0, length, n_steps, dtype=np.float32)
    spacing = length / (n_steps - 1) if n_steps > 1 else 1.0
    ys = start[:, 0:1] + np.cos(angle)[:, None] * t
    xs = start[:, 1:2] + np.sin(angle)[:, None] * t
    wt = np.broadcast_to((bright * spacing)[:, None], ys.shape)  # ~ same brightness per px
    img = np.broadcast_to(img[:, None], ys.shape)
    flakes = _splat(b, img.ravel(), ys.ravel(), xs.ravel(), wt.ravel(), (h, w))
    flakes = np.clip(flakes, 0.0, 1.0)
    disk = _footprint(0.5 * scale)
    if disk.size > 1:  # fatten 1-px streaks to the scaled flake size
        flakes = ndimage.maximum_filter(flakes, footprint=disk[None], mode="constant")

    base = x + _SNOW_WHITEN[level] * (1.0 - x)
    return 1.0 - (1.0 - base) * (1.0 - flakes[:, None])  # screen blend: flakes only brighten


def _footprint(radius: float) -> np.ndarray:
    """Boolean disk of pixel centres within ``radius`` of the centre."""
    r = int(radius)
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return yy**2 + xx**2 <= radius**2


def _haze(x: np.ndarray, level: int, rng: np.random.Generator, scale: float) -> np.ndarray:
    b, _, h, w = x.shape
    field = _smooth_field(rng, b, _HAZE_FIELD_SIGMA * scale, h, w)[:, None]
    # grey-white fog: one layer and one opacity for all channels
    fog = np.clip(_HAZE_FOG_LEVEL + _HAZE_FOG_SPREAD * field, 0.0, 1.0)
    # thicker fog where it is brighter, as with real uneven haze
    alpha = np.clip(_HAZE_ALPHA[level] * (1.0 + 0.15 * field), 0.0, 0.95)
    return x * (1.0 - alpha) + fog * alpha


def _jpeg(x: np.ndarray, level: int, rng: np.random.Generator, scale: float) -> np.ndarray:
    # level s re-saves the level s - 1 result at the next lower quality (generation loss,
    # as when a picture is re-shared): the loss accumulates, so it grows with the level
    u8 = np.round(x * 255.0).astype(np.uint8)
    out = np.empty(x.shape, np.float32)
    for i, img in enumerate(u8):
        # mode L for grayscale, RGB (YCbCr 4:2:0 inside the codec) for colour
        arr = img[0] if len(img) == 1 else np.ascontiguousarray(img.transpose(1, 2, 0))
        for quality in _JPEG_QUALITY[: level + 1]:
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
            buf.seek(0)
            with Image.open(buf) as dec:
                arr = np.asarray(dec)
        out[i] = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return out / 255.0


def _pixelate_cells(n: int, scale: float, level: int) -> list[int]:
    """Cells along a side of ``n`` px for levels 1 .. level + 1: strictly falling, below n."""
    cells = [n]
    for block in _PIXELATE_BLOCK[: level + 1]:
        cells.append(max(1, min(round(n / (block * scale)), cells[-1] - 1)))
    return cells[1:]


def _area_matrix(n: int, m: int) -> np.ndarray:
    """(m, n) matrix averaging ``n`` pixels into ``m`` equal cells by overlap (area resize)."""
    edges = np.arange(m + 1) * (n / m)
    px = np.arange(n)
    overlap = np.minimum(edges[1:, None], px + 1.0) - np.maximum(edges[:-1, None], px)
    return (np.clip(overlap, 0.0, None) * (m / n)).astype(np.float32)


def _nearest_index(n: int, m: int) -> np.ndarray:
    """For each of ``n`` pixels, the one of ``m`` equal cells that holds its centre."""
    return ((2 * np.arange(n) + 1) * m) // (2 * n)


def _pixelate(x: np.ndarray, level: int, rng: np.random.Generator, scale: float) -> np.ndarray:
    h, w = x.shape[2:]
    out = x
    # level s pixelates the level s - 1 result again, on a coarser grid: grids of
    # non-integer block sizes do not nest, and a fresh coarser grid that happens to line
    # up with the image's edges can look closer to it than a finer one
    for mh, mw in zip(
        _pixelate_cells(h, scale, level), _pixelate_cells(w, scale, level), strict=True
    ):
        small = _area_matrix(h, mh) @ out @ _area_matrix(w, mw).T
        out = small[:, :, _nearest_index(h, mh)][:, :, :, _nearest_index(w, mw)]
    return out


def _contrast(x: np.ndarray, level: int, rng: np.random.Generator, scale: float) -> np.ndarray:
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    return mean + _CONTRAST_KEEP[level] * (x - mean)


def _line_kernels(length: float, angles: np.ndarray) -> np.ndarray:
    """Normalised anti-aliased line segments (b, k, k) centred on the kernel, one per angle."""
    r = math.ceil(length / 2) + 1
    n = math.ceil(length / 0.25) + 1  # points 0.25 px apart, splatted bilinearly
    t = np.linspace(-length / 2, length / 2, n)
    ys = r + np.sin(angles)[:, None] * t
    xs = r + np.cos(angles)[:, None] * t
    img = np.broadcast_to(np.arange(len(angles))[:, None], ys.shape)
    w = np.full(ys.size, 1.0 / n)
    k = _splat(len(angles), img.ravel(), ys.ravel(), xs.ravel(), w, (2 * r + 1, 2 * r + 1))
    return k / k.sum(axis=(1, 2), keepdims=True)


def _motion_blur(x: np.ndarray, level: int, rng: np.random.Generator, scale: float) -> np.ndarray:
    angles = rng.uniform(0.0, np.pi, size=len(x))  # camera shake direction, per image
    return _fft_convolve(x, _line_kernels(_MOTION_LENGTH[level] * scale, angles)[:, None])


def _decolor(x: np.ndarray, level: int, rng: np.random.Generator, scale: float) -> np.ndarray:
    b, c = x.shape[:2]
    warm = np.where(rng.random(b) < 0.5, 1.0, -1.0).reshape(b, 1, 1, 1)
    tint = rng.uniform(-0.3, 0.3, size=(b, 1, 1, 1))  # green (+) / magenta (-)
    if c == 3:
        luma = (x * _LUMA).sum(axis=1, keepdims=True)
        washed = luma + (1.0 - _DECOLOR_DESATURATE[level]) * (x - luma)
        gains = 1.0 + _DECOLOR_WHITE_BALANCE[level] * np.concatenate([warm, tint, -warm], axis=1)
        return washed * gains
    # grayscale: no colour to remove, so a faded print (flat blacks/whites, shifted mid-tones)
    fade = _DECOLOR_FADE[level]
    return fade + (1.0 - 2.0 * fade) * x ** np.exp(warm * _DECOLOR_GAMMA[level])


_KINDS: dict[str, _Kind] = {
    "noise": _noise,
    "lens_blur": _lens_blur,
    "gaussian_blur": _gaussian_blur,
    "dirty_lens": _dirty_lens,
    "exposure": _exposure,
    "snow": _snow,
    "haze": _haze,
    "jpeg": _jpeg,
    "pixelate": _pixelate,
    "contrast": _contrast,
    "motion_blur": _motion_blur,
    "decolor": _decolor,
}
assert tuple(_KINDS) == ALL_CORRUPTIONS


def plot_corruption_grid(
    images: np.ndarray,
    path: str | Path,
    seed: int = 0,
    kinds: Sequence[str] = CORRUPTIONS,
    dpi: int = 100,
) -> Path:
    """Save a PNG grid: one row per kind; per image, a clean column then severities 1..5.

    Accepts any input ``corrupt`` accepts; RGB images are shown in colour.
    """
    from matplotlib.figure import Figure  # lazy: plotting is optional for users of corrupt()

    x, _ = _as_batch(images)
    aspect = x.shape[3] / x.shape[2]
    n_cols = len(x) * (1 + len(SEVERITIES))
    fig = Figure(figsize=(1.0 * aspect * n_cols, 1.05 * len(kinds) + 0.4))
    axes = fig.subplots(len(kinds), n_cols, squeeze=False)
    for row, kind in enumerate(kinds):
        levels = [x] + [corrupt(x, kind, s, seed) for s in SEVERITIES]
        for i in range(len(x)):
            for j, imgs in enumerate(levels):
                ax = axes[row, i * len(levels) + j]
                if imgs.shape[1] == 1:
                    ax.imshow(imgs[i, 0], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
                else:
                    ax.imshow(imgs[i].transpose(1, 2, 0), interpolation="nearest")
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
