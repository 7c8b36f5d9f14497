"""Core: the novelty guard — H's in-distribution probability, held to the clean data's own tails.

A discriminative H learns what its training kinds have in common; a kind unlike all of them can
land where H saw nothing and be called clean. The guard makes P(in_distribution) answer to
evidence that needs no challenge data as well: a few one-class signals (KNN and Mahalanobis
distances, energy, max softmax, the top-two logit margin, the image statistics' distance from
the clean images, how far the softmax moves when the image is squeezed) and H's own novelty
are each turned into a rank among the validation split's clean images, combined as

    u = max(rank_H, max_j rank_j ** power_j)

(the power keeps the ordinary spread of clean images from counting much: mostly a tail rarer
than most clean images' moves u; a higher power trusts H more and transfers worse to kinds H
never saw, a lower one lets every signal's ordinary spread blur the seen kinds), and mapped to
P(in_distribution) by a logistic fit on the validation split. The split of the rest between
ood, corrupted and adversarial stays H's. Everything here is numpy: the guard is stored as
plain numbers in the detector's manifest.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

# Signals of H's input vector that need no challenge data, their direction (+1: larger is more
# novel) and their power. Only those present in a detector's columns are used.
GUARD_SIGNALS = (
    ("knn10_cosine_distance", 1.0, 12.0),
    ("mahalanobis_min", 1.0, 12.0),
    ("energy", -1.0, 12.0),
    # Minimal-perturbation attacks stop just past the boundary: confidence and margin rarer
    # than clean's are their only trace, so these two count from lower in the tail.
    ("msp", -1.0, 2.0),
    ("logit_margin", -1.0, 2.0),
    ("rel_image_distance", 1.0, 12.0),
    # Feature squeezing: a perturbation tuned to cross a boundary is undone by a pixel-scale
    # smoothing, whatever attack made it; counted from lower in the tail than the distances.
    ("squeeze_l1_max", 1.0, 4.0),
)
# Near the top r**p ≈ 1 - p (1 - r): a signal moves u only where its tail is about p times
# rarer than H's, a correction for looking at several signals. Chosen by leave-one-kind-out
# on two classifiers' challenge data (grey 28 px and RGB 32 px): a higher power on the
# confidence signals let boundary-hugging attacks left out of H's training fall behind max
# softmax; a low one on the distance signals blurred the seen kinds (the ordinary spread of
# clean images counted as novelty).
DEFAULT_POWER = 2.0
_REFERENCE_POINTS = 1000  # quantiles kept per signal: the ranks' resolution
_EPS = 1e-6


def _rank(reference: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Share of the clean reference below each value, in (0, 1); past the largest clean value
    it keeps rising toward 1 along an exponential tail fitted to the top tenth, so an image far
    beyond every clean one ranks above one just past them (an empirical rank would tie them)."""
    points = len(reference)
    ranks = np.searchsorted(reference, values, side="right") / (points + 1)
    top, decile = reference[-1], reference[int(0.9 * (points - 1))]
    scale = max(top - decile, 1e-12) / np.log(max(0.1 * (points + 1), 2.0))
    beyond = values > top
    ranks[beyond] = 1.0 - np.exp(-(values[beyond] - top) / scale) / (points + 1)
    return ranks


def _reference(values: np.ndarray) -> np.ndarray:
    points = min(len(values), _REFERENCE_POINTS)
    return np.quantile(values, np.linspace(0.0, 1.0, points))


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, _EPS, 1 - _EPS)
    return np.log(p) - np.log1p(-p)


@dataclass
class NoveltyGuard:
    columns: list[int]  # indices into H's input vector
    signs: list[float]
    references: list[list[float]]  # each signal's clean quantiles (sorted, oriented)
    h_reference: list[float]  # H's novelty 1 - P(in_distribution) on the same clean images
    power: float  # for every signal, unless ``powers`` names one per signal
    intercept: float  # P(in_distribution) = sigmoid(intercept + slope * logit(1 - u))
    slope: float
    # "max": the rarest tail counts (Tippett); "fisher": moderate tails of several signals add up.
    combine: str = "max"
    powers: list[float] | None = None

    @classmethod
    def fit(
        cls,
        column_names: list[str],
        vectors: np.ndarray,
        probs: np.ndarray,
        labels: np.ndarray,
        power: float | None = None,
        combine: str = "max",
    ) -> NoveltyGuard | None:
        """From the validation split: H's input rows, H's probabilities, family labels (0 is
        in_distribution). ``power``: one for every signal instead of each one's own. None when
        no guard signal is among the columns."""
        from sklearn.linear_model import LogisticRegression

        found = [(column_names.index(n), s, p) for n, s, p in GUARD_SIGNALS if n in column_names]
        clean = labels == 0
        if not found or clean.sum() < 10 or clean.all():
            return None
        columns, signs = [i for i, _, _ in found], [s for _, s, _ in found]
        guard = cls(
            columns=columns,
            signs=signs,
            references=[
                _reference(vectors[clean, i].astype(np.float64) * s).tolist() for i, s, _ in found
            ],
            h_reference=_reference(1.0 - probs[clean, 0]).tolist(),
            power=DEFAULT_POWER if power is None else power,
            intercept=0.0,
            slope=1.0,
            combine=combine,
            powers=[p for _, _, p in found] if power is None else None,
        )
        z = _logit(1.0 - guard.novelty(vectors, probs))[:, None]
        # Regularized: where the seen kinds separate perfectly, the fit must stay a slope, not
        # a step placed just past them (which would call a further kind clean).
        regression = LogisticRegression(C=1.0).fit(z, clean.astype(int))
        guard.intercept = float(regression.intercept_[0])
        guard.slope = float(regression.coef_[0, 0])
        return guard

    def novelty(self, vectors: np.ndarray, probs: np.ndarray) -> np.ndarray:
        """u in (0, 1): how far into the clean images' tails the image lies, by H or by any
        one-class signal."""
        h = _rank(np.asarray(self.h_reference), 1.0 - probs[:, 0])
        ranks = [
            _rank(np.asarray(reference), vectors[:, column].astype(np.float64) * sign)
            for column, sign, reference in zip(
                self.columns, self.signs, self.references, strict=True
            )
        ]
        if self.combine == "fisher":
            # -2 Σ log(1 - r) is χ² with 2k degrees of freedom for k independent clean ranks;
            # its survival function in closed form (even degrees of freedom).
            half = -sum(np.log1p(-np.clip(r, 0.0, 1.0 - 1e-15)) for r in [h, *ranks])
            term, total = np.ones_like(half), np.ones_like(half)
            for i in range(1, len(ranks) + 1):
                term = term * half / i
                total = total + term
            return 1.0 - np.exp(-half) * total
        powers = self.powers or [self.power] * len(ranks)
        u = h
        for r, power in zip(ranks, powers, strict=True):
            u = np.maximum(u, r**power)
        return u

    def apply(self, vectors: np.ndarray, probs: np.ndarray) -> np.ndarray:
        """H's probabilities (B, 4) with P(in_distribution) from the guard's novelty; the rest
        shared out as H shares it."""
        z = self.intercept + self.slope * _logit(1.0 - self.novelty(vectors, probs))
        in_distribution = 1.0 / (1.0 + np.exp(-z))
        rest = probs[:, 1:].astype(np.float64)
        total = rest.sum(1, keepdims=True)
        # Where H left nothing to share, the guard's novelty is out-of-distribution.
        share = np.where(total > 1e-12, rest / np.maximum(total, 1e-300), [[1.0, 0.0, 0.0]])
        rest = share * (1.0 - in_distribution)[:, None]
        return np.column_stack([in_distribution, rest])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> NoveltyGuard:
        return cls(**values)
