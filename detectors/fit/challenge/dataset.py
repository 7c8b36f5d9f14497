"""The labelled challenge set H is trained and evaluated on: its families and its splits.

Four families: clean images (in_distribution), out-of-distribution sets, corruptions at five
levels, and adversarial examples against the deployed classifier. Each split's images are made
from that split's own clean sources, so no source image crosses splits (see
``detectors.fit.domain``, which makes them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

FAMILIES = ("in_distribution", "ood", "corrupted", "adversarial")
SPLITS = ("train", "val", "test")


@dataclass
class ChallengeSplit:
    images: np.ndarray  # float32 (n, C, H, W) in [0, 1]
    family: np.ndarray  # int64 (n,), index into FAMILIES
    kind: np.ndarray  # str (n,): "clean", "ood:mnist", "corrupted:snow:3", "adversarial:pgd:0.1"
    source: np.ndarray  # int64 (n,): index of the clean source image, or -1 for OOD images
    attack_success: dict[str, float] = field(default_factory=dict)  # "pgd:0.1" → rate

    def __len__(self) -> int:
        return len(self.family)

    def save(self, path: Path) -> None:
        np.savez(
            path,
            images=self.images,
            family=self.family,
            kind=self.kind.astype(str),
            source=self.source,
            attack_names=np.array(list(self.attack_success), dtype=str),
            attack_success=np.array(list(self.attack_success.values()), dtype=float),
        )

    @classmethod
    def load(cls, path: Path) -> ChallengeSplit:
        with np.load(path, allow_pickle=False) as data:
            success = dict(
                zip(data["attack_names"].tolist(), data["attack_success"].tolist(), strict=True)
            )
            return cls(data["images"], data["family"], data["kind"], data["source"], success)

    def select(self, mask: np.ndarray) -> ChallengeSplit:
        return ChallengeSplit(
            self.images[mask],
            self.family[mask],
            self.kind[mask],
            self.source[mask],
            self.attack_success,
        )
