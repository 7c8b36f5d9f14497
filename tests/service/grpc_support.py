"""A real, small detector H for the service tests, and helpers to run servers in them.

``LogisticDetector`` is a scikit-learn logistic regression on the log10 gradient features of
the default classifier, fitted on clean Fashion-MNIST test images (in_distribution), MNIST
digits (ood), noisy and blurred images (corrupted) and FGSM images (adversarial). It is not
the product's H; it only has to be a genuine ``Detector`` whose verdicts vary with the input.
"""

from __future__ import annotations

import hashlib
import pickle
import socket

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from detectors.gradients import GradientFeatures, GradientSignals
from service.assessor import VERDICTS

PER_SET = 200


def log_features(signals: GradientSignals) -> np.ndarray:
    features = signals.features.detach().cpu().numpy().reshape(len(signals.features), -1)
    return np.log10(features.astype(np.float64) + 1e-12)


class LogisticDetector:
    """Detector protocol: version, sha256, predict_proba(signals) -> (B, 4) in VERDICTS order."""

    version = "test-logistic-1"

    def __init__(self, model: object) -> None:
        self.model = model
        self.sha256 = hashlib.sha256(pickle.dumps(model)).hexdigest()

    def predict_proba(self, signals: GradientSignals) -> np.ndarray:
        return self.model.predict_proba(log_features(signals)).astype(np.float64)


def training_sets(classifier, per_set: int = PER_SET, seed: int = 0) -> dict[str, np.ndarray]:
    """VERDICTS name → float32 images (n, 1, 28, 28)."""
    from detectors.challenge.corruptions import corrupt
    from detectors.challenge.ood import mnist_digits
    from detectors.datasets import load_fashion_mnist, to_float
    from service.demo import fgsm

    rng = np.random.default_rng(seed)
    test = load_fashion_mnist("test")
    pick = rng.choice(len(test.labels), size=4 * per_set, replace=False)
    clean, noisy_src, blur_src, adv_src = np.split(pick, 4)
    x = to_float(test.images)
    adversarial = fgsm(
        classifier.module,
        torch.from_numpy(x[adv_src]),
        torch.from_numpy(test.labels[adv_src].astype(np.int64)),
        eps=0.15,
    ).numpy()
    corrupted = np.concatenate(
        [
            corrupt(x[noisy_src], "noise", 4, seed),
            corrupt(x[blur_src], "gaussian_blur", 4, seed),
        ]
    )
    return {
        "in_distribution": x[clean],
        "ood": mnist_digits(per_set, seed=seed)[:, None],
        "corrupted": corrupted,
        "adversarial": adversarial,
    }


def fit_detector(classifier, per_set: int = PER_SET, seed: int = 0) -> LogisticDetector:
    engine = GradientFeatures(classifier.module)
    rows, labels = [], []
    for label, (_, images) in enumerate(
        (name, training_sets(classifier, per_set, seed)[name]) for name in VERDICTS
    ):
        with torch.no_grad():
            rows.append(log_features(engine.signals(torch.from_numpy(images.astype(np.float32)))))
        labels.append(np.full(len(images), label))
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=1.0))
    model.fit(np.concatenate(rows), np.concatenate(labels))
    assert list(model.classes_) == list(range(len(VERDICTS)))  # columns in VERDICTS order
    return LogisticDetector(model)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(assessor, **overrides):
    """A real server on a free loopback port, loaded and SERVING; call ``.stop(0)`` after."""
    from service.server import ReliabilityServer
    from service.settings import Settings

    values = {
        "host": "127.0.0.1",
        "port": 0,
        "metrics_port": -1,
        "max_batch_size": 8,
        "max_wait_ms": 5.0,
        "max_queue": 64,
        "max_images_per_request": 32,
        "max_message_bytes": 256 * 1024,
        "workers": 16,
        "grace_s": 5.0,
    }
    server = ReliabilityServer(Settings(**{**values, **overrides}))
    server.start()
    server.load(assessor)
    return server


def sample_images(per_kind: int = 3, seed: int = 0) -> np.ndarray:
    """A few clean, MNIST-digit and noisy images, float32 (n, 1, 28, 28), not from training."""
    from detectors.challenge.corruptions import corrupt
    from detectors.challenge.ood import mnist_digits
    from detectors.datasets import load_fashion_mnist, to_float

    test = load_fashion_mnist("test")
    clean = to_float(test.images[-per_kind:])
    digits = mnist_digits(per_kind, seed=seed + 1000)[:, None]
    noisy = corrupt(to_float(test.images[-2 * per_kind : -per_kind]), "noise", 4, seed)
    return np.concatenate([clean, digits, noisy]).astype(np.float32)
