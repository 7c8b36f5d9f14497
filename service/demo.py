"""The main job on the default deployment: the service answering real requests.

Clean Fashion-MNIST test images are compared with out-of-distribution digits, corrupted
images and adversarial images. First, what the gradient features see: for each set the
classifier's confidence, the median per-layer gradient norm, and how well one unsupervised
score (log of the summed gradient norms) separates the set from clean data (AUROC). Then the
gRPC service is started on loopback with the detector H, every set is sent to it through the
client, and its verdicts and the metrics endpoint are printed.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from detectors.fit.fashion_mnist import load_fashion_mnist, to_float
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


def challenge_sets(loaded: LoadedClassifier, per_set: int, seed: int = 0) -> dict:
    """name → (float32 images (n, 1, 28, 28), labels or None)."""
    from detectors.fit.challenge.corruptions import corrupt
    from detectors.fit.challenge.ood import mnist_digits

    rng = np.random.default_rng(seed)
    test = load_fashion_mnist("test")
    pick = rng.choice(len(test.labels), size=2 * per_set, replace=False)
    clean, spare = pick[:per_set], pick[per_set:]
    clean_x, clean_y = to_float(test.images[clean]), test.labels[clean]
    spare_x, spare_y = to_float(test.images[spare]), test.labels[spare]

    from detectors.fit.challenge.adversarial import attack

    digits = mnist_digits(seed=seed)
    digits = digits[rng.choice(len(digits), size=per_set, replace=False)][:, None]
    noisy = corrupt(spare_x, "noise", 3, seed=seed)
    snowy = corrupt(spare_x, "snow", 3, seed=seed)
    pgd = attack(loaded.module, spare_x, spare_y, "pgd", 0.1, seed=seed)
    return {
        "clean (Fashion-MNIST test)": (clean_x, clean_y),
        "ood: MNIST digits": (digits.astype(np.float32), None),
        "corrupted: noise, level 3": (noisy, spare_y),
        "corrupted: snow, level 3": (snowy, spare_y),
        "adversarial: PGD eps=0.1": (pgd.images, spare_y[pgd.indices]),
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
    header += "".join(f"{name:>10}" for name in engine.layer_names) + f"{'AUROC':>9}"
    print("\nmedian squared gradient norm per layer (summed over labels), and how well the log")
    print("total norm alone separates each set from the clean one: AUROC, 1.0 = fully, 0.5 =")
    print("chance; ↑ the set asks for larger gradients than clean data, ↓ smaller. H (below)")
    print("combines all layers and labels and learns which direction means what.")
    print(header)
    for report in reports:
        acc = "-" if report.accuracy is None else f"{report.accuracy:.0%}"
        if report is clean:
            auroc = "-"
        else:
            truth = np.r_[np.zeros(clean.images), np.ones(report.images)]
            value = roc_auc_score(truth, np.r_[clean.scores, report.scores])
            auroc = f"{max(value, 1 - value):.3f}{'↑' if value >= 0.5 else '↓'}"
        row = f"{report.name:<36}{report.images:>5}{acc:>7}{report.mean_confidence:>7.2f}  "
        row += "".join(f"{v:>10.3g}" for v in report.layer_medians) + f"{auroc:>9}"
        print(row)
    if plot is not None:
        _plot(reports, plot)
        print(f"\nplot: {plot}")
    _serve_and_send(loaded, sets, quiet=quiet)
    return 0


def _serve_and_send(loaded: LoadedClassifier, sets: dict, quiet: bool) -> None:
    """Start the gRPC service on loopback, send every set through the client, print verdicts."""
    import urllib.request

    from service.assessor import VERDICTS, Assessor
    from service.client import ReliabilityClient
    from service.registry import load_detector
    from service.server import ReliabilityServer
    from service.settings import Settings

    detector = load_detector(loaded)
    server = ReliabilityServer(Settings(port=0, metrics_port=0, quiet=True))
    server.start()
    try:
        server.load(Assessor(loaded, detector, device=str(next(loaded.module.parameters()).device)))
        print(
            f"\ngRPC service gradprobe.v1.Reliability on {server.target}; Prometheus "
            f"metrics on http://127.0.0.1:{server.metrics_port}/metrics"
        )
        print(f"detector H {detector.version} (sha256 {detector.sha256[:12]}…)")
        print(
            f"\nverdicts from the service (share of each set):\n{'set':<36}"
            + "".join(f"{v:>17}" for v in VERDICTS)
            + f"{'p50 ms':>9}"
        )
        sent = 0
        with ReliabilityClient(server.target) as client:
            for name, (images, _) in sets.items():
                sent += len(images)
                answers = []
                for start in range(0, len(images), 32):
                    answers += client.assess(images[start : start + 32])
                shares = [np.mean([a["verdict"] == v for a in answers]) for v in VERDICTS]
                latency = np.median([a["timings_ms"]["total"] for a in answers])
                print(f"{name:<36}" + "".join(f"{x:>17.0%}" for x in shares) + f"{latency:>9.1f}")
        url = f"http://127.0.0.1:{server.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            lines = response.read().decode().splitlines()
        totals = dict.fromkeys(VERDICTS, 0.0)
        for line in lines:
            if line.startswith("gradprobe_verdicts_total{"):
                verdict = line.split('verdict="', 1)[1].split('"', 1)[0]
                totals[verdict] += float(line.rsplit(" ", 1)[1])
        print(f"\nsent {sent} images; {url} counts, by verdict (gradprobe_verdicts_total):")
        print("  " + ", ".join(f"{v}: {n:g}" for v, n in totals.items()))
    finally:
        server.stop(grace=5)


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
