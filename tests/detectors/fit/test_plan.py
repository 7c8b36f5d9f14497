"""Sizing the challenge data to the time limit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from detectors.fit.domain import FitRecipe
from detectors.fit.plan import PassCosts, Plan, measure_costs, plan, stored_plan, workload

FAST = PassCosts(features_s=0.002, gradient_s=0.0005, forward_s=0.0002)
SLOW = PassCosts(features_s=0.4, gradient_s=0.05, forward_s=0.02)


def test_workload_counts_every_kind_and_grows_with_the_recipe() -> None:
    full, half = workload(FitRecipe()), workload(FitRecipe().scaled(0.5))
    assert 0.4 * full.feature_images < half.feature_images < 0.6 * full.feature_images
    assert half.gradient_passes < full.gradient_passes
    assert half.attack_passes < full.attack_passes
    # A user's OOD set adds images to every split; dropping the costliest attack removes work.
    assert workload(FitRecipe(), user_ood_sets=1).feature_images > full.feature_images
    cheap = FitRecipe(attacks=("fgsm", "pgd"))
    assert workload(cheap).attack_passes < full.attack_passes / 3
    # The black-box attack costs forward passes only.
    assert workload(cheap).attack_forwards == 0 < full.attack_forwards


def test_attacks_cost_only_on_the_images_the_classifier_gets_right() -> None:
    full = workload(FitRecipe())
    poor = PassCosts(features_s=0.0, gradient_s=0.05, forward_s=0.02, correct_share=0.5)
    good = PassCosts(features_s=0.0, gradient_s=0.05, forward_s=0.02, correct_share=1.0)
    peers = full.gradient_passes * 0.05  # the report's gradient peers run on every image
    assert full.seconds(poor) - peers == pytest.approx((full.seconds(good) - peers) / 2)
    # Square's queries are forward passes: a costlier backward does not change them.
    heavy_backward = PassCosts(features_s=0.0, gradient_s=0.5, forward_s=0.02)
    square_only = FitRecipe(attacks=("square",))
    attack = workload(square_only)
    assert attack.attack_forwards > 0
    assert (attack.seconds(heavy_backward) - attack.seconds(good)) == pytest.approx(
        (attack.gradient_passes + attack.attack_passes) * (0.5 - 0.05)
    )


def test_a_fast_classifier_keeps_the_requested_recipe() -> None:
    chosen = plan(FitRecipe(), FAST, limit_s=45 * 60)
    assert chosen.factor == 1.0
    assert chosen.recipe(FitRecipe()) == FitRecipe()


def test_a_slow_classifier_is_scaled_to_fit_the_limit() -> None:
    limit = 3 * 3600
    chosen = plan(FitRecipe(), SLOW, limit_s=limit)
    assert chosen.estimate_s > limit
    assert 0 < chosen.factor < 1
    assert chosen.planned_s <= 0.8 * limit  # the rest is reserved for H and the report
    assert chosen.planned_s > 0.7 * limit  # and not much smaller than it could be
    recipe = chosen.recipe(FitRecipe())
    assert recipe.clean["train"] < FitRecipe().clean["train"]
    assert workload(recipe).seconds(SLOW) == pytest.approx(chosen.planned_s)


def test_never_below_the_quick_recipe_and_no_limit_means_no_scaling() -> None:
    hopeless = plan(FitRecipe(), SLOW, limit_s=60)
    assert hopeless.recipe(FitRecipe()).clean["train"] >= FitRecipe.quick().clean["train"]
    assert not hopeless.within
    assert plan(FitRecipe(), SLOW, limit_s=3 * 3600).within
    assert plan(FitRecipe(), SLOW, limit_s=None).factor == 1.0


def test_a_stored_plan_is_reused_so_a_resumed_fit_builds_the_same_recipe(tmp_path) -> None:
    identity = {"classifier": "abc", "limit": 60}
    first = stored_plan(tmp_path, identity, lambda: plan(FitRecipe(), SLOW, 10 * 3600))

    def must_not_run() -> Plan:
        raise AssertionError("measured again")

    assert stored_plan(tmp_path, identity, must_not_run) == first
    other = stored_plan(tmp_path, {**identity, "limit": 120}, lambda: plan(FitRecipe(), FAST, 1))
    assert other.factor != first.factor


def test_measure_costs_times_every_pass_and_the_share_attacked_on_a_tiny_model() -> None:
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(144, 5)
    ).eval()
    images = np.random.default_rng(0).random((100, 3, 8, 8), np.float32)
    with torch.no_grad():
        predicted = model(torch.from_numpy(images)).argmax(1).numpy()
    labels = predicted.copy()
    labels[:25] = (predicted[:25] + 1) % 5  # a quarter wrong
    costs = measure_costs(model, images, labels)
    assert costs.features_s > 0 and costs.gradient_s > 0 and costs.forward_s > 0
    assert costs.correct_share == pytest.approx(0.75)
    assert measure_costs(model, images).correct_share == 1.0  # no labels: all attacked
    assert all(p.grad is None for p in model.parameters())
