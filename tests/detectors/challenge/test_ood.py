"""Tests for the offline out-of-distribution image sets."""

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from detectors.challenge import ood
from detectors.challenge.ood import (
    OOD_SETS,
    font_letters,
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
