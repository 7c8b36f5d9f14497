"""Fitting: the challenge splits with their gradient signals, as H is trained and evaluated on.

The gradient signals of a split are the expensive part; they are cached on disk beside the
split, keyed by the engine's code, so a fit that resumes (or a report) computes them once.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from detectors import gradients
from detectors.fit.challenge.dataset import ChallengeSplit
from detectors.signals import SignalFeaturizer


@dataclass
class SplitSignals:
    """Per-image gradient signals of a challenge split, as numpy arrays."""

    features: np.ndarray  # (n, N, L)
    logits: np.ndarray  # (n, N)
    embeddings: np.ndarray  # (n, D)
    squeezed_logits: np.ndarray  # (n, K, N): the squeezed views' (``detectors.stability``)


def split_signals(
    model: torch.nn.Module,
    data: ChallengeSplit,
    cache: Path | None = None,
    batch: int = 128,
    progress: bool = True,
) -> SplitSignals:
    """Gradient features, logits and embeddings of every image (cached when ``cache``)."""
    from tqdm import tqdm

    if cache is not None and cache.exists():
        with np.load(cache, allow_pickle=False) as stored:
            return SplitSignals(*(stored[name] for name in SplitSignals.__dataclass_fields__))
    engine = gradients.GradientFeatures(model, squeeze=True)
    parts = []
    for start in tqdm(
        range(0, len(data), batch),
        desc="gradient features",
        unit="batch",
        disable=not progress,
        file=sys.stderr,
    ):
        s = engine.signals(torch.from_numpy(data.images[start : start + batch]))
        assert s.squeezed_logits is not None  # an engine built with squeeze=True
        parts.append(
            (s.features.numpy(), s.logits.numpy(), s.embeddings.numpy(), s.squeezed_logits.numpy())
        )
    result = SplitSignals(*(np.concatenate(p) for p in zip(*parts, strict=True)))
    if cache is not None:
        tmp = cache.with_suffix(".tmp.npz")
        np.savez(tmp, **asdict(result))
        tmp.rename(cache)
    return result


@dataclass
class PreparedData:
    splits: dict[str, ChallengeSplit]
    signals: dict[str, SplitSignals]
    recipe: object  # the recipe the splits were made by (``FitRecipe``)


def vectors(featurizer: SignalFeaturizer, signals: SplitSignals, images: np.ndarray) -> np.ndarray:
    """H's input rows for a split: its signals and the images they came from."""
    return featurizer.transform(
        signals.features, signals.logits, signals.embeddings, images, signals.squeezed_logits
    )
