"""Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (IDX files, offline)."""

from __future__ import annotations

import gzip
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FASHION_MNIST_DIR = Path(
    os.environ.get("GRADPROBE_FASHION_MNIST", "/usr/share/datasets/fashion-mnist")
)
FASHION_MNIST_CLASSES = (
    "t-shirt/top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
_FILES = {
    ("train", "images"): "train-images-idx3-ubyte.gz",
    ("train", "labels"): "train-labels-idx1-ubyte.gz",
    ("test", "images"): "t10k-images-idx3-ubyte.gz",
    ("test", "labels"): "t10k-labels-idx1-ubyte.gz",
}


class DatasetMissing(FileNotFoundError):
    """The data files are not installed."""


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # uint8 (n, 28, 28)
    labels: np.ndarray  # int64 (n,)


def _path(split: str, kind: str, root: Path) -> Path:
    path = root / _FILES[(split, kind)]
    if not path.exists():
        raise DatasetMissing(
            f"{path} not found: install it with `sudo apt-get install -y dataset-fashion-mnist` "
            "or point GRADPROBE_FASHION_MNIST at a folder with the four IDX .gz files"
        )
    return path


def read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (optionally gzipped): big-endian dims after a 4-byte magic."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    ndim = data[3]
    dims = np.frombuffer(data, dtype=">u4", count=ndim, offset=4).astype(int)
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(dims)):
        raise ValueError(f"{path} is truncated: expected {int(np.prod(dims))} values")
    return array.reshape(dims).copy()  # writable, so torch.from_numpy is safe


def load_fashion_mnist(split: str, root: Path | None = None) -> Split:
    """The 60,000 training or 10,000 test images (uint8, 28×28) with their labels."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = root or FASHION_MNIST_DIR
    images = read_idx(_path(split, "images", root))
    labels = read_idx(_path(split, "labels", root)).astype(np.int64)
    return Split(images=images, labels=labels)


def fashion_mnist_digest(root: Path | None = None) -> str:
    """sha256 over the four files, so that artifacts built from them can be keyed by content."""
    root = root or FASHION_MNIST_DIR
    digest = hashlib.sha256()
    for key in sorted(_FILES):
        digest.update(_path(*key, root).read_bytes())
    return digest.hexdigest()


def to_float(images: np.ndarray) -> np.ndarray:
    """uint8 (n, 28, 28) → float32 (n, 1, 28, 28) in [0, 1], the classifier's input."""
    return (images.astype(np.float32) / 255.0)[:, None]
