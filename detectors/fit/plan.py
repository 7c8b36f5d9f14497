"""Sizing the challenge data to a time limit, from the classifier's measured cost.

``fit``'s time goes to two kinds of work whose cost depends on the classifier: gradient
features of every challenge image (one forward pass and the N labels' backward), and the
attacks (a forward and backward pass per image and step; forward passes only for the
black-box attack), which run only on the images the classifier gets right. The passes and that
share are measured on a few of the user's images before anything is built; the recipe's counts
are then scaled so that the estimate stays within the limit, never below the quick recipe's
counts. The chosen factor is
stored by content, so an interrupted fit resumes with the same recipe (and the same caches).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from detectors.fit.challenge.adversarial import ATTACKS
from detectors.fit.challenge.corruptions import ALL_CORRUPTIONS, SEVERITIES
from detectors.fit.challenge.dataset import SPLITS
from detectors.fit.challenge.ood import GENERIC_OOD_SETS
from detectors.fit.domain import EPS_GRID, MINIMAL, FitRecipe
from detectors.gradients import GradientFeatures

# Share of the limit left for what the counts barely change: loading, H's fits, the report.
_RESERVED = 0.2
# Attacked images per attack variant, as ``build_split`` draws them.
_ATTACK_DRAW = (1.4, 8)
_SCALED_EPS_IMAGES = 96
# Square stops querying an image once it is fooled. The budgets are scaled so that PGD fools
# about half at the middle level and Square, a weaker black-box search, fools fewer (most
# images run every query at the lowest level, a third at the highest): this share of its
# queries errs high for a classifier Square seldom fools, without charging every image the
# full query budget at a forward-and-backward cost (several times a ResNet-18's real time).
_SQUARE_QUERYING = 0.85
_ACCURACY_IMAGES = 512
_PLAN_FORMAT = 2


@dataclass(frozen=True)
class PassCosts:
    """Seconds per image on this machine (gradient features; one forward and backward; one
    forward), and the share of images the classifier gets right (the only ones attacked)."""

    features_s: float
    gradient_s: float
    forward_s: float
    correct_share: float = 1.0


def measure_costs(
    model: torch.nn.Module,
    images: np.ndarray,
    labels: np.ndarray | None = None,
    batch: int = 16,
    repeats: int = 3,
) -> PassCosts:
    """Time the three kinds of pass on up to ``batch`` of ``images`` (after a warm-up), the
    fastest of ``repeats``: other work on the machine only ever adds to a timing, and one
    unlucky sample would shrink the whole recipe. With ``labels``, the classifier's accuracy
    on a sample of the images is the share that will be attacked."""
    x = torch.from_numpy(np.ascontiguousarray(images[:batch], dtype=np.float32))
    engine = GradientFeatures(model, squeeze=True)  # as the fit computes them

    def step() -> None:
        probe = x.clone().requires_grad_(True)
        with torch.enable_grad():
            torch.autograd.grad(model(probe).logsumexp(1).sum(), [probe])

    def forward() -> None:
        with torch.no_grad():
            model(x)

    def fastest(run: Callable[[], object]) -> float:
        run()  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        return min(times) / len(x)

    correct = 1.0
    if labels is not None and len(labels):
        pick = np.sort(np.random.default_rng(0).permutation(len(images))[:_ACCURACY_IMAGES])
        sample = torch.from_numpy(np.ascontiguousarray(images[pick], dtype=np.float32))
        with torch.no_grad():
            predicted = torch.cat([model(chunk).argmax(1) for chunk in sample.split(64)])
        correct = float((predicted.numpy() == labels[pick]).mean())
    return PassCosts(fastest(lambda: engine.signals(x)), fastest(step), fastest(forward), correct)


def _attack_passes(name: str) -> tuple[float, float]:
    """(forward-and-backward, forward-only) passes one attacked image costs at one level."""
    if name == MINIMAL:
        return 6 * 10 + 6, 0.0  # masked PGD at up to six budgets (``build_split``)
    params = ATTACKS[name].params
    if name == "square":  # logits only, while the image is not fooled yet
        return 0.0, float(params["n_queries"]) * _SQUARE_QUERYING
    return float(params.get("steps", 1)) + 1, 0.0


@dataclass(frozen=True)
class Workload:
    feature_images: int
    gradient_passes: float  # on every image (the report's gradient peers)
    attack_passes: float  # forward and backward, on the images the classifier gets right
    attack_forwards: float  # forward only, on those images

    def seconds(self, costs: PassCosts) -> float:
        attacked = costs.correct_share
        return (
            self.feature_images * costs.features_s
            + (self.gradient_passes + attacked * self.attack_passes) * costs.gradient_s
            + attacked * self.attack_forwards * costs.forward_s
        )


def workload(recipe: FitRecipe, user_ood_sets: int = 0) -> Workload:
    """How many images get features, and how many passes the attacks and peers take."""
    ood_sets = len(recipe.ood_sets or GENERIC_OOD_SETS) + user_ood_sets
    variants = len(recipe.corruptions or ALL_CORRUPTIONS) * len(SEVERITIES)
    features = 0
    gradient_passes = 0.0
    attack_passes = len(EPS_GRID) * _SCALED_EPS_IMAGES * _attack_passes("pgd")[0]
    attack_forwards = 0.0
    for split in SPLITS:
        n = recipe.adversarial_per_variant[split]
        drawn = _ATTACK_DRAW[0] * n + _ATTACK_DRAW[1]
        levels = {a: 1 if a == MINIMAL else len(ATTACKS[a].strengths) for a in recipe.attacks}
        images = recipe.clean[split] + ood_sets * recipe.ood_per_set[split]
        images += variants * recipe.corrupted_per_variant[split]
        images += n * sum(levels.values())
        features += images
        attack_passes += drawn * sum(_attack_passes(a)[0] * k for a, k in levels.items())
        attack_forwards += drawn * sum(_attack_passes(a)[1] * k for a, k in levels.items())
        if split == "test":  # the report's peers that backpropagate (ODIN, GradNorm)
            gradient_passes += 2 * images
    return Workload(features, gradient_passes, attack_passes, attack_forwards)


@dataclass(frozen=True)
class Plan:
    factor: float  # every count of the requested recipe times this (1: as requested)
    within: bool  # False: even the smallest recipe's estimate exceeds the limit
    estimate_s: float  # the requested recipe's challenge work
    planned_s: float  # the planned recipe's
    costs: PassCosts

    def recipe(self, requested: FitRecipe) -> FitRecipe:
        return requested if self.factor >= 1 else requested.scaled(self.factor)


def plan(
    requested: FitRecipe, costs: PassCosts, limit_s: float | None, user_ood_sets: int = 0
) -> Plan:
    """The largest factor (at most 1) whose challenge work fits in the limit less a reserve,
    but never fewer images than the quick recipe's."""
    estimate = workload(requested, user_ood_sets).seconds(costs)

    def seconds(factor: float) -> float:
        return workload(requested.scaled(factor), user_ood_sets).seconds(costs)

    factor = 1.0
    if limit_s and estimate > limit_s * (1 - _RESERVED):
        target = limit_s * (1 - _RESERVED)
        # Counts round and some costs are fixed: bisect on the scaled recipe itself.
        low = min(1.0, FitRecipe.quick().clean["train"] / max(requested.clean["train"], 1))
        high = 1.0
        if seconds(low) < target:
            for _ in range(30):
                middle = (low + high) / 2
                low, high = (middle, high) if seconds(middle) <= target else (low, middle)
        factor = min(1.0, low)
    planned = estimate if factor >= 1 else seconds(factor)
    within = not limit_s or planned <= limit_s * (1 - _RESERVED)
    return Plan(factor, within, estimate, planned, costs)


def stored_plan(folder: Path, identity: dict, make: Callable[[], Plan]) -> Plan:
    """The plan stored for ``identity`` (classifier, data, recipe, limit), else ``make()``
    stored: timings vary from run to run, and a resumed fit must choose the same recipe."""
    keyed = {**identity, "plan_format": _PLAN_FORMAT}  # plans of an older format are remade
    key = hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:16]
    path = folder / f"plan-{key}.json"
    if path.exists():
        stored = json.loads(path.read_text())
        return Plan(
            stored["factor"],
            stored["within"],
            stored["estimate_s"],
            stored["planned_s"],
            PassCosts(**stored["costs"]),
        )
    result = make()
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(result)))
    tmp.rename(path)
    return result
