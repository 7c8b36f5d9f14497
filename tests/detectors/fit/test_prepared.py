"""The challenge splits' gradient signals, cached on disk beside the split."""

from __future__ import annotations

import numpy as np
import torch
from byom_models import make_model

from detectors import stability
from detectors.fit.challenge.dataset import ChallengeSplit
from detectors.fit.prepared import split_signals, vectors
from detectors.signals import SignalFeaturizer


def _split(n: int) -> ChallengeSplit:
    rng = np.random.default_rng(0)
    return ChallengeSplit(
        images=rng.random((n, 3, 12, 12), dtype=np.float32),
        family=np.zeros(n, dtype=np.int64),
        kind=np.array(["clean"] * n),
        source=np.arange(n),
    )


def test_signals_keep_the_squeezed_views_logits_through_the_cache(tmp_path) -> None:
    model = make_model(channels=3, classes=4).eval()
    data = _split(9)
    cache = tmp_path / "signals-test.npz"
    computed = split_signals(model, data, cache, batch=4, progress=False)
    assert cache.exists()
    expected = stability.squeezed_logits(model, torch.from_numpy(data.images)).numpy()
    np.testing.assert_allclose(computed.squeezed_logits, expected, rtol=1e-5, atol=1e-5)
    cached = split_signals(torch.nn.Identity(), data, cache, progress=False)  # read, not run
    for name in ("features", "logits", "embeddings", "squeezed_logits"):
        np.testing.assert_array_equal(getattr(cached, name), getattr(computed, name))
    featurizer = SignalFeaturizer(groups=("logits", "stability"))
    featurizer.fit(computed.embeddings, np.arange(9) % 2, bank_size=9)
    rows = vectors(featurizer, cached, data.images)
    np.testing.assert_allclose(
        rows[:, -3:], stability.stability_columns(computed.logits, expected), rtol=1e-4, atol=1e-5
    )
