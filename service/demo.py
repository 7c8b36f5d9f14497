"""The main job on the default deployment: what the gradient features see.

Clean Fashion-MNIST test images are compared with out-of-distribution digits, corrupted
images and adversarial images. For each set the report shows the classifier's confidence, the
median per-layer gradient norm, and how well one unsupervised score (log of the summed
gradient norms over all labels and layers) separates the set from clean data (AUROC).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from detectors.datasets import load_fashion_mnist, to_float
from detectors.gradients import GradientFeatures
from service.classifier import LoadedClassifier


@dataclass
class SetReport:
    name: str
    images: int
    mean_confidence: float
    accuracy: float | None
    layer_medians: np.ndarray
    scores: np.ndarray


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """One signed-gradient step of size ``eps`` (Goodfellow et al. 2015), clipped to [0, 1]."""
    x = x.clone().requires_grad_(True)
    with torch.enable_grad():
        loss = F.cross_entropy(model(x), y)
        (grad,) = torch.autograd.grad(loss, x)
    return (x + eps * grad.sign()).clamp_(0, 1).detach()


def challenge_sets(loaded: LoadedClassifier, per_set: int, seed: int = 0) -> dict:
    """name → (float32 images (n, 1, 28, 28), labels or None)."""
    from detectors.challenge.corruptions import corrupt
    from detectors.challenge.ood import mnist_digits

    rng = np.random.default_rng(seed)
    test = load_fashion_mnist("test")
    pick = rng.choice(len(test.labels), size=2 * per_set, replace=False)
    clean, spare = pick[:per_set], pick[per_set:]
    clean_x, clean_y = to_float(test.images[clean]), test.labels[clean]
    spare_x, spare_y = to_float(test.images[spare]), test.labels[spare]

    digits = mnist_digits(seed=seed)
    digits = digits[rng.choice(len(digits), size=per_set, replace=False)][:, None]
    noisy = corrupt(spare_x, "noise", 3, seed=seed)
    blurred = corrupt(spare_x, "gaussian_blur", 3, seed=seed)
    adversarial = fgsm(
        loaded.module, torch.from_numpy(spare_x), torch.from_numpy(spare_y), eps=0.1
    ).numpy()
    return {
        "clean (Fashion-MNIST test)": (clean_x, clean_y),
        "ood: MNIST digits": (digits.astype(np.float32), None),
        "corrupted: noise, level 3": (noisy, spare_y),
        "corrupted: gaussian blur, level 3": (blurred, spare_y),
        "adversarial: FGSM eps=0.1": (adversarial, spare_y),
    }


def assess_set(
    loaded: LoadedClassifier,
    engine: GradientFeatures,
    name: str,
    images: np.ndarray,
    labels: np.ndarray | None,
) -> SetReport:
    x = torch.from_numpy(images)
    with torch.no_grad():
        probs = torch.softmax(loaded.module(x), dim=-1).numpy()
    features = engine.compute(x).numpy()  # (B, N, L)
    per_layer = features.sum(axis=1)  # summed over labels
    return SetReport(
        name=name,
        images=len(images),
        mean_confidence=float(probs.max(1).mean()),
        accuracy=None if labels is None else float((probs.argmax(1) == labels).mean()),
        layer_medians=np.median(per_layer, axis=0),
        scores=np.log(features.sum(axis=(1, 2)) + 1e-12),
    )


def run_demo(
    loaded: LoadedClassifier, per_set: int = 200, plot: Path | None = None, quiet: bool = False
) -> int:
    from sklearn.metrics import roc_auc_score
    from tqdm import tqdm

    engine = GradientFeatures(loaded.module)
    sets = challenge_sets(loaded, per_set)
    reports = [
        assess_set(loaded, engine, name, images, labels)
        for name, (images, labels) in tqdm(
            sets.items(), desc="assessing", unit="set", disable=quiet, file=sys.stderr
        )
    ]
    clean = reports[0]
    print(f"classifier: {loaded.path} (test accuracy {loaded.manifest.test_accuracy:.2%})")
    print(f"features: {engine.layer_names} × {len(loaded.manifest.classes)} contrast labels")
    header = f"{'set':<36}{'n':>5}{'acc':>7}{'conf':>7}  "
    header += "".join(f"{name:>10}" for name in engine.layer_names) + f"{'AUROC':>8}"
    print("\nmedian squared gradient norm per layer (summed over labels), and AUROC of the")
    print("log total norm against the clean set (1.0 = fully separated, 0.5 = chance):")
    print(header)
    for report in reports:
        acc = "-" if report.accuracy is None else f"{report.accuracy:.0%}"
        if report is clean:
            auroc = "-"
        else:
            truth = np.r_[np.zeros(clean.images), np.ones(report.images)]
            auroc = f"{roc_auc_score(truth, np.r_[clean.scores, report.scores]):.3f}"
        row = f"{report.name:<36}{report.images:>5}{acc:>7}{report.mean_confidence:>7.2f}  "
        row += "".join(f"{v:>10.3g}" for v in report.layer_medians) + f"{auroc:>8}"
        print(row)
    if plot is not None:
        _plot(reports, plot)
        print(f"\nplot: {plot}")
    return 0


def _plot(reports: list[SetReport], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for report in reports:
        ax.hist(report.scores, bins=40, histtype="step", linewidth=1.5, label=report.name)
    ax.set_xlabel("log Σ squared gradient norms (all labels, all layers)")
    ax.set_ylabel("images")
    ax.set_title("Gradient features: clean vs novel inputs")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
