"""Fitting: the user's labelled images, from an ImageFolder tree or an ``.npz``.

An ImageFolder tree has one sub-folder per class holding PNG/JPEG files; the sorted folder names
are the class indices (torchvision's convention); images of another size are resized
(bilinear, reported) and converted to the model's channels. An ``.npz`` holds ``images`` —
uint8 (n, H, W), (n, H, W, C) or (n, C, H, W), or floats in [0, 1] — at the model's size, and
``labels`` (n,), and optionally ``classes``. A data set installed on this machine can be named
instead of a path (``NAMED_SOURCES``: ``fashion-mnist:train``, ``fashion-mnist:test``, from the
Debian package the built-in example is trained on). Either way the result is float32
(n, C, H, W) in [0, 1].
"""

from __future__ import annotations

import hashlib
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

NAMED_SOURCES = ("fashion-mnist:train", "fashion-mnist:test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


class DataError(ValueError):
    """The user's data cannot be read as labelled images; the message says what to fix."""


@dataclass
class LabelledImages:
    images: np.ndarray  # float32 (n, C, H, W) in [0, 1]
    labels: np.ndarray  # int64 (n,)
    classes: list[str]
    digest: str  # sha256 over what was read, for cache keys
    resized: int = 0  # images that were resized to the model's size

    def __len__(self) -> int:
        return len(self.labels)


def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def named_source(path: Path | str) -> str | None:
    """The installed data set ``path`` names, if it names one."""
    text = str(path)
    if text in NAMED_SOURCES:
        return text
    if text.split(":")[0] in {n.split(":")[0] for n in NAMED_SOURCES} and ":" in text:
        raise DataError(f"unknown data set {text!r}; named sets: {', '.join(NAMED_SOURCES)}")
    return None


def _load_named(name: str, shape: tuple[int, int, int]) -> LabelledImages:
    from detectors.fit.fashion_mnist import (
        FASHION_MNIST_CLASSES,
        fashion_mnist_digest,
        load_fashion_mnist,
        to_float,
    )

    if tuple(shape) != (1, 28, 28):
        raise DataError(f"{name} holds 1×28×28 grey images; this classifier takes {list(shape)}")
    split = load_fashion_mnist(name.split(":")[1])
    digest = hashlib.sha256(f"{name}:{fashion_mnist_digest()}".encode()).hexdigest()
    return LabelledImages(
        to_float(split.images), split.labels.astype(np.int64), list(FASHION_MNIST_CLASSES), digest
    )


def survey(path: Path) -> tuple[int, int, int]:
    """(C, H, W) the data suggests: the most common size, 3 channels if any image has colour."""
    if named_source(path):
        return (1, 28, 28)
    path = Path(path)
    if path.suffix == ".npz":
        images = _npz_arrays(path)[0]
        return _npz_layout(images)[1]
    from PIL import Image

    files = [f for d in _class_dirs(path) for f in image_files(d)]
    sizes: Counter[tuple[int, int]] = Counter()
    colour = False
    for file in files[:2000]:  # a sample is enough to see the size and the mode
        with Image.open(file) as image:
            sizes[(image.height, image.width)] += 1
            colour = colour or image.mode not in ("L", "I", "I;16", "1", "F", "LA")
    (height, width), _ = sizes.most_common(1)[0]
    return (3 if colour else 1, height, width)


def load_labelled(
    path: Path, shape: tuple[int, int, int], classes: list[str] | None = None, quiet: bool = True
) -> LabelledImages:
    """Read an ImageFolder tree or an ``.npz`` as float32 (n, C, H, W) at ``shape``.

    ``classes``: the class names the classifier was fitted with (the training data's); a
    validation set must use the same folders.
    """
    name = named_source(path)
    path = Path(path)
    if name is None and not path.exists():
        raise DataError(f"{path} does not exist")
    if name is not None:
        data = _load_named(name, shape)
    elif path.suffix == ".npz":
        data = _load_npz(path, shape)
    else:
        data = _load_folder(path, shape, quiet)
    if classes is not None and data.classes != classes:
        unknown = sorted(set(data.classes) - set(classes))
        if unknown:
            raise DataError(f"{path} has classes {unknown} that the training data does not have")
        remap = np.array([classes.index(c) for c in data.classes])
        data = LabelledImages(data.images, remap[data.labels], classes, data.digest, data.resized)
    return data


def load_unlabelled(path: Path, shape: tuple[int, int, int], quiet: bool = True) -> np.ndarray:
    """All images under a folder (any depth), or an ``.npz``'s ``images``: the user's OOD set."""
    name = named_source(path)
    if name is not None:
        return _load_named(name, shape).images
    path = Path(path)
    if path.suffix == ".npz":
        return _load_npz(path, shape, need_labels=False).images
    files = image_files(path)
    if not files:
        raise DataError(f"{path} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    images, _ = _read_files(files, shape, quiet, f"reading {path.name}")
    return images


def _class_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        raise DataError(f"{root} is neither a folder of class folders nor an .npz file")
    dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if len(dirs) < 2:
        raise DataError(
            f"{root} must hold one sub-folder per class (at least two), each with PNG/JPEG "
            "images: the ImageFolder layout, e.g. train/cat/001.png, train/dog/002.png"
        )
    return dirs


def _load_folder(root: Path, shape: tuple[int, int, int], quiet: bool) -> LabelledImages:
    dirs = _class_dirs(root)
    files, labels = [], []
    for index, folder in enumerate(dirs):
        found = image_files(folder)
        if not found:
            raise DataError(f"class folder {folder} holds no images")
        files += found
        labels += [index] * len(found)
    images, resized = _read_files(files, shape, quiet, f"reading {root.name}")
    digest = hashlib.sha256()
    for file, label in zip(files, labels, strict=True):
        digest.update(f"{file.relative_to(root)}:{label}:".encode())
        digest.update(hashlib.sha256(file.read_bytes()).digest())
    return LabelledImages(
        images, np.asarray(labels, dtype=np.int64), [d.name for d in dirs], digest.hexdigest(),
        resized,
    )  # fmt: skip


def _read_files(
    files: list[Path], shape: tuple[int, int, int], quiet: bool, what: str
) -> tuple[np.ndarray, int]:
    from PIL import Image, UnidentifiedImageError
    from tqdm import tqdm

    channels, height, width = shape
    out = np.empty((len(files), channels, height, width), dtype=np.float32)
    resized = 0
    for i, file in enumerate(
        tqdm(files, desc=what, unit="img", disable=quiet or len(files) < 500, file=sys.stderr)
    ):
        try:
            with Image.open(file) as image:
                image = image.convert("RGB" if channels == 3 else "L")
                if image.size != (width, height):
                    image = image.resize((width, height), Image.Resampling.BILINEAR)
                    resized += 1
                pixels = np.asarray(image, dtype=np.float32) / 255.0
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
            raise DataError(f"{file} is not a readable image: {exc}") from exc
        out[i] = pixels.reshape(height, width, channels).transpose(2, 0, 1)
    return out, resized


def _npz_arrays(path: Path) -> tuple[np.ndarray, np.ndarray | None, list[str] | None]:
    try:
        with np.load(path, allow_pickle=False) as data:
            if "images" not in data:
                raise DataError(f"{path} has no `images` array (it has {list(data.keys())})")
            labels = data.get("labels", None)
            classes = [str(c) for c in data["classes"]] if "classes" in data else None
            return data["images"], labels, classes
    except (OSError, ValueError) as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(f"{path} is not a readable .npz file: {exc}") from exc


def _npz_layout(images: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Images as (n, C, H, W) and that shape, from any of the accepted layouts."""
    if images.ndim == 3:
        images = images[:, None]
    elif images.ndim == 4 and images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3):
        images = images.transpose(0, 3, 1, 2)
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise DataError(
            f"`images` has shape {images.shape}; expected (n, H, W), (n, H, W, C) or "
            "(n, C, H, W) with 1 or 3 channels"
        )
    return images, tuple(int(v) for v in images.shape[1:])  # type: ignore[return-value]


def _load_npz(path: Path, shape: tuple[int, int, int], need_labels: bool = True) -> LabelledImages:
    raw, labels, classes = _npz_arrays(path)
    images, found = _npz_layout(raw)
    if images.dtype == np.uint8:
        images = images.astype(np.float32) / 255.0
    elif np.issubdtype(images.dtype, np.floating):
        images = images.astype(np.float32)
        if not np.isfinite(images).all() or images.min() < 0 or images.max() > 1:
            raise DataError(f"{path}: float images must be finite and within [0, 1]")
    else:
        raise DataError(f"{path}: images must be uint8 or float in [0, 1], not {images.dtype}")
    if found != tuple(shape):
        raise DataError(f"{path}: images are {found}, the model takes {tuple(shape)}")
    if labels is None:
        if need_labels:
            raise DataError(f"{path} has no `labels` array")
        labels = np.zeros(len(images), dtype=np.int64)
    labels = np.asarray(labels).astype(np.int64)
    if labels.shape != (len(images),):
        raise DataError(f"{path}: {len(labels)} labels for {len(images)} images")
    n_classes = int(labels.max()) + 1 if len(labels) else 0
    classes = classes or [str(i) for i in range(n_classes)]
    if len(labels) and (labels.min() < 0 or labels.max() >= len(classes)):
        raise DataError(
            f"{path}: labels must be class indices 0..{len(classes) - 1}, got "
            f"{int(labels.min())}..{int(labels.max())}"
        )
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return LabelledImages(np.ascontiguousarray(images), labels, classes, digest)
