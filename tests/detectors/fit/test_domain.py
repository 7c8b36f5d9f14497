"""Challenge data for a user's domain: source splits and minimal attacks."""

from __future__ import annotations

import numpy as np
import torch

from detectors.fit.domain import FitRecipe, minimal_pgd, split_sources, split_val_sources


def test_sources_never_cross_splits() -> None:
    parts = split_sources(101, seed=3, has_val_data=False)
    joined = np.concatenate(list(parts.values()))
    assert sorted(joined.tolist()) == list(range(101))
    all_train = split_sources(101, seed=3, has_val_data=True)
    assert list(all_train) == ["train"] and np.array_equal(all_train["train"], np.arange(101))
    val = split_val_sources(40, seed=3)
    assert not set(val["val"]) & set(val["test"]) and len(val["val"]) + len(val["test"]) == 40


def test_minimal_pgd_stops_at_the_smallest_fooling_budget() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 20 * 24, 4)).eval()
    images = np.random.default_rng(0).uniform(0, 1, (24, 3, 20, 24)).astype(np.float32)
    with torch.no_grad():
        labels = model(torch.from_numpy(images)).argmax(1).numpy()
    budgets = (0.002, 0.01, 0.05, 0.2)
    fooled, rows, rate = minimal_pgd(model, images, labels, budgets, seed=0)
    assert len(fooled) == len(rows) > 0 and 0 < rate <= 1
    with torch.no_grad():
        predicted = model(torch.from_numpy(fooled)).argmax(1).numpy()
    assert (predicted != labels[rows]).all()
    linf = np.abs(fooled - images[rows]).reshape(len(rows), -1).max(1)
    assert (linf <= budgets[-1] + 1e-6).all()
    # Each image is kept at the first budget that fooled it: a full-budget PGD moves further.
    assert np.median(linf) < budgets[-1] / 2


def test_quick_recipe_scales() -> None:
    quick = FitRecipe.quick()
    assert "pgd_min" in quick.attacks
    assert quick.scaled(2.0).clean["train"] == 2 * quick.clean["train"]
    assert quick.scaled(0.001).corrupted_per_variant["val"] == 1
