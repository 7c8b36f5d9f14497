"""The challenge set: families, kinds, and no source image shared between splits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from detectors.fit.challenge.dataset import (
    FAMILIES,
    SPLITS,
    ChallengeRecipe,
    ChallengeSplit,
    build_split,
    source_indices,
)

TINY = ChallengeRecipe(
    clean={"train": 20, "val": 5, "test": 20},
    ood_per_set={"train": 6, "val": 3, "test": 6},
    corrupted_per_variant={"train": 1, "val": 1, "test": 1},
    adversarial_per_variant={"train": 3, "val": 2, "test": 3},
    attacks=("fgsm", "pgd"),  # the slower ones are exercised in test_adversarial.py
)


def test_source_indices_are_disjoint_and_cover_the_test_set() -> None:
    parts = source_indices(0)
    assert sum(len(p) for p in parts.values()) == 10_000
    assert len(np.unique(np.concatenate(list(parts.values())))) == 10_000
    assert not np.array_equal(parts["train"], source_indices(1)["train"])


@pytest.fixture(scope="module")
def splits(default_classifier) -> dict[str, ChallengeSplit]:
    model = default_classifier.module
    return {s: build_split(model, TINY, s, progress=False) for s in ("train", "test")}


def test_no_source_image_crosses_splits(splits) -> None:
    parts = source_indices(TINY.seed)
    for split, data in splits.items():
        used = data.source[data.source >= 0]
        assert np.isin(used, parts[split]).all()
    train = set(splits["train"].source[splits["train"].source >= 0].tolist())
    test = set(splits["test"].source[splits["test"].source >= 0].tolist())
    assert not train & test


def test_every_family_and_kind_is_present(splits) -> None:
    data = splits["test"]
    assert set(np.unique(data.family)) == set(range(len(FAMILIES)))
    groups = {k.split(":")[0] + ":" + k.split(":")[1] for k in data.kind if k != "clean"}
    assert {
        "ood:mnist",
        "ood:letters",
        "ood:natural",
        "corrupted:snow",
        "adversarial:pgd",
        "adversarial:fgsm",
    } <= groups
    assert data.images.dtype == np.float32 and data.images.shape[1:] == (1, 28, 28)
    assert data.images.min() >= 0 and data.images.max() <= 1
    assert (data.source[data.family == FAMILIES.index("ood")] == -1).all()


def test_adversarial_images_fool_the_classifier(splits, default_classifier) -> None:
    data = splits["test"]
    adv = data.family == FAMILIES.index("adversarial")
    with torch.no_grad():
        predicted = default_classifier.module(torch.from_numpy(data.images[adv])).argmax(1)
    from detectors.fit.fashion_mnist import load_fashion_mnist

    labels = load_fashion_mnist("test").labels[data.source[adv]]
    assert (predicted.numpy() != labels).all()
    assert all(0 < rate <= 1 for rate in data.attack_success.values())


def test_save_load_round_trip(splits, tmp_path) -> None:
    data = splits["train"]
    data.save(tmp_path / "s.npz")
    loaded = ChallengeSplit.load(tmp_path / "s.npz")
    assert np.array_equal(loaded.images, data.images)
    assert list(loaded.kind) == list(data.kind)
    assert loaded.attack_success == data.attack_success
    assert SPLITS == ("train", "val", "test")
