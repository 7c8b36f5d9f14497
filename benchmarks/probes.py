"""Images the reliability runs send: a fixed probe set per served model (its verdicts must
not change under load or after fuzzing) and the seeded pixels the load and the fuzz cases are
made of."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

VERDICT_NUMBER = {"in_distribution": 1, "ood": 2, "corrupted": 3, "adversarial": 4}


@dataclass(frozen=True)
class Model:
    """What the cases need to know of a served model."""

    name: str
    shape: tuple[int, int, int]  # C, H, W
    classes: int
    resizes: bool


def pixels(model: Model, seed: int, size: tuple[int, int] | None = None) -> np.ndarray:
    """Seeded uint8 pixels (H, W) or (H, W, C); smooth, so that JPEG keeps them close."""
    c, h, w = model.shape
    height, width = size or (h, w)
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(max(1, height // 4), max(1, width // 4), c))
    out = np.kron(coarse, np.ones((4, 4, 1)))[:height, :width]
    out = np.pad(out, ((0, height - out.shape[0]), (0, width - out.shape[1]), (0, 0)))
    return (out[..., 0] if c == 1 else out).astype(np.uint8)


def probe_images(model: Model, seed: int = 0) -> np.ndarray:
    """A fixed set of float32 images for ``model``: for the built-in Fashion-MNIST model
    clean test images, MNIST digits and noisy ones (different verdicts); for others, seeded
    smooth noise at the model's shape."""
    if model.shape == (1, 28, 28) and model.classes == 10:
        try:
            return fashion_probes(3, seed)
        except ImportError:  # a serving install without the fitting packages
            pass
    c, h, w = model.shape
    smooth = np.stack([pixels(model, seed + i).reshape(h, w, c) for i in range(6)])
    return np.ascontiguousarray(smooth.transpose(0, 3, 1, 2), np.float32) / np.float32(255)


def fashion_probes(per_kind: int = 3, seed: int = 0) -> np.ndarray:
    """Clean Fashion-MNIST test images, MNIST digits (OOD) and noisy images (corrupted)."""
    from detectors.fit.challenge.corruptions import corrupt
    from detectors.fit.challenge.ood import mnist_digits
    from detectors.fit.fashion_mnist import load_fashion_mnist, to_float

    test = load_fashion_mnist("test")
    clean = to_float(test.images[-per_kind:])
    digits = mnist_digits(per_kind, seed=seed + 1000)[:, None]
    noisy = corrupt(to_float(test.images[-2 * per_kind : -per_kind]), "noise", 4, seed)
    return np.concatenate([clean, digits, noisy]).astype(np.float32)


def probe_verdicts(target: str, models: Sequence[Model]) -> dict[str, list[tuple[int, int]]]:
    """(predicted class, verdict) of each model's probes, through the server."""
    from service.client import ReliabilityClient

    verdicts = {}
    with ReliabilityClient(target, timeout=120) as client:
        for model in models:
            answers = client.assess(probe_images(model), model=model.name)
            verdicts[model.name] = [
                (a["prediction"], VERDICT_NUMBER[a["verdict"]]) for a in answers
            ]
    return verdicts
