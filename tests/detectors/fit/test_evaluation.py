"""The evaluation's metrics on cases with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from detectors.fit.evaluation import auroc, detection_accuracy, fpr_at_95_tpr, kind_group


def test_perfect_and_chance_separation() -> None:
    neg, pos = np.arange(100.0), np.arange(100.0) + 1000
    assert auroc(neg, pos) == 1.0 and fpr_at_95_tpr(neg, pos) == 0.0
    assert detection_accuracy(neg, pos) == 1.0
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=5000), rng.normal(size=5000)
    assert auroc(a, b) == pytest.approx(0.5, abs=0.03)
    assert fpr_at_95_tpr(a, b) == pytest.approx(0.95, abs=0.03)
    assert detection_accuracy(a, b) == pytest.approx(0.5, abs=0.03)


def test_known_partial_overlap() -> None:
    neg, pos = np.array([0.0, 1, 2, 3]), np.array([2.5, 3.5, 4, 5])
    assert auroc(neg, pos) == pytest.approx(15 / 16)
    assert detection_accuracy(neg, pos) == pytest.approx(0.875)


def test_kind_groups() -> None:
    assert kind_group("corrupted:snow:3") == "corrupted:snow"
    assert kind_group("adversarial:pgd:0.1") == "adversarial:pgd"
    assert kind_group("ood:mnist") == "ood:mnist"


def test_gradnorm_takes_the_final_layer_only_for_large_models() -> None:
    import torch

    from detectors.fit.evaluation import _gradnorm, _Penultimate

    small = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 8), torch.nn.Linear(8, 3))
    large = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(12, 80_000), torch.nn.Linear(80_000, 3)
    )
    for model, expected in (
        (small, {"1.weight", "1.bias", "2.weight", "2.bias"}),
        (large, {"2.weight"}),
    ):
        detector = _gradnorm(model.eval(), _Penultimate(model).last)
        names = {n for n, _ in model.named_parameters() if detector.param_filter(n)}
        assert names == expected
        scores = detector.predict(torch.rand(4, 3, 2, 2))
        assert scores.shape == (4,) and torch.isfinite(scores).all()
