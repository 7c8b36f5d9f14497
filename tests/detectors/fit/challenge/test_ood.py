"""Tests for the offline out-of-distribution image sets."""

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from detectors.fit.challenge import ood
from detectors.fit.challenge.ood import (
    GENERIC_OOD_SETS,
    OOD_SETS,
    font_letters,
    generic_ood,
    letter_fonts,
    mnist_digits,
    natural_patches,
)


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    return mnist_digits()


def check_images(x: np.ndarray, n: int) -> None:
    assert x.shape == (n, 28, 28)
    assert x.dtype == np.float32
    assert np.isfinite(x).all()
    assert x.min() >= 0.0 and x.max() <= 1.0
    assert (x.std(axis=(1, 2)) > 0.02).all()  # no blank or flat images


def test_mnist_has_5000_scaled_digits(digits: np.ndarray) -> None:
    check_images(digits, 5000)
    assert digits.max() == pytest.approx(1.0)  # scaled from 0..255, not left at 0..255
    # digit-like: thin bright strokes on an empty dark background, centred in the frame
    assert (digits < 0.1).mean() > 0.75
    assert np.median(digits) == 0.0
    border = np.concatenate([digits[:, :2].ravel(), digits[:, -2:].ravel()])
    assert border.mean() < 0.01
    assert digits[:, 10:18, 10:18].mean() > 3 * digits.mean() / 2


def test_mnist_subset_is_seeded_sample_of_the_full_set(
    digits: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    # reuse the pixels loaded once by the fixture: parsing the CSV is the slow part
    pixels = digits.reshape(5000, -1) * 255.0
    monkeypatch.setattr(ood, "_mnist_pixels", lambda: pixels)
    a = mnist_digits(10, seed=1)
    # a pure function of the seed: the first n of a seeded permutation of the 5,000
    expected = digits[np.random.default_rng(1).permutation(5000)[:10]]
    np.testing.assert_allclose(a, expected, atol=1e-6)
    assert len({img.tobytes() for img in a}) == 10
    assert not np.allclose(a, mnist_digits(10, seed=2))
    assert mnist_digits(0).shape == (0, 28, 28)
    with pytest.raises(ValueError, match="between 0 and 5000"):
        mnist_digits(5001)


def test_letter_fonts_are_real_text_fonts() -> None:
    fonts = letter_fonts()
    names = [p.name for p in fonts]
    assert "DejaVuSans.ttf" in names  # matplotlib always ships it
    assert len(names) == len(set(names))
    assert not any(n.startswith(("STIXSiz", "cmex", "cmsy", "LastResort")) for n in names)


def test_font_letters_shape_range_determinism() -> None:
    a = font_letters(24, seed=0)
    check_images(a, 24)
    np.testing.assert_array_equal(a, font_letters(24, seed=0))
    assert np.abs(a - font_letters(24, seed=1)).mean() > 0.05
    assert len({img.tobytes() for img in a}) == 24


def test_font_letters_are_centred_white_glyphs_on_black() -> None:
    x = font_letters(32, seed=0)
    assert (x[:, 0, :] == 0).all() and (x[:, -1, :] == 0).all()  # black frame
    assert (x < 0.1).mean() > 0.5  # mostly background
    for img in x:
        ink = np.argwhere(img > 0.5)
        (top, left), (bottom, right) = ink.min(0), ink.max(0)
        assert max(bottom - top, right - left) >= 12  # glyph fills the frame like notMNIST
        assert abs((top + bottom) / 2 - 13.5) <= 3 and abs((left + right) / 2 - 13.5) <= 3


def test_letters_differ_from_digits(digits: np.ndarray) -> None:
    letters = font_letters(300, seed=0).reshape(300, -1)
    nums = digits[:300].reshape(300, -1)
    # a linear probe trained on half tells letters from digits on the other half
    x_tr = np.concatenate([nums[:150], letters[:150]])
    x_te = np.concatenate([nums[150:], letters[150:]])
    y = np.r_[np.zeros(150), np.ones(150)]
    acc = LogisticRegression(max_iter=500).fit(x_tr, y).score(x_te, y)
    assert acc > 0.7
    assert np.abs(nums.mean(0) - letters.mean(0)).mean() > 0.03


def test_natural_patches_shape_range_determinism() -> None:
    a = natural_patches(24, seed=0)
    check_images(a, 24)
    assert (a.std(axis=(1, 2)) >= 0.03).all()
    np.testing.assert_array_equal(a, natural_patches(24, seed=0))
    assert np.abs(a - natural_patches(24, seed=1)).mean() > 0.05


def test_natural_patches_are_not_digit_like(digits: np.ndarray) -> None:
    x = natural_patches(64, seed=0)
    # full-frame texture: far fewer dark pixels and a lit border, unlike centred objects
    assert (x < 0.1).mean() < 0.3 < (digits < 0.1).mean()
    assert x[:, :2].mean() > 0.2


def test_ood_sets_registry() -> None:
    assert {"mnist": mnist_digits, "letters": font_letters, "natural": natural_patches} == OOD_SETS
    for name in ("letters", "natural"):  # mnist is exercised above; its load is the slow one
        check_images(OOD_SETS[name](n=3, seed=0), 3)
        assert OOD_SETS[name](n=0, seed=0).shape == (0, 28, 28)


@pytest.mark.parametrize("fn", [font_letters, natural_patches])
def test_negative_n_rejected(fn) -> None:
    with pytest.raises(ValueError, match="n must be >= 0"):
        fn(-1, seed=0)


# ---- generic sets, for any (C, H, W) model input ----------------------------------------

SHAPES = [(3, 32, 32), (1, 20, 24), (3, 20, 24), (3, 64, 64), (3, 224, 224)]


def colourful(x: np.ndarray) -> np.ndarray:
    """Per image: do the RGB channels differ (mean over pixels of the std across channels)?"""
    return x.std(axis=1).mean(axis=(1, 2)) > 0.02


def test_generic_sets_registry() -> None:
    assert GENERIC_OOD_SETS == ("natural", "textures", "letters", "digits", "noise")


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", GENERIC_OOD_SETS)
def test_generic_shape_range_determinism(name: str, shape: tuple[int, int, int]) -> None:
    n = 4 if shape[1] > 100 else 12
    a = generic_ood(name, n, shape, seed=0)
    assert a.shape == (n, *shape)
    assert a.dtype == np.float32
    assert np.isfinite(a).all()
    assert a.min() >= 0.0 and a.max() <= 1.0
    np.testing.assert_array_equal(a, generic_ood(name, n, shape, seed=0))
    # drawn image by image: a shorter set is a prefix of a longer one
    np.testing.assert_array_equal(a[: n // 2], generic_ood(name, n // 2, shape, seed=0))
    assert np.abs(a - generic_ood(name, n, shape, seed=1)).mean() > 0.02
    assert len({img.tobytes() for img in a}) == n  # not all identical
    assert generic_ood(name, 0, shape).shape == (0, *shape)


@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 20, 24)], ids=["rgb32", "gray20x24"])
@pytest.mark.parametrize("name", GENERIC_OOD_SETS)
def test_generic_sets_are_varied_and_assume_no_background(
    name: str, shape: tuple[int, int, int]
) -> None:
    x = generic_ood(name, 150, shape, seed=0)
    # not pinned to a dark (or light) background, and brightness varies between images
    assert 0.15 < x.mean() < 0.85
    means = x.mean(axis=(1, 2, 3))
    assert means.std() > 0.05
    assert 0.1 < (means > 0.5).mean() < 0.9
    pairwise = np.abs(x[:-1] - x[1:]).mean(axis=(1, 2, 3))
    assert (pairwise > 0.02).mean() > 0.9  # consecutive images differ substantially
    if name != "textures":  # textures include near-uniform colour patches on purpose
        assert (x.std(axis=(2, 3)).max(axis=1) > 0.02).all()
    if shape[0] == 3 and name != "noise":
        assert colourful(x).mean() > (0.6 if name == "natural" else 0.9)


@pytest.mark.parametrize("name", ["letters", "digits"])
def test_generic_glyphs_have_both_polarities(name: str) -> None:
    x = generic_ood(name, 100, (1, 32, 32), seed=0)[:, 0]
    border = np.concatenate([x[:, 0], x[:, -1], x[:, :, 0], x[:, :, -1]], axis=1).mean(axis=1)
    light_background = border > x.mean(axis=(1, 2))  # ink darker than the background
    assert 0.25 < light_background.mean() < 0.75


def test_generic_natural_uses_colour_and_gray_photographs() -> None:
    rgb = generic_ood("natural", 100, (3, 32, 32), seed=0)
    gray = generic_ood("natural", 100, (1, 32, 32), seed=0)
    assert 0.6 < colourful(rgb).mean() < 1.0  # mostly colour photographs, some grayscale
    # nearly flat crops (sky, paper, black space) are redrawn
    assert (rgb.std(axis=(2, 3)).max(axis=1) >= 0.03).all()
    assert (gray.std(axis=(1, 2, 3)) >= 0.03).all()


def test_generic_sets_differ_from_each_other() -> None:
    sets = {name: generic_ood(name, 60, (3, 24, 24), seed=0) for name in GENERIC_OOD_SETS}
    # high-frequency energy: pure noise is far rougher than every other set
    rough = {k: np.abs(np.diff(v, axis=3)).mean() for k, v in sets.items()}
    assert rough["noise"] > 2 * max(rough[k] for k in rough if k != "noise")


def test_generic_ood_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="unknown OOD set 'mnist'; expected one of"):
        generic_ood("mnist", 4, (3, 32, 32))
    for shape in [(2, 32, 32), (3, 7, 32), (1, 32, 4), (3, 32), (3, 32, 32, 1), (3, 32.0, 32)]:
        with pytest.raises(ValueError, match=r"shape must be \(C, H, W\) with C in \(1, 3\)"):
            generic_ood("noise", 4, shape)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n must be >= 0, got -1"):
        generic_ood("noise", -1, (3, 32, 32))
