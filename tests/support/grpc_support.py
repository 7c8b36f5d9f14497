"""Helpers to run real servers in the service tests."""

from __future__ import annotations

import socket

import numpy as np


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
    from detectors.fit.challenge.corruptions import corrupt
    from detectors.fit.challenge.ood import mnist_digits
    from detectors.fit.fashion_mnist import load_fashion_mnist, to_float

    test = load_fashion_mnist("test")
    clean = to_float(test.images[-per_kind:])
    digits = mnist_digits(per_kind, seed=seed + 1000)[:, None]
    noisy = corrupt(to_float(test.images[-2 * per_kind : -per_kind]), "noise", 4, seed)
    return np.concatenate([clean, digits, noisy]).astype(np.float32)
