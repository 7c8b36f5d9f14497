"""Checking client images against the model's spec before they reach it, with errors a person
can act on.

Shared by the CLI and the network service: everything that can be wrong with an input batch is
found here and reported as ``InvalidInput``, whose message says what the model expects. The
expectations come from the model dir's manifest (``detectors.spec.ModelSpec``), never from a
fixed size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from detectors.spec import ModelSpec

GENERIC_EXPECTED = (
    "float32 (B, C, H, W) in [0, 1] at the model's input shape (see `gradprobe info`)"
)


class InvalidInput(ValueError):
    """The client's input cannot be assessed; the message says what was expected."""


def to_model_input(images: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """Validate a batch and return it as float32 (B, C, H, W) in [0, 1].

    Accepted: float32 (B, C, H, W) with values in [0, 1], or uint8 raw pixels (divided by 255
    here) as (B, C, H, W) or, channels last, (B, H, W, C); one-channel models also take
    (B, H, W) either way.
    """
    if not isinstance(images, np.ndarray):
        raise InvalidInput(f"expected a numpy array, got {type(images).__name__}")
    expected = spec.describe()
    if images.dtype not in (np.float32, np.uint8):
        hint = " (cast with .astype(np.float32))" if images.dtype.kind == "f" else ""
        raise InvalidInput(f"expected {expected}; got dtype {images.dtype}{hint}")
    shape = images.shape
    images = _channels_first(images, spec)
    if images is None:
        raise InvalidInput(f"expected {expected}; got shape {shape}")
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


def _channels_first(images: np.ndarray, spec: ModelSpec) -> np.ndarray | None:
    """(B, C, H, W) from the accepted layouts, or None when the shape fits none."""
    c, h, w = spec.input_shape
    if images.ndim == 3 and c == 1 and images.shape[1:] == (h, w):
        return images[:, None]
    if images.ndim != 4:
        return None
    if images.shape[1:] == (c, h, w):
        return images
    if images.dtype == np.uint8 and images.shape[1:] == (h, w, c):
        return images.transpose(0, 3, 1, 2)
    return None


def load_images(path: Path, spec: ModelSpec) -> np.ndarray:
    """Read a ``.npy`` batch and validate it (never unpickles: ``allow_pickle=False``)."""
    path = Path(path)
    expected = spec.describe()
    if not path.exists():
        raise InvalidInput(f"{path} does not exist")
    if path.stat().st_size == 0:
        raise InvalidInput(f"{path} is empty; expected a .npy file holding {expected}")
    try:
        array = np.load(path, allow_pickle=False)
    except ValueError as exc:
        raise InvalidInput(
            f"{path} is not a readable .npy array ({exc}); expected {expected}"
        ) from exc
    if not isinstance(array, np.ndarray):
        raise InvalidInput(f"{path} holds an archive of several arrays; expected one array")
    return to_model_input(array, spec)
