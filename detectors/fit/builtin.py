"""From a classifier to a trained, exported detector H: data, signals, fit, export.

Every expensive step is cached on disk by content: the challenge splits (``dataset``), the
gradient signals of each split (keyed by the split and the engine's code), the featurizer.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from detectors import gradients, layer_norms
from detectors.fingerprint import code_fingerprint
from detectors.fit.challenge.dataset import (
    FAMILIES,
    ChallengeRecipe,
    ChallengeSplit,
    challenge_dir,
    load_challenge_split,
)
from detectors.fit.fashion_mnist import load_fashion_mnist, to_float
from detectors.signals import DEFAULT_GROUPS, SignalFeaturizer, embed


@dataclass
class SplitSignals:
    """Per-image gradient signals of a challenge split, as numpy arrays."""

    features: np.ndarray  # (n, N, L)
    logits: np.ndarray  # (n, N)
    embeddings: np.ndarray  # (n, D)


def _engine_key() -> str:
    return code_fingerprint([Path(gradients.__file__), Path(layer_norms.__file__)])[:12]


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
            return SplitSignals(stored["features"], stored["logits"], stored["embeddings"])
    engine = gradients.GradientFeatures(model)
    parts = []
    for start in tqdm(
        range(0, len(data), batch),
        desc="gradient features",
        unit="batch",
        disable=not progress,
        file=sys.stderr,
    ):
        s = engine.signals(torch.from_numpy(data.images[start : start + batch]))
        parts.append((s.features.numpy(), s.logits.numpy(), s.embeddings.numpy()))
    result = SplitSignals(*(np.concatenate(p) for p in zip(*parts, strict=True)))
    if cache is not None:
        tmp = cache.with_suffix(".tmp.npz")
        np.savez(tmp, **asdict(result))
        tmp.rename(cache)
    return result


def fit_featurizer(
    model: torch.nn.Module, groups: tuple[str, ...] = DEFAULT_GROUPS
) -> SignalFeaturizer:
    """KNN bank and Mahalanobis statistics from the 60,000 clean training images."""
    train = load_fashion_mnist("train")
    _, embeddings = embed(model, to_float(train.images))
    return SignalFeaturizer(groups=groups).fit(embeddings, train.labels)


@dataclass
class PreparedData:
    splits: dict[str, ChallengeSplit]
    signals: dict[str, SplitSignals]
    recipe: ChallengeRecipe


def prepare(
    model: torch.nn.Module,
    classifier_sha256: str,
    recipe: ChallengeRecipe | None = None,
    progress: bool = True,
) -> PreparedData:
    recipe = recipe or ChallengeRecipe()
    folder = challenge_dir(classifier_sha256, recipe)
    splits, signals = {}, {}
    for split in ("train", "val", "test"):
        splits[split] = load_challenge_split(model, classifier_sha256, split, recipe, progress)
        cache = folder / f"signals-{split}-{_engine_key()}.npz"
        signals[split] = split_signals(model, splits[split], cache, progress=progress)
    return PreparedData(splits, signals, recipe)


def vectors(featurizer: SignalFeaturizer, signals: SplitSignals, images: np.ndarray) -> np.ndarray:
    """H's input rows for a split: its signals and the images they came from."""
    return featurizer.transform(signals.features, signals.logits, signals.embeddings, images)


def training_data_summary(data: PreparedData) -> dict:
    return {
        "recipe": asdict(data.recipe),
        "families": list(FAMILIES),
        "counts": {
            split: {
                kind: int(n) for kind, n in zip(*np.unique(s.kind, return_counts=True), strict=True)
            }
            for split, s in data.splits.items()
        },
        "attack_success_rates": {split: s.attack_success for split, s in data.splits.items()},
        "note": "Fashion-MNIST test images split by source index: train/val/test share none; "
        "adversarial images are successful attacks on images the classifier got right",
    }


def train_detector(
    model: torch.nn.Module,
    classifier_sha256: str,
    out_dir: Path,
    recipe: ChallengeRecipe | None = None,
    groups: tuple[str, ...] = DEFAULT_GROUPS,
    progress: bool = True,
) -> Path:
    """Build (or reuse) the challenge data, fit H on train (temperature on val), report its
    test metrics in the manifest, and export it into ``out_dir``."""
    from sklearn.metrics import f1_score

    from detectors import detector

    data = prepare(model, classifier_sha256, recipe, progress)
    featurizer = fit_featurizer(model, groups)
    columns = featurizer.column_names(
        data.signals["train"].logits.shape[1], gradients.GradientFeatures(model).layer_names
    )
    x = {
        split: vectors(featurizer, s, data.splits[split].images)
        for split, s in data.signals.items()
    }
    y = {split: s.family for split, s in data.splits.items()}
    if progress:
        print(
            f"fitting H on {len(y['train'])} images, {x['train'].shape[1]} signals", file=sys.stderr
        )
    trained = detector.fit(featurizer, columns, x["train"], y["train"], x["val"], y["val"])
    raw = trained.pipeline.predict_proba(x["test"])
    probs = trained.predict_proba_vectors(x["test"])
    metrics = {
        "test_accuracy": float((probs.argmax(1) == y["test"]).mean()),
        "test_macro_f1": float(f1_score(y["test"], probs.argmax(1), average="macro")),
        "test_ece_before_temperature": detector.expected_calibration_error(raw, y["test"]),
        "test_ece": detector.expected_calibration_error(probs, y["test"]),
    }
    staging = out_dir.with_name(out_dir.name + ".building")
    detector.export(
        trained,
        staging,
        classifier_sha256=classifier_sha256,
        training_data=training_data_summary(data),
        metrics=metrics,
    )
    if out_dir.exists():
        import shutil

        shutil.rmtree(out_dir)
    staging.rename(out_dir)
    if progress:
        print(
            f"detector H: 4-way test accuracy {metrics['test_accuracy']:.3f}, macro-F1 "
            f"{metrics['test_macro_f1']:.3f}, ECE {metrics['test_ece']:.3f}; saved in "
            f"{out_dir}",
            file=sys.stderr,
        )
    return out_dir
