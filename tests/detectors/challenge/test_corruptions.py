"""Behavioural tests for the CURE-TSR-style corruptions on 28x28 grayscale images."""

import itertools

import numpy as np
import pytest
from scipy import ndimage

from detectors.challenge.corruptions import (
    CORRUPTIONS,
    SEVERITIES,
    corrupt,
    plot_corruption_grid,
)

SEEDED = ("noise", "dirty_lens", "exposure", "snow", "haze")
BLURS = ("lens_blur", "gaussian_blur")


def structured_images() -> np.ndarray:
    """Eight Fashion-MNIST-like images: bright shapes with texture on a black background."""
    yy, xx = np.mgrid[0:28, 0:28].astype(np.float32)
    d = np.hypot(yy - 14, xx - 14)
    torso = ((yy > 4) & (yy < 10) & (xx > 3) & (xx < 25)) | (
        (yy >= 10) & (yy < 25) & (xx > 9) & (xx < 19)
    )
    box = (yy > 5) & (yy < 23) & (xx > 6) & (xx < 22)
    imgs = [
        ((((yy - 14) / 10) ** 2 + ((xx - 14) / 7) ** 2) <= 1) * 0.8,  # ellipse
        box * np.where((yy // 2) % 2 == 0, 0.9, 0.4),  # striped box
        ((d > 5) & (d < 11)) * 1.0,  # ring
        torso * 0.7,  # shirt-like T
        (d < 12) * (0.5 + 0.4 * np.sin((xx + yy) * 0.9)),  # textured disk
        ((yy > 6) & (xx > 4) & (xx < yy)) * (xx / 28 + 0.2),  # shaded triangle (shoe-ish)
        ((np.abs(xx - 14) < 6) & (yy > 3)) * (0.3 + 0.6 * (yy / 28)),  # trouser-like gradient
        (((xx // 4 + yy // 4) % 2) == 0) * (box * 0.85),  # checker patch
    ]
    return np.clip(np.stack(imgs), 0.0, 1.0).astype(np.float32)


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return structured_images()


def mad(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Mean absolute difference per image."""
    return np.abs(a - b).mean(axis=(-2, -1))


def increasing(values) -> bool:
    """Strictly increasing sequence."""
    return all(a < b for a, b in itertools.pairwise(values))


def gradient_energy(a: np.ndarray) -> np.ndarray:
    """Mean squared finite difference per image: the high-frequency content."""
    return (np.diff(a, axis=-2) ** 2).mean(axis=(-2, -1)) + (np.diff(a, axis=-1) ** 2).mean(
        axis=(-2, -1)
    )


def test_public_constants() -> None:
    assert CORRUPTIONS == (
        "noise",
        "lens_blur",
        "gaussian_blur",
        "dirty_lens",
        "exposure",
        "snow",
        "haze",
    )
    assert SEVERITIES == (1, 2, 3, 4, 5)


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_shape_dtype_range_and_input_untouched(images: np.ndarray, kind: str) -> None:
    before = images.copy()
    for severity in SEVERITIES:
        out = corrupt(images, kind, severity, seed=0)
        assert out.shape == images.shape
        assert out.dtype == np.float32
        assert np.isfinite(out).all()
        assert out.min() >= 0.0 and out.max() <= 1.0
    np.testing.assert_array_equal(images, before)


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_channel_dim_input_matches_plain_input(images: np.ndarray, kind: str) -> None:
    out4 = corrupt(images[:, None], kind, 3, seed=7)
    assert out4.shape == (len(images), 1, 28, 28)
    np.testing.assert_array_equal(out4[:, 0], corrupt(images, kind, 3, seed=7))


def test_float64_input_gives_float32(images: np.ndarray) -> None:
    out = corrupt(images.astype(np.float64), "noise", 2, seed=0)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, corrupt(images, "noise", 2, seed=0), atol=1e-6)


def test_empty_batch() -> None:
    out = corrupt(np.zeros((0, 28, 28), np.float32), "snow", 5, seed=0)
    assert out.shape == (0, 28, 28) and out.dtype == np.float32


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_same_seed_same_output(images: np.ndarray, kind: str) -> None:
    np.testing.assert_array_equal(corrupt(images, kind, 4, seed=3), corrupt(images, kind, 4, 3))


@pytest.mark.parametrize("kind", SEEDED)
def test_other_seed_other_output(images: np.ndarray, kind: str) -> None:
    a = corrupt(images, kind, 4, seed=3)
    b = corrupt(images, kind, 4, seed=4)
    assert mad(a, b).mean() > 1e-3


@pytest.mark.parametrize("kind", SEEDED)
def test_each_image_gets_its_own_draw(kind: str) -> None:
    same = np.repeat(structured_images()[:1], 6, axis=0)
    out = corrupt(same, kind, 3, seed=0)
    assert len({out[i].tobytes() for i in range(len(out))}) > 1


@pytest.mark.parametrize("kind", BLURS)
def test_blurs_are_deterministic_filters(images: np.ndarray, kind: str) -> None:
    np.testing.assert_array_equal(corrupt(images, kind, 2, seed=0), corrupt(images, kind, 2, 99))


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_every_kind_changes_every_image_even_at_level_1(images: np.ndarray, kind: str) -> None:
    changed = mad(corrupt(images, kind, 1, seed=0), images)
    assert (changed > 2e-3).all(), changed
    assert changed.mean() > 0.01


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_strength_grows_strictly_with_severity(images: np.ndarray, kind: str, seed: int) -> None:
    # per image, not only on average: the pattern is fixed by the seed, levels scale it
    d = np.stack([mad(corrupt(images, kind, s, seed), images) for s in SEVERITIES])
    assert (np.diff(d, axis=0) > 0).all(), d.round(4)


@pytest.mark.parametrize("kind", BLURS)
def test_blurs_remove_high_frequencies_monotonically(images: np.ndarray, kind: str) -> None:
    g = np.stack([gradient_energy(corrupt(images, kind, s, 0)) for s in SEVERITIES])
    g = np.concatenate([gradient_energy(images)[None], g])
    assert (np.diff(g, axis=0) < 0).all(), g.round(5)


@pytest.mark.parametrize("kind", BLURS)
def test_blurs_preserve_brightness_away_from_border(kind: str) -> None:
    img = np.zeros((1, 28, 28), np.float32)
    img[0, 10:18, 8:20] = 0.9
    out = corrupt(img, kind, 5, seed=0)
    assert out.sum() == pytest.approx(img.sum(), rel=1e-4)


def test_lens_blur_is_a_flat_disk_and_gaussian_blur_is_peaked() -> None:
    dot = np.zeros((1, 28, 28), np.float32)
    dot[0, 14, 14] = 1.0
    lens = corrupt(dot, "lens_blur", 5, seed=0)[0]
    gauss = corrupt(dot, "gaussian_blur", 5, seed=0)[0]
    # defocus spreads a point into a uniform disk: many pixels share the peak value
    assert (lens >= 0.95 * lens.max()).sum() >= 21
    assert (gauss >= 0.95 * gauss.max()).sum() == 1
    # and the disk is round: symmetric under transposition and flips
    np.testing.assert_allclose(lens, lens.T, atol=1e-6)
    centred = lens[1:, 1:]  # rows/cols 1..27 are symmetric about pixel 14
    np.testing.assert_allclose(centred, centred[::-1, ::-1], atol=1e-6)
    # the disk widens with severity (RMS radius of the point spread)
    r2 = np.hypot(*np.mgrid[0:28, 0:28] - 14.0) ** 2
    spread = [np.sqrt((corrupt(dot, "lens_blur", s, 0)[0] * r2).sum()) for s in SEVERITIES]
    assert increasing(spread), spread


def test_noise_is_zero_mean_and_scales_with_severity() -> None:
    gray = np.full((64, 28, 28), 0.5, np.float32)
    sigmas = []
    for s in SEVERITIES:
        resid = corrupt(gray, "noise", s, seed=0) - gray
        assert abs(resid.mean()) < 0.005
        sigmas.append(resid.std())
        # independent per pixel: neighbouring residuals are uncorrelated
        corr = np.corrcoef(resid[:, :, :-1].ravel(), resid[:, :, 1:].ravel())[0, 1]
        assert abs(corr) < 0.05
    assert increasing(sigmas), sigmas
    assert 0.02 < sigmas[0] < 0.1 and sigmas[-1] < 0.3


def test_exposure_is_over_or_under_per_image() -> None:
    x = np.repeat(structured_images(), 4, axis=0)
    for s in SEVERITIES:
        out = corrupt(x, "exposure", s, seed=0)
        brighter = (out >= x - 1e-6).all(axis=(1, 2))
        darker = (out <= x + 1e-6).all(axis=(1, 2))
        # a global tone curve: every image moves one way, and both ways occur in a batch
        assert (brighter | darker).all()
        assert brighter.any() and darker.any()
        # monotone tone curve keeps the order of pixel values
        for i in range(len(x)):
            order = np.argsort(x[i].ravel(), kind="stable")
            assert (np.diff(out[i].ravel()[order]) >= -1e-6).all()


def test_snow_adds_bright_flakes_and_whitens() -> None:
    black = np.zeros((16, 28, 28), np.float32)
    counts = []
    for s in SEVERITIES:
        out = corrupt(black, "snow", s, seed=0)
        assert (out > 0.0).all()  # whitening lifts the whole frame a little
        assert np.median(out) < 0.3  # ... but only slightly
        flakes = out > 0.4
        assert flakes.any(axis=(1, 2)).all()
        counts.append(int(flakes.sum()))
    assert increasing(counts), counts
    x = structured_images()
    assert (corrupt(x, "snow", 5, seed=0) >= x - 1e-6).all()  # snow only brightens


def test_haze_is_bright_smooth_and_lowers_contrast(images: np.ndarray) -> None:
    contrast = [float(np.ptp(images, axis=(1, 2)).mean())]
    for s in SEVERITIES:
        out = corrupt(images, "haze", s, seed=0)
        contrast.append(float(np.ptp(out, axis=(1, 2)).mean()))
    assert increasing(contrast[::-1]), contrast
    fog = corrupt(np.zeros((8, 28, 28), np.float32), "haze", 5, seed=0)
    assert fog.mean() > 0.3  # a bright layer over the dark background
    # smooth: its pixel-to-pixel changes are tiny compared to its level
    assert np.abs(np.diff(fog, axis=2)).mean() < 0.02
    assert fog.std(axis=(1, 2)).mean() > 0.005  # but not a uniform grey


def test_dirty_lens_stains_are_local_blobs_that_grow() -> None:
    gray = np.full((16, 28, 28), 0.5, np.float32)
    areas = []
    for s in SEVERITIES:
        out = corrupt(gray, "dirty_lens", s, seed=0)
        stained = np.abs(out - gray) > 0.05
        areas.append(stained.mean())
        # a few contiguous blotches per image, never speckle, never the whole frame
        for m in stained:
            assert ndimage.label(m)[1] <= 12
        assert stained.mean() < 0.8
        # both dark and bright stains occur
        assert (out < 0.4).any() and (out > 0.6).any()
    assert increasing(areas), areas
    assert areas[0] > 0.02


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "fog"}, "unknown corruption kind 'fog'; expected one of: noise, lens_blur"),
        ({"severity": 0}, "severity must be one of (1, 2, 3, 4, 5), got 0"),
        ({"severity": 6}, "severity must be one of"),
        ({"severity": 2.0}, "severity must be an int"),
        ({"severity": True}, "severity must be an int"),
    ],
)
def test_bad_kind_or_severity(kwargs: dict, message: str) -> None:
    args = {"images": structured_images(), "kind": "noise", "severity": 1, "seed": 0}
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        corrupt(**(args | kwargs))


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (
            np.zeros((28, 28), np.float32),
            r"shape \(B, 28, 28\) or \(B, 1, 28, 28\), got \(28, 28\)",
        ),
        (np.zeros((2, 3, 28, 28), np.float32), r"got \(2, 3, 28, 28\)"),
        (np.zeros((2, 32, 32), np.float32), r"got \(2, 32, 32\)"),
        (np.zeros((2, 28, 28), np.uint8), "floating point .* got dtype uint8"),
        (np.full((2, 28, 28), 255.0, np.float32), r"must lie in \[0, 1\]"),
        (np.full((2, 28, 28), np.nan, np.float32), "NaN"),
    ],
)
def test_bad_images(images: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        corrupt(images, "noise", 1, seed=0)


def test_plot_corruption_grid_writes_png(tmp_path) -> None:
    path = plot_corruption_grid(structured_images()[:1], tmp_path / "grid.png", kinds=("snow",))
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
