"""The squeezed views and the stability signals (feature squeezing)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from byom_models import make_model

from detectors import stability
from detectors.gradients import GradientFeatures
from detectors.signals import SignalFeaturizer


def test_squeezes_keep_shape_range_and_a_flat_image() -> None:
    x = torch.rand(3, 3, 17, 23)
    for view in stability.squeezed_views(x):
        assert view.shape == x.shape and view.min() >= 0 and view.max() <= 1
    flat = torch.full((2, 1, 9, 9), 0.25)
    for view in stability.squeezed_views(flat):
        torch.testing.assert_close(view, flat)


def test_squeezes_remove_a_one_pixel_spike_but_keep_an_edge() -> None:
    spike = torch.zeros(1, 1, 12, 12)
    spike[0, 0, 6, 6] = 1.0
    blur, median = stability.squeezed_views(spike)
    assert median.max() == 0.0  # a 2×2 median never keeps a lone pixel
    assert blur.max() < 0.7  # spread over its neighbours
    edge = torch.zeros(1, 1, 12, 12)
    edge[..., 6:] = 1.0
    blur, median = stability.squeezed_views(edge)
    torch.testing.assert_close(median[..., :, :5], edge[..., :, :5])
    torch.testing.assert_close(median[..., :, 7:], edge[..., :, 7:])
    assert (blur[..., :, 8:] > 0.99).all() and (blur[..., :, :4] < 0.01).all()


def test_squeezing_needs_images() -> None:
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        stability.squeezed_views(torch.rand(4, 10))


def test_stability_columns_measure_how_far_the_softmax_moves() -> None:
    logits = np.array([[4.0, 0.0, 0.0], [4.0, 0.0, 0.0]])
    same = np.repeat(logits[:, None], 2, axis=1)
    moved = same.copy()
    moved[1, 1] = [0.0, 4.0, 0.0]  # the median view flips the second image's prediction
    columns = stability.stability_columns(logits, moved)
    assert columns.shape == (2, len(stability.STABILITY_COLUMNS))
    np.testing.assert_allclose(columns[0], np.log(1e-6), atol=1e-3)  # nothing moved
    p = np.exp(logits[1]) / np.exp(logits[1]).sum()
    flipped = p[[1, 0, 2]]
    distance = np.abs(flipped - p).sum()
    np.testing.assert_allclose(
        columns[1], np.log([1e-6, distance + 1e-6, distance + 1e-6]), rtol=1e-6
    )


def test_engine_returns_the_squeezed_views_logits_only_when_asked() -> None:
    model = make_model(channels=3, classes=5).eval()
    x = torch.rand(7, 3, 20, 24)
    assert GradientFeatures(model).signals(x).squeezed_logits is None
    model.train()  # the engine evaluates in eval mode and leaves the flag as found
    with torch.no_grad():
        signals = GradientFeatures(model, squeeze=True, max_batch=3).signals(x)
    assert model.training
    model.eval()
    assert signals.squeezed_logits is not None
    assert signals.squeezed_logits.shape == (7, len(stability.SQUEEZES), 5)
    expected = stability.squeezed_logits(model, x)
    torch.testing.assert_close(signals.squeezed_logits, expected, rtol=1e-5, atol=1e-5)
    assert "squeeze" in signals.timings_ms


def test_featurizer_with_the_stability_group_says_how_to_get_its_signals() -> None:
    rng = np.random.default_rng(0)
    featurizer = SignalFeaturizer(groups=("logits", "stability"))
    featurizer.fit(rng.normal(size=(20, 4)), np.repeat(np.arange(2), 10), bank_size=20)
    assert featurizer.needs_squeezed_logits
    assert featurizer.column_names(3, ["a"])[-3:] == list(stability.STABILITY_COLUMNS)
    features, logits = rng.random((2, 3, 1)), rng.normal(size=(2, 3))
    with pytest.raises(ValueError, match=r"squeeze=True"):
        featurizer.transform(features, logits, rng.normal(size=(2, 4)))
    squeezed = rng.normal(size=(2, 2, 3))
    out = featurizer.transform(features, logits, rng.normal(size=(2, 4)), None, squeezed)
    expected = stability.stability_columns(logits, squeezed)
    np.testing.assert_allclose(out[:, -3:], expected, rtol=1e-5)


def test_the_closed_form_median_is_the_sorted_windows_median() -> None:
    x = torch.rand(3, 2, 9, 11)
    padded = torch.nn.functional.pad(x, (1, 0, 1, 0), mode="replicate")
    windows = padded.unfold(2, 2, 1).unfold(3, 2, 1).reshape(3, 2, 9, 11, 4)
    _, median = stability.squeezed_views(x)
    torch.testing.assert_close(median, windows.sort(-1).values[..., 1])


def test_one_pixel_rows_and_columns_are_squeezed() -> None:
    for shape in ((2, 3, 1, 1), (1, 1, 1, 9), (1, 2, 7, 1)):
        x = torch.rand(shape)
        blur, median = stability.squeezed_views(x)
        assert blur.shape == median.shape == x.shape
    single = torch.rand(1, 3, 1, 1)
    for view in stability.squeezed_views(single):  # replicated edges: nothing to mix with
        torch.testing.assert_close(view, single)


class _EditsItsInput(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = make_model(channels=3, classes=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.mul_(2.0).sub_(1.0))  # normalizes in place


def test_views_are_squeezed_from_the_image_as_given_by_a_model_that_edits_its_input() -> None:
    model = _EditsItsInput().eval()
    x = torch.rand(5, 3, 16, 16)
    given = x.clone()
    signals = GradientFeatures(model, squeeze=True).signals(x)
    torch.testing.assert_close(x, given)  # the caller's tensor is untouched
    expected = stability.squeezed_logits(model, given.clone())
    assert signals.squeezed_logits is not None
    torch.testing.assert_close(signals.squeezed_logits, expected, rtol=1e-5, atol=1e-5)
