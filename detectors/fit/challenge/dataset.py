"""The labelled challenge set the detector H is trained and evaluated on.

Four families: clean Fashion-MNIST test images (in_distribution), out-of-distribution sets,
CURE-TSR-style corruptions at five levels, and adversarial examples against the deployed
classifier. Fashion-MNIST test images are split by source index into train / val / test, and
every corrupted or adversarial image of a split is made from that split's own images, so no
source image crosses splits. OOD sets are split likewise (MNIST by index, generated sets by
seed). The result is cached on disk, keyed by the recipe, the classifier's sha256 and the code
that makes the data.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from detectors.fit.fashion_mnist import load_fashion_mnist, to_float

FAMILIES = ("in_distribution", "ood", "corrupted", "adversarial")
SPLITS = ("train", "val", "test")
# Share of the 10,000 Fashion-MNIST test images that each split draws its sources from.
SOURCE_SHARES = {"train": 0.5, "val": 0.1, "test": 0.4}


@dataclass(frozen=True)
class ChallengeRecipe:
    """How many images of each kind each split gets; everything else follows from the seed."""

    seed: int = 0
    clean: dict[str, int] = field(default_factory=lambda: {"train": 3000, "val": 600, "test": 2000})
    ood_per_set: dict[str, int] = field(
        default_factory=lambda: {"train": 800, "val": 200, "test": 1000}
    )
    corrupted_per_variant: dict[str, int] = field(
        default_factory=lambda: {"train": 80, "val": 16, "test": 60}
    )
    # Attacks are the slow part (the black-box Square attack above all): a few minutes in all.
    adversarial_per_variant: dict[str, int] = field(
        default_factory=lambda: {"train": 100, "val": 20, "test": 80}
    )
    attacks: tuple[str, ...] = ("fgsm", "bim", "pgd", "cw", "square")

    def key(self, classifier_sha256: str) -> str:
        from detectors.fingerprint import code_fingerprint
        from detectors.fit import challenge

        code = code_fingerprint(Path(challenge.__file__).parent.glob("*.py"))
        blob = json.dumps(
            {"recipe": asdict(self), "classifier": classifier_sha256, "code": code},
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class ChallengeSplit:
    images: np.ndarray  # float32 (n, 1, 28, 28) in [0, 1]
    family: np.ndarray  # int64 (n,), index into FAMILIES
    kind: np.ndarray  # str (n,): "clean", "ood:mnist", "corrupted:snow:3", "adversarial:pgd:0.1"
    source: np.ndarray  # int64 (n,): Fashion-MNIST test index, or -1 for OOD images
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


def source_indices(seed: int) -> dict[str, np.ndarray]:
    """Disjoint Fashion-MNIST test indices per split."""
    order = np.random.default_rng(seed).permutation(10_000)
    bounds = np.cumsum([0] + [int(SOURCE_SHARES[s] * 10_000) for s in SPLITS])
    return {s: np.sort(order[bounds[i] : bounds[i + 1]]) for i, s in enumerate(SPLITS)}


def _ood_images(split: str, n: int, seed: int) -> dict[str, np.ndarray]:
    from detectors.fit.challenge.ood import font_letters, mnist_digits, natural_patches

    split_id = SPLITS.index(split)
    digits = mnist_digits(seed=seed)  # a seeded shuffle of the 5,000 digits
    low, high = {"train": (0, 2000), "val": (2000, 2500), "test": (2500, 5000)}[split]
    return {
        "mnist": digits[low : min(high, low + n)],
        "letters": font_letters(n, seed=seed * 10 + split_id),
        "natural": natural_patches(n, seed=seed * 10 + split_id),
    }


def build_split(
    model: torch.nn.Module, recipe: ChallengeRecipe, split: str, progress: bool = True
) -> ChallengeSplit:
    """Make one split from scratch (use ``load_challenge_split`` for the cached one)."""
    from tqdm import tqdm

    from detectors.fit.challenge.adversarial import ATTACKS, attack
    from detectors.fit.challenge.corruptions import CORRUPTIONS, SEVERITIES, corrupt

    rng = np.random.default_rng([recipe.seed, SPLITS.index(split)])
    test = load_fashion_mnist("test")
    sources = source_indices(recipe.seed)[split]
    images, family, kind, source = [], [], [], []
    success: dict[str, float] = {}

    def add(x: np.ndarray, fam: str, name: str, src: np.ndarray) -> None:
        images.append(x.reshape(-1, 1, 28, 28).astype(np.float32))
        family.append(np.full(len(x), FAMILIES.index(fam)))
        kind.append(np.full(len(x), name))
        source.append(src.astype(np.int64))

    clean = rng.choice(sources, size=recipe.clean[split], replace=False)
    add(to_float(test.images[clean]), "in_distribution", "clean", clean)

    for name, x in _ood_images(split, recipe.ood_per_set[split], recipe.seed).items():
        add(x, "ood", f"ood:{name}", np.full(len(x), -1))

    variants = [(k, s) for k in CORRUPTIONS for s in SEVERITIES]
    n = recipe.corrupted_per_variant[split]
    for i, (name, severity) in enumerate(
        tqdm(variants, desc=f"corruptions ({split})", disable=not progress, file=sys.stderr)
    ):
        src = rng.choice(sources, size=n, replace=False)
        x = corrupt(to_float(test.images[src]), name, severity, seed=recipe.seed * 1000 + i)
        add(x, "corrupted", f"corrupted:{name}:{severity}", src)

    n = recipe.adversarial_per_variant[split]
    for name in recipe.attacks:
        for strength in ATTACKS[name].strengths:
            # Attacks keep only images the clean model got right, and only a successful
            # attack (the prediction changed) is a silent error worth detecting: draw extra.
            src = rng.choice(sources, size=min(len(sources), int(1.3 * n) + 16), replace=False)
            result = attack(
                model,
                to_float(test.images[src]),
                test.labels[src],
                name,
                strength,
                seed=recipe.seed,
                progress=progress,
            )
            fooled = np.flatnonzero(result.adv_pred != result.clean_pred)[:n]
            label = f"{name}:{strength:g}"
            add(
                result.images[fooled],
                "adversarial",
                f"adversarial:{label}",
                src[result.indices[fooled]],
            )
            success[label] = float(result.success_rate)
    return ChallengeSplit(
        np.concatenate(images),
        np.concatenate(family),
        np.concatenate(kind),
        np.concatenate(source),
        success,
    )


def challenge_dir(classifier_sha256: str, recipe: ChallengeRecipe) -> Path:
    from detectors.model_dir import gradprobe_home

    return gradprobe_home() / "challenge" / recipe.key(classifier_sha256)


def load_challenge_split(
    model: torch.nn.Module,
    classifier_sha256: str,
    split: str,
    recipe: ChallengeRecipe | None = None,
    progress: bool = True,
) -> ChallengeSplit:
    """The cached split, built first if absent."""
    recipe = recipe or ChallengeRecipe()
    folder = challenge_dir(classifier_sha256, recipe)
    path = folder / f"{split}.npz"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        data = build_split(model, recipe, split, progress=progress)
        tmp = folder / f".{split}.tmp.npz"
        data.save(tmp)
        tmp.rename(path)
        (folder / "recipe.json").write_text(json.dumps(asdict(recipe), indent=2))
    return ChallengeSplit.load(path)
