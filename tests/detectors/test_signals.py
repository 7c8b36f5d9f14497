"""H's input vector from gradient signals."""

from __future__ import annotations

import numpy as np
import pytest

from detectors.signals import (
    BASIC_GROUPS,
    GROUPS,
    LAYOUT_COLUMNS,
    RELATIVE_IMAGE_COLUMNS,
    SignalFeaturizer,
    layout_maps,
    portable_image_statistics,
)


@pytest.fixture
def fitted() -> SignalFeaturizer:
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 50)
    centers = rng.normal(size=(3, 8)) * 5
    embeddings = centers[labels] + rng.normal(size=(150, 8))
    clean_images = rng.random((150, 1, 28, 28))
    featurizer = SignalFeaturizer(groups=(*BASIC_GROUPS, "image_relative"), knn_k=3)
    return featurizer.fit(embeddings, labels, bank_size=150, images=clean_images)


def test_columns_match_vector_width(fitted: SignalFeaturizer) -> None:
    rng = np.random.default_rng(1)
    features = rng.random((4, 3, 2)) + 0.1
    images = rng.random((4, 1, 28, 28))
    out = fitted.transform(features, rng.normal(size=(4, 3)), rng.normal(size=(4, 8)), images)
    names = fitted.column_names(3, ["a", "b"])
    assert out.shape == (4, len(names)) and out.dtype == np.float32
    assert names[:2] == ["log_grad[rank0][a]", "log_grad[rank0][b]"]
    tail = len(RELATIVE_IMAGE_COLUMNS) + 1
    assert names[-tail - 3 : -tail] == ["max_logit", "knn3_cosine_distance", "mahalanobis_min"]
    assert names[-tail:] == [*RELATIVE_IMAGE_COLUMNS, "rel_image_distance"]
    assert not any(name.startswith("img_") for name in names)  # no absolute statistics


def test_the_default_groups_need_no_images() -> None:
    rng = np.random.default_rng(4)
    labels = np.repeat(np.arange(2), 20)
    default = SignalFeaturizer(knn_k=3).fit(rng.normal(size=(40, 4)), labels)
    assert default.groups == BASIC_GROUPS and default.image_mean is None
    out = default.transform(
        rng.random((3, 2, 1)) + 0.1, rng.normal(size=(3, 2)), rng.normal(size=(3, 4))
    )
    assert out.shape == (3, len(default.column_names(2, ["conv"])))
    assert np.isfinite(out).all()


def test_image_statistics_enter_only_relative_to_the_clean_images(fitted) -> None:
    assert "image" not in GROUPS  # the absolute statistics assumed a black background
    only = SignalFeaturizer(
        groups=("image_relative",),
        image_mean=fitted.image_mean,
        image_std=fitted.image_std,
        image_precision=fitted.image_precision,
    )
    rng = np.random.default_rng(5)
    clean_like = rng.random((4, 1, 28, 28))
    out = only.transform(np.ones((4, 3, 1)), np.zeros((4, 3)), np.zeros((4, 8)), clean_like)
    z = (portable_image_statistics(clean_like) - fitted.image_mean) / fitted.image_std
    np.testing.assert_allclose(out[:, :-1], z, rtol=1e-5, atol=1e-5)
    # A low-contrast, near-white image is far from these clean images: no background is assumed.
    white = only.transform(
        np.ones((4, 3, 1)), np.zeros((4, 3)), np.zeros((4, 8)), 1 - clean_like * 0.1
    )
    assert (white[:, -1] > out[:, -1]).all()  # log distance from the clean images


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


def test_a_featurizer_saved_with_the_absolute_image_group_must_be_refitted(
    fitted, tmp_path
) -> None:
    fitted.save(tmp_path / "f.npz")
    with np.load(tmp_path / "f.npz") as data:
        arrays = dict(data)
    arrays["groups"] = np.array([*BASIC_GROUPS, "image"])  # as the old Fashion-MNIST H had
    np.savez(tmp_path / "old.npz", **arrays)
    with pytest.raises(ValueError, match=r"\['image'\].*gradprobe fit"):
        SignalFeaturizer.load(tmp_path / "old.npz")


def test_errors_say_what_to_do() -> None:
    with pytest.raises(ValueError, match="unknown signal groups"):
        SignalFeaturizer(groups=("gradients", "vibes")).fit(np.zeros((4, 2)), np.zeros(4))
    with pytest.raises(RuntimeError, match="fit must run"):
        SignalFeaturizer().transform(np.ones((1, 2, 1)), np.zeros((1, 2)), np.zeros((1, 2)))
    with pytest.raises(ValueError, match="unknown signal groups"):
        SignalFeaturizer(groups=("image",)).fit(np.zeros((4, 2)), np.zeros(4))
    with pytest.raises(ValueError, match="needs the clean training images"):
        SignalFeaturizer(groups=("image_relative",)).fit(np.zeros((4, 2)), np.zeros(4))
    with pytest.raises(ValueError, match="pass one per row"):
        SignalFeaturizer(groups=("image_relative",)).transform(
            np.ones((1, 2, 1)), np.zeros((1, 2)), np.zeros((1, 2))
        )
    with pytest.raises(ValueError, match="pass one per row"):
        SignalFeaturizer(groups=("image_relative",)).transform(
            np.ones((2, 2, 1)), np.zeros((2, 2)), np.zeros((2, 2)), np.zeros((1, 1, 4, 4))
        )


def test_portable_image_statistics_hold_for_any_shape_and_chunk() -> None:
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


def test_frame_statistics_see_the_outer_band_only() -> None:
    rng = np.random.default_rng(2)
    images = rng.uniform(0.2, 0.4, (6, 3, 42, 56))  # band: 42 // 14 = 3 px
    framed = images.copy()
    framed[..., :3, :] = framed[..., -3:, :] = framed[..., :, :3] = framed[..., :, -3:] = 0.9
    centre = images.copy()
    centre[..., 3:-3, 3:-3] = 0.9
    frame = [RELATIVE_IMAGE_COLUMNS.index(c) for c in ("rel_frame_mean", "rel_frame_std")]
    before, after, inside = (
        portable_image_statistics(x)[:, frame] for x in (images, framed, centre)
    )
    np.testing.assert_allclose(after, [[0.9, 0.0]] * 6, atol=1e-6)  # the band, whole
    np.testing.assert_allclose(inside, before)  # the centre is not the frame
    assert (before[:, 0] < 0.4).all() and (before[:, 1] > 0).all()


def test_a_featurizer_fitted_before_the_frame_statistics_keeps_its_width(fitted) -> None:
    """Detectors saved with the first 13 statistics load and score as they were fitted."""
    known = RELATIVE_IMAGE_COLUMNS.index("rel_frame_mean")
    older = SignalFeaturizer(
        groups=fitted.groups,
        knn_k=fitted.knn_k,
        bank=fitted.bank,
        class_means=fitted.class_means,
        precision=fitted.precision,
        image_mean=fitted.image_mean[:known],
        image_std=fitted.image_std[:known],
        image_precision=fitted.image_precision[:known, :known],
    )
    rng = np.random.default_rng(3)
    images = rng.random((4, 1, 28, 28))
    out = older.transform(
        rng.random((4, 3, 2)) + 0.1, rng.normal(size=(4, 3)), rng.normal(size=(4, 8)), images
    )
    names = older.column_names(3, ["a", "b"])
    assert out.shape == (4, len(names)) and "rel_frame_mean" not in names
    z = (portable_image_statistics(images)[:, :known] - older.image_mean) / older.image_std
    np.testing.assert_allclose(out[:, -known - 1 : -1], z, rtol=1e-5, atol=1e-5)


def test_layout_maps_pool_any_size_into_cells() -> None:
    rng = np.random.default_rng(0)
    images = rng.random((5, 3, 20, 27))
    maps = layout_maps(images)
    assert maps.shape == (5, 2, 3, 8, 8)
    # The brightness map's cells average the image (cells of nearly equal area).
    np.testing.assert_allclose(maps[:, 0].mean((2, 3)), images.mean((2, 3)), rtol=0.05)
    flat = layout_maps(np.full((2, 1, 9, 9), 0.3))
    assert flat.shape == (2, 2, 1, 8, 8)
    np.testing.assert_allclose(flat[:, 0], 0.3)
    np.testing.assert_allclose(flat[:, 1], 0.0, atol=1e-12)  # no detail in a flat image


def _objects_on_a_background(rng, n: int, background: float) -> np.ndarray:
    """A bright or dark flat background with a textured object in the middle."""
    images = np.full((n, 3, 32, 32), background)
    images[:, :, 8:24, 8:24] = rng.random((n, 3, 16, 16))
    return images


@pytest.mark.parametrize("background", [0.0, 0.85])
def test_layout_flags_a_local_smudge_whatever_the_background(background) -> None:
    rng = np.random.default_rng(1)
    clean = _objects_on_a_background(rng, 200, background)
    featurizer = SignalFeaturizer(groups=("image_layout",)).fit(
        np.zeros((200, 2)), np.zeros(200), images=clean
    )

    def columns(images: np.ndarray) -> np.ndarray:
        n = len(images)
        return featurizer.transform(np.ones((n, 2, 1)), np.zeros((n, 2)), np.zeros((n, 2)), images)

    assert featurizer.column_names(2, ["conv"]) == list(LAYOUT_COLUMNS)
    new_clean = columns(_objects_on_a_background(rng, 50, background))
    smudged = _objects_on_a_background(rng, 50, background)
    smudged[:, :, 0:6, 0:6] = 0.5  # a grey blot in a corner the clean images never touch
    flagged = columns(smudged)
    largest = LAYOUT_COLUMNS.index("layout_log_max_z")
    assert flagged[:, largest].min() > new_clean[:, largest].max()
    assert np.isfinite(new_clean).all() and np.isfinite(flagged).all()


def test_a_featurizer_saved_before_the_layout_group_loads_and_keeps_its_columns(
    fitted, tmp_path
) -> None:
    fitted.save(tmp_path / "f.npz")
    with np.load(tmp_path / "f.npz") as data:
        assert "layout_mean" not in data  # nothing written for a group it does not use
    loaded = SignalFeaturizer.load(tmp_path / "f.npz")
    assert loaded.layout_mean is None and "image_layout" not in loaded.groups
    rng = np.random.default_rng(2)
    with_layout = SignalFeaturizer(groups=("image_layout",)).fit(
        np.zeros((20, 2)), np.zeros(20), images=rng.random((20, 1, 28, 28))
    )
    with_layout.save(tmp_path / "g.npz")
    again = SignalFeaturizer.load(tmp_path / "g.npz")
    images = rng.random((3, 1, 28, 28))
    args = (np.ones((3, 2, 1)), np.zeros((3, 2)), np.zeros((3, 2)), images)
    np.testing.assert_array_equal(with_layout.transform(*args), again.transform(*args))
