"""A second, RGB example to try GradProbe on, built offline in a few minutes: traffic signs.

The README's first example is the built-in grayscale Fashion-MNIST classifier. This one shows
the bring-your-own-classifier path on colour images, without downloads: it draws a synthetic
traffic-sign data set (12 classes: stop, yield, four speed limits, no entry, turn left/right,
warning, priority, parking) as an ImageFolder tree of PNGs, trains a small ResNet-style CNN
(``SignNet``) on it and exports that to TorchScript, the form a user brings.

Every image is a sign drawn at 4x resolution with random scale, position, rotation and
perspective, composited over a crop of a natural photo from ``skimage.data`` (or a sky/road
gradient), downsampled with anti-aliasing, then given lighting, colour, blur and sensor noise.
Images are deterministic for a seed: each one has its own random stream keyed by (seed, split,
class, index), so the train and test splits never share a stream.

    out_dir/train/<class>/00000.png ...   ImageFolder: sorted folder names = class indices
    out_dir/test/<class>/00000.png ...
    out_dir/classifier.pt                 TorchScript, float32 (B, 3, S, S) in [0, 1] -> logits
    out_dir/README.txt                    what was made

``build_example`` does all of it (backs ``gradprobe example signs --output DIR``).
"""

from __future__ import annotations

import functools
import math
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from scipy.ndimage import gaussian_filter
from torch import Tensor, nn

# Drawing at 4x and downsampling gives anti-aliased edges and text at any output size.
SUPERSAMPLE = 4
SPLITS = ("train", "test")
# The test split gets a third as many images per class as the training split.
TEST_FRACTION = 3
DEFAULT_EPOCHS = 10

Color = tuple[int, int, int]
Point = tuple[float, float]
# Draws one sign on its canvas: (draw, centre, radius, rng); the sign fills the radius.
SignPainter = Callable[[ImageDraw.ImageDraw, Point, float, np.random.Generator], None]

RED: Color = (200, 25, 35)
WHITE: Color = (245, 245, 240)
BLUE: Color = (25, 75, 170)
YELLOW: Color = (250, 195, 10)
BLACK: Color = (25, 25, 25)


# --------------------------------------------------------------------------- drawing the signs


@functools.cache
def _font_path() -> str | None:
    """A bold sans font file: matplotlib ships DejaVu Sans Bold, so it is there wherever we are."""
    try:
        from matplotlib import font_manager

        props = font_manager.FontProperties(family="DejaVu Sans", weight="bold")
        return font_manager.findfont(props, fallback_to_default=False)
    except Exception:
        return None


@functools.cache
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    path = _font_path()
    if path is not None:
        try:
            return ImageFont.truetype(path, size)
        except OSError:
            pass
    return ImageFont.load_default(size=size)


@functools.cache
def _fitted_font_size(text: str, height: float, max_width: float) -> int:
    """The font size whose rendering of ``text`` is ``height`` tall and at most ``max_width``."""
    size = max(4, round(height))
    for _ in range(3):  # converges in one or two steps: glyph size is proportional to font size
        left, top, right, bottom = _font(size).getbbox(text)
        scale = min(height / max(bottom - top, 1), max_width / max(right - left, 1))
        new_size = max(4, round(size * scale))
        if new_size == size:
            break
        size = new_size
    return size


def _text(
    draw: ImageDraw.ImageDraw, text: str, center: Point, height: float, width: float, fill: Color
) -> None:
    """Draws ``text`` with its ink box (not its line box) centred on ``center``."""
    font = _font(_fitted_font_size(text, round(height), round(width)))
    left, top, right, bottom = font.getbbox(text)
    x = center[0] - (left + right) / 2
    y = center[1] - (top + bottom) / 2
    draw.text((x, y), text, font=font, fill=fill)


def _regular(center: Point, radius: float, sides: int, start_deg: float) -> list[Point]:
    cx, cy = center
    return [
        (
            cx + radius * math.cos(math.radians(start_deg + 360 * k / sides)),
            cy + radius * math.sin(math.radians(start_deg + 360 * k / sides)),
        )
        for k in range(sides)
    ]


def _disk(draw: ImageDraw.ImageDraw, center: Point, radius: float, fill: Color) -> None:
    cx, cy = center
    draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)


def _shifted(points: list[Point], dx: float, dy: float) -> list[Point]:
    return [(x + dx, y + dy) for x, y in points]


def _jitter(color: Color, rng: np.random.Generator, amount: float = 12) -> Color:
    """Paint differs from sign to sign (fading, make): a small per-sign shift in each channel."""
    shifted = np.clip(np.array(color) + rng.normal(0, amount, 3), 0, 255)
    return (int(shifted[0]), int(shifted[1]), int(shifted[2]))


def _triangle(
    draw: ImageDraw.ImageDraw, c: Point, r: float, rng: np.random.Generator, point_down: bool
) -> Point:
    """A red-bordered white triangle filling the canvas; returns its inner centroid."""
    # An equilateral triangle on a circle of radius R spans 1.5 R vertically: centre that span.
    big = 1.12 * r
    start = 90 if point_down else -90
    shift = -0.25 * big if point_down else 0.25 * big
    outer = _shifted(_regular(c, big, 3, start), 0, shift)
    centroid = (c[0], c[1] + shift)
    border = rng.uniform(0.52, 0.6)  # the white field's size relative to the red triangle
    inner = [
        (centroid[0] + border * (x - centroid[0]), centroid[1] + border * (y - centroid[1]))
        for x, y in outer
    ]
    draw.polygon(outer, fill=_jitter(RED, rng))
    draw.polygon(inner, fill=_jitter(WHITE, rng, 6))
    return centroid


def _stop(draw: ImageDraw.ImageDraw, c: Point, r: float, rng: np.random.Generator) -> None:
    draw.polygon(_regular(c, r, 8, 22.5), fill=_jitter(WHITE, rng, 6))
    draw.polygon(_regular(c, r * rng.uniform(0.88, 0.93), 8, 22.5), fill=_jitter(RED, rng))
    _text(draw, "STOP", c, 0.42 * r, 1.4 * r, _jitter(WHITE, rng, 6))


def _yield(draw: ImageDraw.ImageDraw, c: Point, r: float, rng: np.random.Generator) -> None:
    _triangle(draw, c, r, rng, point_down=True)


def _warning(draw: ImageDraw.ImageDraw, c: Point, r: float, rng: np.random.Generator) -> None:
    centroid = _triangle(draw, c, r, rng, point_down=False)
    # The glyph sits a little low: the triangle's inner field is widest near its base.
    _text(draw, "!", (centroid[0], centroid[1] + 0.08 * r), 0.6 * r, 0.5 * r, _jitter(BLACK, rng))


def _speed(limit: int) -> SignPainter:
    def draw_limit(draw: ImageDraw.ImageDraw, c: Point, r: float, rng: np.random.Generator) -> None:
        _disk(draw, c, r, _jitter(RED, rng))
        _disk(draw, c, r * rng.uniform(0.74, 0.8), _jitter(WHITE, rng, 6))
        _text(draw, str(limit), c, 0.72 * r, 1.15 * r, _jitter(BLACK, rng))

    return draw_limit


def _no_entry(draw: ImageDraw.ImageDraw, c: Point, r: float, rng: np.random.Generator) -> None:
    _disk(draw, c, r, _jitter(WHITE, rng, 6))
    _disk(draw, c, r * rng.uniform(0.93, 0.97), _jitter(RED, rng))
    half_w, half_h = r * rng.uniform(0.62, 0.7), r * rng.uniform(0.14, 0.18)
    draw.rectangle(
        (c[0] - half_w, c[1] - half_h, c[0] + half_w, c[1] + half_h), fill=_jitter(WHITE, rng, 6)
    )


def _turn(direction: int) -> SignPainter:
    """A blue disk with a white arrow that goes up and then turns left (-1) or right (+1)."""

    def draw_turn(draw: ImageDraw.ImageDraw, c: Point, r: float, rng: np.random.Generator) -> None:
        _disk(draw, c, r, _jitter(WHITE, rng, 6))
        _disk(draw, c, r * rng.uniform(0.93, 0.97), _jitter(BLUE, rng))

        def at(x: float, y: float) -> Point:  # arrow units of r, drawn as if pointing left
            return (c[0] - direction * x * r, c[1] + y * r)

        half = rng.uniform(0.11, 0.14)  # half the stroke width
        stem, bend, neck = 0.2, -0.12, -0.22  # x of the upright, y of the turn, x of the head
        fill = _jitter(WHITE, rng, 6)
        # The upright from the bottom to the turn, the crossbar to the head, then the head.
        upright = [(stem - half, 0.62), (stem + half, 0.62), (stem + half, bend - half),
                   (stem - half, bend - half)]  # fmt: skip
        crossbar = [(stem + half, bend - half), (neck, bend - half), (neck, bend + half),
                    (stem + half, bend + half)]  # fmt: skip
        head = [(neck, bend - 0.36), (-0.64, bend), (neck, bend + 0.36)]
        for polygon in (upright, crossbar, head):
            draw.polygon([at(x, y) for x, y in polygon], fill=fill)

    return draw_turn


def _priority(draw: ImageDraw.ImageDraw, c: Point, r: float, rng: np.random.Generator) -> None:
    draw.polygon(_regular(c, r, 4, 0), fill=_jitter(BLACK, rng))
    draw.polygon(_regular(c, r * 0.95, 4, 0), fill=_jitter(WHITE, rng, 6))
    draw.polygon(_regular(c, r * rng.uniform(0.62, 0.7), 4, 0), fill=_jitter(YELLOW, rng))


def _parking(draw: ImageDraw.ImageDraw, c: Point, r: float, rng: np.random.Generator) -> None:
    half = 0.86 * r
    box = (c[0] - half, c[1] - half, c[0] + half, c[1] + half)
    draw.rounded_rectangle(box, radius=0.15 * r, fill=_jitter(WHITE, rng, 6))
    inset = r * rng.uniform(0.05, 0.08)
    inner = (box[0] + inset, box[1] + inset, box[2] - inset, box[3] - inset)
    draw.rounded_rectangle(inner, radius=0.12 * r, fill=_jitter(BLUE, rng))
    _text(draw, "P", c, 1.0 * r, 1.2 * r, _jitter(WHITE, rng, 6))


# Class name -> painter; the names are the ImageFolder folder names, so keep them sorted.
SIGNS: dict[str, SignPainter] = dict(
    sorted(
        {
            "stop": _stop,
            "yield": _yield,
            "speed_30": _speed(30),
            "speed_50": _speed(50),
            "speed_70": _speed(70),
            "speed_90": _speed(90),
            "no_entry": _no_entry,
            "turn_left": _turn(-1),
            "turn_right": _turn(+1),
            "warning": _warning,
            "priority": _priority,
            "parking": _parking,
        }.items()
    )
)
CLASSES: tuple[str, ...] = tuple(SIGNS)


# --------------------------------------------------------------------------- backgrounds


@functools.cache
def _photos() -> tuple[Image.Image, ...]:
    """Natural photos bundled with scikit-image (no download); textures get a colour tint."""
    import skimage.data

    photos = [
        Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        for name in ("astronaut", "coffee", "chelsea", "rocket")
    ]
    tints = {
        "brick": (1.0, 0.62, 0.5),
        "grass": (0.55, 0.95, 0.45),
        "gravel": (0.9, 0.85, 0.75),
        "camera": (0.9, 0.95, 1.0),
    }
    for name, tint in tints.items():
        gray = getattr(skimage.data, name)().astype(np.float32)
        rgb = np.clip(gray[..., None] * np.array(tint, dtype=np.float32), 0, 255)
        photos.append(Image.fromarray(rgb.astype(np.uint8)))
    return tuple(photos)


def _photo_background(side: int, rng: np.random.Generator) -> Image.Image:
    photos = _photos()
    photo = photos[rng.integers(len(photos))]
    w, h = photo.size
    crop = rng.uniform(0.15, 0.6) * min(w, h)
    x0, y0 = rng.uniform(0, w - crop), rng.uniform(0, h - crop)
    image = photo.resize(
        (side, side), Image.Resampling.BILINEAR, box=(x0, y0, x0 + crop, y0 + crop)
    )
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return image


def _gradient_background(side: int, rng: np.random.Generator) -> Image.Image:
    """Sky fading to the horizon, and below it (sometimes) road or verge."""
    t = np.linspace(0, 1, side, dtype=np.float32)[:, None, None]
    top = np.array([rng.uniform(40, 140), rng.uniform(90, 170), rng.uniform(170, 250)])
    horizon = np.array([rng.uniform(170, 240)] * 3) + rng.normal(0, 10, 3)
    image = top + (horizon - top) * t
    if rng.random() < 0.6:
        line = int(side * rng.uniform(0.45, 0.85))
        ground = rng.choice([[95, 95, 100], [80, 115, 60], [120, 105, 85]]) + rng.normal(0, 12, 3)
        depth = np.linspace(0.8, 1.15, side - line, dtype=np.float32)[:, None, None]
        image[line:] = ground * depth
    image = np.broadcast_to(image, (side, side, 3)).copy()
    # Low-frequency blotches (clouds, wear) so the plain gradient is not a give-away.
    blotches = gaussian_filter(rng.normal(0, 1, (side, side)).astype(np.float32), side / 12)
    image += (blotches / (blotches.std() + 1e-6) * rng.uniform(0, 12))[..., None]
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))


def _background(side: int, rng: np.random.Generator) -> Image.Image:
    if rng.random() < 0.75:
        return _photo_background(side, rng)
    return _gradient_background(side, rng)


# --------------------------------------------------------------------------- one image


def _perspective_coeffs(dst: np.ndarray, src: np.ndarray) -> tuple[float, ...]:
    """PIL's PERSPECTIVE data: the homography taking output points ``dst`` to input ``src``."""
    rows = []
    for (x, y), (u, v) in zip(dst, src, strict=True):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
    solution = np.linalg.solve(np.array(rows, dtype=np.float64), src.reshape(-1).astype(np.float64))
    return tuple(float(s) for s in solution)


def render_sign(name: str, size: int, rng: np.random.Generator) -> Image.Image:
    """One RGB ``size`` x ``size`` image of sign ``name`` in a random scene."""
    side = size * SUPERSAMPLE
    # The sign, filling its own transparent canvas.
    sign = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    center = (side / 2, side / 2)
    SIGNS[name](ImageDraw.Draw(sign), center, 0.48 * side, rng)

    # Where it lands: scale, off-centre position, rotation, a viewing-angle squash and shear,
    # and a small independent shift of each corner for perspective.
    scale = rng.uniform(0.55, 0.92)
    reach = (1 - scale) * side / 2 * 1.1  # may poke slightly past the edge
    offset = rng.uniform(-reach, reach, 2)
    angle = math.radians(float(np.clip(rng.normal(0, 6), -14, 14)))
    squash, shear = rng.uniform(0.8, 1.0), rng.uniform(-0.1, 0.1)
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    linear = scale * rotation @ np.array([[squash, shear], [0.0, 1.0]])
    corners = np.array([[0, 0], [side, 0], [side, side], [0, side]], dtype=np.float64)
    placed = (corners - side / 2) @ linear.T + side / 2 + offset
    placed += rng.uniform(-0.04, 0.04, placed.shape) * side
    warped = sign.transform(
        (side, side),
        Image.Transform.PERSPECTIVE,
        _perspective_coeffs(placed, corners),
        Image.Resampling.BICUBIC,
    )

    scene = _background(side, rng).convert("RGBA")
    if rng.random() < 0.5:  # a post under the sign, behind it
        draw = ImageDraw.Draw(scene)
        cx, cy = placed.mean(0)
        half = scale * side * rng.uniform(0.03, 0.05)
        lean = math.tan(angle) * (side - cy)
        gray = int(rng.integers(90, 190))
        draw.polygon(
            [(cx - half, cy), (cx + half, cy), (cx + half - lean, side), (cx - half - lean, side)],
            fill=(gray, gray, gray + 5),
        )
    scene.alpha_composite(warped)
    small = scene.convert("RGB").resize((size, size), Image.Resampling.LANCZOS)

    # Camera and light: blur, colour cast, brightness, contrast, gamma, uneven light, noise.
    x = np.asarray(small, dtype=np.float32) / 255
    blur = rng.uniform(0, 0.7)
    if blur > 0.2:
        x = gaussian_filter(x, (blur, blur, 0))
    x = x * (1 + rng.normal(0, 0.06, 3)).astype(np.float32)
    x = x * rng.uniform(0.6, 1.3)
    mean = x.mean()
    x = (x - mean) * rng.uniform(0.7, 1.15) + mean
    x = np.clip(x, 0, 1) ** math.exp(rng.normal(0, 0.15))
    direction = rng.normal(0, 1, 2)
    ramp = np.linspace(-0.5, 0.5, size, dtype=np.float32)
    light = 1 + rng.uniform(0, 0.35) * (
        direction[0] * ramp[None, :] + direction[1] * ramp[:, None]
    ) / (np.linalg.norm(direction) + 1e-6)
    x = x * light[..., None] + rng.normal(0, rng.uniform(0.004, 0.03), x.shape)
    return Image.fromarray(np.round(np.clip(x, 0, 1) * 255).astype(np.uint8), "RGB")


def _image_rng(seed: int, split: str, class_index: int, index: int) -> np.random.Generator:
    """Each image its own stream: same seed, same image, whatever the counts or the order."""
    return np.random.default_rng([seed, SPLITS.index(split), class_index, index])


def make_signs(
    out_dir: Path,
    *,
    per_class: int = 300,
    size: int = 32,
    seed: int = 0,
    progress: bool = True,
    overwrite: bool = False,
) -> list[str]:
    """Writes ``out_dir/{train,test}/<class>/NNNNN.png`` and returns the class names.

    ``per_class`` training images per class; the test split gets a third as many (at least
    one). Class names are the sorted folder names, so their order is the class indices of
    torchvision's ``ImageFolder``. Existing ``train``/``test`` folders are an error unless
    ``overwrite``, which deletes them first (stale images would silently join the data).
    """
    from tqdm import tqdm

    if per_class < 1 or size < 8:
        raise ValueError(f"need per_class >= 1 and size >= 8, got {per_class} and {size}")
    out_dir = Path(out_dir)
    for split in SPLITS:
        existing = out_dir / split
        if existing.exists() and any(existing.iterdir()):
            if not overwrite:
                raise FileExistsError(f"{existing} exists and is not empty (use overwrite=True)")
            shutil.rmtree(existing)
    counts = {"train": per_class, "test": max(1, per_class // TEST_FRACTION)}
    for split in SPLITS:
        jobs = [(ci, name, i) for ci, name in enumerate(CLASSES) for i in range(counts[split])]
        for name in CLASSES:
            (out_dir / split / name).mkdir(parents=True, exist_ok=True)
        for ci, name, i in tqdm(
            jobs, desc=f"signs {split}", unit="img", disable=not progress, file=sys.stderr
        ):
            image = render_sign(name, size, _image_rng(seed, split, ci, i))
            image.save(out_dir / split / name / f"{i:05d}.png")
    return list(CLASSES)


# --------------------------------------------------------------------------- the classifier


class _Residual(nn.Module):
    """conv-bn-relu-conv-bn plus the identity, then relu (a ResNet basic block)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu1 = nn.ReLU()
        self.relu2 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        return self.relu2(self.bn2(self.conv2(out)) + x)


def _conv_bn_relu(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(),
    )


class SignNet(nn.Module):
    """A small ResNet: float32 (B, 3, S, S) RGB in [0, 1] -> logits (B, n_classes).

    stem conv + max pool (S/2) -> residual block -> strided conv (S/4) -> residual block ->
    strided conv (S/8) -> global average pool -> linear. Any S >= 8 works (24, 32, 48...); the pixel
    normalization is inside the model (buffers), so clients send plain [0, 1] pixels.
    """

    def __init__(
        self,
        n_classes: int = len(CLASSES),
        widths: tuple[int, int, int] = (24, 48, 96),
        mean: tuple[float, float, float] = (0.5, 0.5, 0.5),
        std: tuple[float, float, float] = (0.25, 0.25, 0.25),
    ) -> None:
        super().__init__()
        self.register_buffer("pixel_mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("pixel_std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        a, b, c = widths
        self.stem = _conv_bn_relu(3, a)
        self.pool = nn.MaxPool2d(2)
        self.block1 = _Residual(a)
        self.down1 = _conv_bn_relu(a, b, stride=2)
        self.block2 = _Residual(b)
        self.down2 = _conv_bn_relu(b, c, stride=2)
        self.head = nn.Linear(c, n_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = (x - self.pixel_mean) / self.pixel_std
        x = self.pool(self.stem(x))
        x = self.down1(self.block1(x))
        x = self.down2(self.block2(x))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


def load_split(data_dir: Path, split: str) -> tuple[Tensor, Tensor, list[str]]:
    """Images (N, 3, S, S) float32 in [0, 1], labels (N,) and class names, via ImageFolder."""
    from torchvision.datasets import ImageFolder

    folder = ImageFolder(str(Path(data_dir) / split))
    images = np.stack(
        [np.asarray(folder.loader(path), dtype=np.uint8) for path, _ in folder.samples]
    )
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255)
    y = torch.tensor(folder.targets, dtype=torch.int64)
    return x.contiguous(), y, list(folder.classes)


def _shift(x: Tensor, max_shift: int, generator: torch.Generator) -> Tensor:
    """Random translations of up to ``max_shift`` pixels per image (edges replicated).

    Only translations: flips would turn a left arrow into a right one and mirror the digits,
    and large crops would cut signs off.
    """
    b, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, mode="replicate")
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, b), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :]
    return padded[
        torch.arange(b)[:, None, None, None],
        torch.arange(x.shape[1])[None, :, None, None],
        rows,
        cols,
    ]


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch: int = 512) -> float:
    """Top-1 accuracy of ``model`` (in eval mode) on images ``x`` with labels ``y``."""
    model.eval()
    correct = sum(
        int((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum())
        for i in range(0, len(x), batch)
    )
    return correct / max(len(x), 1)


def train_signs(
    data_dir: Path,
    *,
    epochs: int = DEFAULT_EPOCHS,
    seed: int = 0,
    progress: bool = True,
    batch_size: int = 64,
    learning_rate: float = 4e-3,
) -> tuple[nn.Module, float]:
    """Trains a ``SignNet`` on ``data_dir/train``; returns it in eval mode and its test accuracy.

    AdamW with a one-cycle schedule, small random translations as the only augmentation.
    Reproducible for a seed on a given machine and thread count; the global torch RNG is left
    as it was.
    """
    from tqdm import tqdm

    x_train, y_train, classes = load_split(data_dir, "train")
    x_test, y_test, test_classes = load_split(data_dir, "test")
    if classes != test_classes:
        raise ValueError(f"train and test classes differ: {classes} vs {test_classes}")
    # Normalization from the training pixels, stored in the model's buffers.
    mean = x_train.mean((0, 2, 3))
    std = x_train.std((0, 2, 3)).clamp_min(1e-3)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SignNet(len(classes), mean=tuple(mean.tolist()), std=tuple(std.tolist()))
    generator = torch.Generator().manual_seed(seed)

    batch_size = min(batch_size, len(x_train))
    steps_per_epoch = len(x_train) // batch_size  # full batches only: BatchNorm needs >1 sample
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=learning_rate, total_steps=max(1, epochs * steps_per_epoch)
    )
    max_shift = max(1, x_train.shape[-1] // 16)  # 2 px at 32 px
    bar = tqdm(
        total=epochs * steps_per_epoch,
        desc="training SignNet",
        unit="step",
        disable=not progress,
        file=sys.stderr,
    )
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(x_train), generator=generator)
        total = 0.0
        for step in range(steps_per_epoch):
            index = order[step * batch_size : (step + 1) * batch_size]
            loss = F.cross_entropy(
                model(_shift(x_train[index], max_shift, generator)), y_train[index]
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item()
            bar.update()
        bar.set_postfix(epoch=epoch + 1, loss=f"{total / max(steps_per_epoch, 1):.3f}")
    bar.close()
    model.eval()
    return model, accuracy(model, x_test, y_test)


# --------------------------------------------------------------------------- export and all


def export_signs(model: nn.Module, path: Path, size: int) -> Path:
    """Traces ``model`` (eval mode) to TorchScript at ``path`` and checks the saved file.

    Raises ``RuntimeError`` when the reloaded file's logits differ from the module's.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model.eval()
    example = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    # TorchScript is what the example sets out to show (the common form users bring), so
    # torch's deprecation notices for torch.jit would only confuse a newcomer here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit\.")
        with torch.no_grad():
            traced = torch.jit.trace(model, example)
        torch.jit.save(traced, str(path))
        loaded = torch.jit.load(str(path), map_location="cpu")
    check = torch.rand(8, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = model(check), loaded(check)
    if not torch.allclose(expected, got, rtol=1e-5, atol=1e-5):
        raise RuntimeError(
            f"{path}: the TorchScript file disagrees with the module "
            f"(max |diff| {float((expected - got).abs().max()):.3g})"
        )
    return path


def build_example(
    out_dir: Path,
    *,
    per_class: int = 300,
    size: int = 32,
    epochs: int = DEFAULT_EPOCHS,
    seed: int = 0,
    progress: bool = True,
    overwrite: bool = False,
) -> Path:
    """Data in ``out_dir/{train,test}``, model in ``out_dir/classifier.pt``, ``README.txt``."""
    out_dir = Path(out_dir)
    start = time.perf_counter()
    classes = make_signs(
        out_dir, per_class=per_class, size=size, seed=seed, progress=progress, overwrite=overwrite
    )
    made = time.perf_counter()
    model, test_accuracy = train_signs(out_dir, epochs=epochs, seed=seed, progress=progress)
    trained = time.perf_counter()
    model_path = export_signs(model, out_dir / "classifier.pt", size)
    n_params = sum(p.numel() for p in model.parameters())
    n_test = max(1, per_class // TEST_FRACTION)
    lines = [
        "GradProbe example: synthetic traffic signs (RGB), made by detectors.fit.signs",
        "",
        f"train/  {per_class} images per class, {per_class * len(classes)} in all",
        f"test/   {n_test} images per class, {n_test * len(classes)} in all",
        f"images  PNG, RGB, {size}x{size}; seed {seed} (generated in {made - start:.0f} s)",
        "",
        f"{model_path.name}  TorchScript SignNet (small ResNet, {n_params:,} parameters), "
        f"{epochs} epochs in {trained - made:.0f} s",
        f"  input   float32 (B, 3, {size}, {size}), RGB in [0, 1] (normalization is inside)",
        f"  output  logits (B, {len(classes)}), in the class order below",
        f"  test accuracy  {test_accuracy:.4f}",
        "  load    torch.jit.load('classifier.pt')",
        "",
        "classes (index: folder name; ImageFolder order = sorted folder names):",
        *(f"  {i:2d}: {name}" for i, name in enumerate(classes)),
        "",
    ]
    (out_dir / "README.txt").write_text("\n".join(lines))
    return out_dir
