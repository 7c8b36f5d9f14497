"""H's input vector from gradient signals."""

from __future__ import annotations

import numpy as np
import pytest

from detectors.signals import IMAGE_COLUMNS, SignalFeaturizer, image_statistics


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
    images = rng.random((4, 1, 28, 28))
    out = fitted.transform(features, rng.normal(size=(4, 3)), rng.normal(size=(4, 8)), images)
    names = fitted.column_names(3, ["a", "b"])
    assert out.shape == (4, len(names)) and out.dtype == np.float32
    assert names[:2] == ["log_grad[rank0][a]", "log_grad[rank0][b]"]
    tail = len(IMAGE_COLUMNS) + 3
    assert names[-tail:-16] == ["max_logit", "knn3_cosine_distance", "mahalanobis_min"]
    assert names[-len(IMAGE_COLUMNS) :] == list(IMAGE_COLUMNS)


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


def test_logit_margin_is_top_minus_runner_up_in_any_class_order() -> None:
    only = SignalFeaturizer(groups=("logits", "margin"))
    assert only.column_names(4, ["conv"])[-1] == "logit_margin"
    logits = np.array([[0.5, 3.0, -1.0, 2.25], [1.0, 1.0, 0.0, -2.0]])
    out = only.transform(np.ones((2, 4, 1)), logits, np.zeros((2, 2)))
    np.testing.assert_allclose(out[:, -1], [0.75, 0.0])
    shuffled = only.transform(np.ones((2, 4, 1)), logits[:, [3, 0, 2, 1]], np.zeros((2, 2)))
    np.testing.assert_array_equal(out, shuffled)


def test_distances_are_small_in_distribution_and_large_far_away(fitted) -> None:
    rng = np.random.default_rng(2)
    near = fitted.class_means[:1].astype(np.float64) + rng.normal(size=(5, 8)) * 0.1
    far = rng.normal(size=(5, 8)) * 50
    ones = np.ones((5, 3, 1))
    no_image = SignalFeaturizer(("knn", "mahalanobis"), 3, fitted.bank, fitted.class_means)
    no_image.precision = fitted.precision
    a = no_image.transform(ones, np.zeros((5, 3)), near)
    b = no_image.transform(ones, np.zeros((5, 3)), far)
    assert (a[:, -1] < b[:, -1]).all()  # Mahalanobis
    assert (a[:, -2] < b[:, -2].min()).all()  # KNN cosine distance


def test_save_load_round_trip_without_pickle(fitted, tmp_path) -> None:
    fitted.save(tmp_path / "f.npz")
    loaded = SignalFeaturizer.load(tmp_path / "f.npz")
    rng = np.random.default_rng(3)
    args = (
        rng.random((2, 3, 2)),
        rng.normal(size=(2, 3)),
        rng.normal(size=(2, 8)),
        rng.random((2, 1, 28, 28)),
    )
    np.testing.assert_array_equal(fitted.transform(*args), loaded.transform(*args))
    assert loaded.groups == fitted.groups and loaded.knn_k == 3


def test_errors_say_what_to_do() -> None:
    with pytest.raises(ValueError, match="unknown signal groups"):
        SignalFeaturizer(groups=("gradients", "vibes")).fit(np.zeros((4, 2)), np.zeros(4))
    with pytest.raises(RuntimeError, match="fit must run"):
        SignalFeaturizer().transform(np.ones((1, 2, 1)), np.zeros((1, 2)), np.zeros((1, 2)))
    with pytest.raises(ValueError, match="pass the images"):
        SignalFeaturizer(groups=("image",)).transform(
            np.ones((1, 2, 1)), np.zeros((1, 2)), np.zeros((1, 2))
        )


def _garment() -> np.ndarray:
    """A bright blob on a black background, as Fashion-MNIST images are."""
    image = np.zeros((1, 1, 28, 28))
    image[0, 0, 6:22, 8:20] = 0.7
    return image


def test_image_statistics_shape_and_a_clean_black_background() -> None:
    stats = image_statistics(np.concatenate([_garment(), _garment()]))
    assert stats.shape == (2, len(IMAGE_COLUMNS)) and np.isfinite(stats).all()
    named = dict(zip(IMAGE_COLUMNS, stats[0], strict=True))
    assert named["img_mean"] == pytest.approx(0.7 * 16 * 12 / 784)
    assert named["img_dark_fraction"] == pytest.approx(1 - 16 * 12 / 784)
    assert named["img_bright_fraction"] == 0
    assert named["img_border_mean"] == named["img_border_std"] == 0
    assert named["img_dark_half_mean"] == named["img_q05"] == 0


def test_image_statistics_see_noise_blur_and_an_linf_attack() -> None:
    clean = _garment()
    rng = np.random.default_rng(0)
    noisy = np.clip(clean + rng.normal(0, 0.1, clean.shape), 0, 1)
    blurred = clean.copy()
    for axis in (2, 3):  # a 3-tap box blur, twice
        for _ in range(2):
            blurred = (np.roll(blurred, 1, axis) + blurred + np.roll(blurred, -1, axis)) / 3
    # An L-inf step of 0.05 in a random direction lifts about half of the black background.
    attacked = np.clip(clean + 0.05 * rng.choice([-1.0, 1.0], clean.shape), 0, 1)
    s = {
        name: dict(zip(IMAGE_COLUMNS, image_statistics(x)[0], strict=True))
        for name, x in (("clean", clean), ("noisy", noisy), ("blur", blurred), ("adv", attacked))
    }
    assert s["noisy"]["img_dark_half_std"] > s["clean"]["img_dark_half_std"] + 0.01
    assert s["noisy"]["img_log_total_variation"] > s["clean"]["img_log_total_variation"]
    assert s["blur"]["img_log_laplacian_energy"] < s["clean"]["img_log_laplacian_energy"]
    assert 0.3 < s["adv"]["img_dark_fraction"] < s["clean"]["img_dark_fraction"] - 0.3


def test_image_statistics_average_channels_and_ignore_quantization() -> None:
    clean = _garment()
    rgb = np.repeat(clean, 3, axis=1)
    np.testing.assert_allclose(image_statistics(rgb), image_statistics(clean))
    quantized = np.round(clean * 255) / 255
    np.testing.assert_allclose(image_statistics(quantized), image_statistics(clean), atol=1e-2)
    with pytest.raises(ValueError, match="images must be"):
        image_statistics(np.zeros((4, 784)))


def test_portable_image_statistics_hold_for_any_shape_and_chunk() -> None:
    from detectors.signals import RELATIVE_IMAGE_COLUMNS, portable_image_statistics

    rng = np.random.default_rng(0)
    rgb = rng.uniform(0, 1, (300, 3, 20, 24)).astype(np.float32)
    stats = portable_image_statistics(rgb)
    assert stats.shape == (300, len(RELATIVE_IMAGE_COLUMNS)) and np.isfinite(stats).all()
    halves = np.concatenate(
        [portable_image_statistics(rgb[:137]), portable_image_statistics(rgb[137:])]
    )
    np.testing.assert_array_equal(stats, halves)  # per image: chunking never changes a value
    gray = portable_image_statistics(rgb[:, :1])
    colour = [RELATIVE_IMAGE_COLUMNS.index(c) for c in ("rel_colourfulness", "rel_saturation")]
    assert (gray[:, colour] == 0).all() and (stats[:, colour] > 0).all()
    brighter = portable_image_statistics(np.clip(rgb * 0.5 + 0.5, 0, 1))
    mean = RELATIVE_IMAGE_COLUMNS.index("rel_mean")
    assert (brighter[:, mean] > stats[:, mean]).all()
