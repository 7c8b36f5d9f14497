"""H's input vector from gradient signals."""

from __future__ import annotations

import numpy as np
import pytest

from detectors.signals import SignalFeaturizer


@pytest.fixture
def fitted() -> SignalFeaturizer:
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 50)
    centers = rng.normal(size=(3, 8)) * 5
    embeddings = centers[labels] + rng.normal(size=(150, 8))
    return SignalFeaturizer(knn_k=3).fit(embeddings, labels, bank_size=150)


def test_columns_match_vector_width(fitted: SignalFeaturizer) -> None:
    rng = np.random.default_rng(1)
    features = rng.random((4, 3, 2)) + 0.1
    out = fitted.transform(features, rng.normal(size=(4, 3)), rng.normal(size=(4, 8)))
    names = fitted.column_names(3, ["a", "b"])
    assert out.shape == (4, len(names)) and out.dtype == np.float32
    assert names[:2] == ["log_grad[rank0][a]", "log_grad[rank0][b]"]
    assert names[-3:] == ["max_logit", "knn3_cosine_distance", "mahalanobis_min"]


def test_gradient_rows_are_ranked_by_total_change(fitted: SignalFeaturizer) -> None:
    features = np.array([[[9.0, 9.0], [1.0, 2.0], [4.0, 4.0]]])  # label 1 asks least
    only = SignalFeaturizer(groups=("gradients",))
    out = only.transform(features, np.zeros((1, 3)), np.zeros((1, 8)))
    np.testing.assert_allclose(np.exp(out[0]), [1, 2, 4, 4, 9, 9], rtol=1e-5)
    # Permuting the classes does not change the vector.
    permuted = only.transform(features[:, [2, 0, 1]], np.zeros((1, 3)), np.zeros((1, 8)))
    np.testing.assert_array_equal(out, permuted)


def test_logit_signals() -> None:
    only = SignalFeaturizer(groups=("logits",))
    logits = np.array([[2.0, 0.0, 0.0]])
    msp, energy, top = only.transform(np.ones((1, 3, 1)), logits, np.zeros((1, 2)))[0]
    expected_lse = np.log(np.exp(2) + 2)
    assert energy == pytest.approx(expected_lse, rel=1e-6)
    assert msp == pytest.approx(np.exp(2) / (np.exp(2) + 2), rel=1e-6)
    assert top == 2.0


def test_distances_are_small_in_distribution_and_large_far_away(fitted) -> None:
    rng = np.random.default_rng(2)
    near = fitted.class_means[:1].astype(np.float64) + rng.normal(size=(5, 8)) * 0.1
    far = rng.normal(size=(5, 8)) * 50
    ones = np.ones((5, 3, 1))
    a = fitted.transform(ones, np.zeros((5, 3)), near)
    b = fitted.transform(ones, np.zeros((5, 3)), far)
    assert (a[:, -1] < b[:, -1]).all()  # Mahalanobis
    assert (a[:, -2] < b[:, -2].min()).all()  # KNN cosine distance


def test_save_load_round_trip_without_pickle(fitted, tmp_path) -> None:
    fitted.save(tmp_path / "f.npz")
    loaded = SignalFeaturizer.load(tmp_path / "f.npz")
    rng = np.random.default_rng(3)
    args = (rng.random((2, 3, 2)), rng.normal(size=(2, 3)), rng.normal(size=(2, 8)))
    np.testing.assert_array_equal(fitted.transform(*args), loaded.transform(*args))
    assert loaded.groups == fitted.groups and loaded.knn_k == 3


def test_errors_say_what_to_do() -> None:
    with pytest.raises(ValueError, match="unknown signal groups"):
        SignalFeaturizer(groups=("gradients", "vibes")).fit(np.zeros((4, 2)), np.zeros(4))
    with pytest.raises(RuntimeError, match="fit must run"):
        SignalFeaturizer().transform(np.ones((1, 2, 1)), np.zeros((1, 2)), np.zeros((1, 2)))
