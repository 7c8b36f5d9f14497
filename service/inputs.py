"""Checking client images before they reach the model, with errors a person can act on.

Shared by the CLI and the network service: everything that can be wrong with an input batch is
found here and reported as ``InvalidInput``, whose message says what was expected.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

HEIGHT = WIDTH = 28
EXPECTED = "float32 (B, 1, 28, 28) in [0, 1] or uint8 (B, 28, 28)"


class InvalidInput(ValueError):
    """The client's input cannot be assessed; the message says what was expected."""


def to_model_input(images: np.ndarray) -> np.ndarray:
    """Validate a batch and return it as float32 (B, 1, 28, 28) in [0, 1].

    Accepted: float32 (B, 1, 28, 28) or (B, 28, 28) with values in [0, 1], or uint8
    (B, 28, 28) or (B, 1, 28, 28) raw pixels (divided by 255 here).
    """
    if not isinstance(images, np.ndarray):
        raise InvalidInput(f"expected a numpy array, got {type(images).__name__}")
    if images.dtype not in (np.float32, np.uint8):
        hint = " (cast with .astype(np.float32))" if images.dtype.kind == "f" else ""
        raise InvalidInput(f"expected {EXPECTED}; got dtype {images.dtype}{hint}")
    shape = images.shape
    if images.ndim == 3:
        images = images[:, None]
    if images.ndim != 4 or images.shape[1:] != (1, HEIGHT, WIDTH):
        raise InvalidInput(f"expected {EXPECTED}; got shape {shape}")
    if images.shape[0] == 0:
        raise InvalidInput("the batch is empty: send at least one image")
    if images.dtype == np.uint8:
        return images.astype(np.float32) / np.float32(255.0)
    finite = np.isfinite(images)
    if not finite.all():
        bad = int(np.flatnonzero(~finite.reshape(len(images), -1).all(1))[0])
        raise InvalidInput(f"image {bad} contains NaN or infinite values")
    low, high = float(images.min()), float(images.max())
    if low < 0.0 or high > 1.0:
        raise InvalidInput(
            f"float32 pixels must lie in [0, 1]; got values in [{low:g}, {high:g}] "
            "(divide 8-bit pixels by 255, or send them as uint8)"
        )
    return np.ascontiguousarray(images)


def load_images(path: Path) -> np.ndarray:
    """Read a ``.npy`` batch and validate it (never unpickles: ``allow_pickle=False``)."""
    path = Path(path)
    if not path.exists():
        raise InvalidInput(f"{path} does not exist")
    if path.stat().st_size == 0:
        raise InvalidInput(f"{path} is empty; expected a .npy file holding {EXPECTED}")
    try:
        array = np.load(path, allow_pickle=False)
    except ValueError as exc:
        raise InvalidInput(
            f"{path} is not a readable .npy array ({exc}); expected {EXPECTED}"
        ) from exc
    if not isinstance(array, np.ndarray):
        raise InvalidInput(f"{path} holds an archive of several arrays; expected one array")
    return to_model_input(array)
