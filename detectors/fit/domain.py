"""Fitting: challenge data for the user's own domain, made from the user's clean images.

The user's images are split by source into train / val / test (no image crosses splits; a
``--val-data`` set, when given, supplies val and test instead). Each split gets:

* clean images (in_distribution);
* out-of-distribution sets that do not depend on any one data set, at the model's size and
  channels (``detectors.fit.challenge.ood.generic_ood``), plus the user's own ``--ood-data``;
* every corruption of ``detectors.fit.challenge.corruptions.ALL_CORRUPTIONS`` at five levels, scaled
  to the image size;
* adversarial examples against this classifier (FGSM, PGD, C&W-L2, Square, and minimal PGD),
  keeping only successful attacks on images it got right. L∞ budgets are scaled to the
  classifier: PGD is run on a sample at a grid of budgets, the smallest one that fools half of
  it is the middle level, with half and twice that beside it. Minimal PGD keeps, per image, the
  attack at the smallest budget of a grid that fools it, leaving saturated pixels as they are:
  adversarials just past the decision boundary, low in confidence, on the object only where the
  background is flat, as a careful attacker makes them (the fixed-budget attacks overshoot into
  confident mistakes and touch every pixel; H that knows both transfers to attacks it never
  saw).

Everything is cached per split under ``$GRADPROBE_HOME/fit/<key>``, keyed by the classifier,
the data, the recipe and this code, so an interrupted fit resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from detectors.fingerprint import code_fingerprint
from detectors.fit.challenge.dataset import FAMILIES, SPLITS, ChallengeSplit

EPS_GRID = (1 / 255, 2 / 255, 4 / 255, 8 / 255, 16 / 255, 32 / 255, 64 / 255)
SOURCE_SHARES = {"train": 0.6, "val": 0.15, "test": 0.25}


@dataclass(frozen=True)
class FitRecipe:
    """How much challenge data each split gets; everything else follows from the seed."""

    seed: int = 0
    clean: dict[str, int] = field(default_factory=lambda: {"train": 3000, "val": 800, "test": 1500})
    ood_per_set: dict[str, int] = field(
        default_factory=lambda: {"train": 400, "val": 80, "test": 250}
    )
    corrupted_per_variant: dict[str, int] = field(
        default_factory=lambda: {"train": 30, "val": 8, "test": 20}
    )
    adversarial_per_variant: dict[str, int] = field(
        default_factory=lambda: {"train": 120, "val": 25, "test": 80}
    )
    attacks: tuple[str, ...] = ("fgsm", "pgd", "pgd_min", "cw", "square")
    ood_sets: tuple[str, ...] | None = None  # None: every generic set
    corruptions: tuple[str, ...] | None = None  # None: every corruption

    @classmethod
    def quick(cls, seed: int = 0) -> FitRecipe:
        """A few images of every kind: for tests and trying the commands out (a minute)."""
        return cls(
            seed=seed,
            clean={"train": 200, "val": 60, "test": 80},
            ood_per_set={"train": 24, "val": 8, "test": 16},
            corrupted_per_variant={"train": 3, "val": 1, "test": 2},
            adversarial_per_variant={"train": 12, "val": 4, "test": 8},
            attacks=("fgsm", "pgd", "pgd_min"),
        )

    def scaled(self, factor: float) -> FitRecipe:
        """Every count times ``factor`` (at least 1): ``--budget`` on the command line."""

        def times(counts: dict[str, int]) -> dict[str, int]:
            return {k: max(1, round(v * factor)) for k, v in counts.items()}

        return replace(
            self,
            clean=times(self.clean),
            ood_per_set=times(self.ood_per_set),
            corrupted_per_variant=times(self.corrupted_per_variant),
            adversarial_per_variant=times(self.adversarial_per_variant),
        )


def split_sources(n: int, seed: int, has_val_data: bool) -> dict[str, np.ndarray]:
    """Disjoint indices of the training data per split (all of it for train when the user gave
    separate validation data, whose own split is ``split_val_sources``)."""
    order = np.random.default_rng([seed, 7]).permutation(n)
    if has_val_data:
        return {"train": np.sort(order)}
    bounds = np.cumsum([0] + [round(SOURCE_SHARES[s] * n) for s in SPLITS])
    bounds[-1] = n
    return {s: np.sort(order[bounds[i] : bounds[i + 1]]) for i, s in enumerate(SPLITS)}


def split_val_sources(n: int, seed: int) -> dict[str, np.ndarray]:
    order = np.random.default_rng([seed, 8]).permutation(n)
    half = n * SOURCE_SHARES["val"] // (SOURCE_SHARES["val"] + SOURCE_SHARES["test"])
    return {"val": np.sort(order[: int(half)]), "test": np.sort(order[int(half) :])}


@dataclass
class Sources:
    """The clean images each split draws from, with their labels."""

    images: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]


def cache_key(classifier_sha256: str, data_digest: str, recipe: FitRecipe) -> str:
    from detectors.fit import challenge

    code = code_fingerprint(
        [*Path(challenge.__file__).parent.glob("*.py"), Path(__file__)],
    )
    blob = json.dumps(
        {
            "classifier": classifier_sha256,
            "data": data_digest,
            "recipe": asdict(recipe),
            "code": code,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def scaled_eps(
    model: torch.nn.Module, images: np.ndarray, labels: np.ndarray, seed: int
) -> tuple[float, ...]:
    """L∞ budgets for this classifier: (m/2, m, 2m) with m the smallest budget of ``EPS_GRID``
    at which PGD fools half of a sample of correctly classified images."""
    from detectors.fit.challenge.adversarial import attack

    pick = np.random.default_rng([seed, 9]).permutation(len(images))[:96]
    middle = EPS_GRID[-1]
    for eps in EPS_GRID:
        result = attack(model, images[pick], labels[pick], "pgd", eps, seed=seed)
        if result.n and result.success_rate >= 0.5:
            middle = eps
            break
    return (middle / 2, middle, min(2 * middle, 0.5))


MINIMAL = "pgd_min"


def _masked_pgd(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, seed: int
) -> torch.Tensor:
    """L∞ PGD (10 steps of eps/4, random start) that leaves saturated pixels (exactly 0 or
    1) as they are, as attacks in tanh space (C&W) do: on a flat black or white background
    the perturbation stays on the object."""
    import torch.nn.functional as F

    generator = torch.Generator(device=x.device).manual_seed(seed)
    mask = ((x > 0) & (x < 1)).to(x.dtype)
    delta = (torch.rand(x.shape, generator=generator, device=x.device) * 2 - 1) * eps * mask
    for _ in range(10):
        delta.requires_grad_(True)
        with torch.enable_grad():
            loss = F.cross_entropy(model((x + delta).clamp(0, 1)), y)
            (grad,) = torch.autograd.grad(loss, [delta])
        delta = ((delta + eps / 4 * grad.sign()).clamp(-eps, eps) * mask).detach()
        delta = (x + delta).clamp(0, 1) - x
    return (x + delta).clamp(0, 1)


def minimal_pgd(
    model: torch.nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    budgets: tuple[float, ...],
    seed: int,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Per image, masked PGD (``_masked_pgd``) at the smallest of ``budgets`` (ascending) that
    changes the prediction, for the images the model gets right.

    Returns the fooling images, their row indices into ``images`` and the share of correctly
    classified images fooled at some budget."""
    x_all = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    y_all = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    model = model.eval()
    with torch.no_grad():
        right = np.flatnonzero((model(x_all).argmax(1) == y_all).numpy())
    best: dict[int, np.ndarray] = {}
    for step, budget in enumerate(budgets):
        rows = np.array([i for i in right if i not in best], dtype=np.int64)
        if not len(rows):
            break
        adversarial = _masked_pgd(model, x_all[rows], y_all[rows], budget, seed * 100 + step)
        with torch.no_grad():
            fooled = (model(adversarial).argmax(1) != y_all[rows]).numpy()
        for k in np.flatnonzero(fooled):
            best[int(rows[k])] = adversarial[k].numpy()
    order = np.array(sorted(best), dtype=np.int64)
    found = np.stack([best[i] for i in order]) if len(order) else images[:0]
    return found, order, (len(order) / len(right) if len(right) else 0.0)


def build_split(
    model: torch.nn.Module,
    split: str,
    sources: Sources,
    recipe: FitRecipe,
    eps_levels: tuple[float, ...],
    user_ood: dict[str, np.ndarray],
    progress: bool = True,
) -> ChallengeSplit:
    """One split's images with their family, kind and source index."""
    from tqdm import tqdm

    from detectors.fit.challenge.adversarial import ATTACKS, attack
    from detectors.fit.challenge.corruptions import ALL_CORRUPTIONS, SEVERITIES, corrupt
    from detectors.fit.challenge.ood import GENERIC_OOD_SETS, generic_ood

    rng = np.random.default_rng([recipe.seed, SPLITS.index(split), 11])
    pool, pool_labels = sources.images[split], sources.labels[split]
    shape = tuple(pool.shape[1:])
    images, family, kind, source = [], [], [], []
    success: dict[str, float] = {}

    def add(x: np.ndarray, fam: str, name: str, src: np.ndarray) -> None:
        images.append(np.asarray(x, dtype=np.float32).reshape(-1, *shape))
        family.append(np.full(len(x), FAMILIES.index(fam)))
        kind.append(np.full(len(x), name))
        source.append(np.asarray(src, dtype=np.int64))

    def draw(n: int) -> np.ndarray:
        return rng.choice(len(pool), size=min(n, len(pool)), replace=False)

    clean = draw(recipe.clean[split])
    add(pool[clean], "in_distribution", "clean", clean)

    split_id = SPLITS.index(split)
    for name in recipe.ood_sets or GENERIC_OOD_SETS:
        n = recipe.ood_per_set[split]
        x = generic_ood(name, n, shape, seed=recipe.seed * 100 + split_id)
        add(x, "ood", f"ood:{name}", np.full(len(x), -1))
    for name, x in user_ood.items():
        add(x, "ood", f"ood:{name}", np.full(len(x), -1))

    variants = [(k, s) for k in recipe.corruptions or ALL_CORRUPTIONS for s in SEVERITIES]
    for i, (name, severity) in enumerate(
        tqdm(variants, desc=f"corruptions ({split})", disable=not progress, file=sys.stderr)
    ):
        src = draw(recipe.corrupted_per_variant[split])
        seed = recipe.seed * 1000 + i
        add(
            corrupt(pool[src], name, severity, seed=seed),
            "corrupted",
            f"corrupted:{name}:{severity}",
            src,
        )

    n = recipe.adversarial_per_variant[split]
    for name in recipe.attacks:
        if name == MINIMAL:
            src = draw(int(1.4 * n) + 8)
            budgets = tuple(eps_levels[1] * f for f in (0.125, 0.25, 0.5, 1.0, 2.0, 4.0))
            x, rows, rate = minimal_pgd(model, pool[src], pool_labels[src], budgets, recipe.seed)
            add(x[:n], "adversarial", f"adversarial:{MINIMAL}", src[rows[:n]])
            success[MINIMAL] = rate
            continue
        levels = ATTACKS[name].strengths if ATTACKS[name].norm != "Linf" else eps_levels
        for strength in levels:
            src = draw(int(1.4 * n) + 8)
            result = attack(
                model, pool[src], pool_labels[src], name, strength, seed=recipe.seed,
                progress=progress,
            )  # fmt: skip
            fooled = np.flatnonzero(result.success)[:n]
            label = f"{name}:{strength:.4g}"
            add(result.images[fooled], "adversarial", f"adversarial:{label}",
                src[result.indices[fooled]])  # fmt: skip
            success[label] = float(result.success_rate) if result.n else 0.0
    return ChallengeSplit(
        np.concatenate(images),
        np.concatenate(family),
        np.concatenate(kind),
        np.concatenate(source),
        success,
    )


def load_or_build_split(folder: Path, split: str, build: object) -> ChallengeSplit:
    """The cached split, or ``build()`` saved atomically first."""
    path = folder / f"{split}.npz"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        data = build()  # type: ignore[operator]
        tmp = folder / f".{split}.tmp.npz"
        data.save(tmp)
        tmp.rename(path)
    return ChallengeSplit.load(path)
