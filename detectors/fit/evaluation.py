"""An evaluation of H that a skeptical reader can check: held-out data, peers, unseen kinds.

For every challenge kind (each OOD set, each corruption type at each level, each attack at each
strength) the task "challenge vs clean" is scored by AUROC, FPR at 95% TPR and detection
accuracy, for H (score 1 − P(in_distribution)) and for the peers on the same model and the same
images: MSP, ODIN, Energy, Mahalanobis, KNN, ViM and GradNorm from pytorch-ood. The 4-way
verdict is scored by a confusion matrix and macro-F1. Generalization is measured by leaving
one OOD set / corruption type / attack out of H's training and testing on it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from detectors.detector import fit as fit_h
from detectors.fit.challenge.dataset import FAMILIES
from detectors.fit.prepared import PreparedData, vectors
from detectors.signals import SignalFeaturizer

PEERS = ("MSP", "ODIN", "Energy", "Mahalanobis", "KNN", "ViM", "GradNorm")


def auroc(negatives: np.ndarray, positives: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    truth = np.r_[np.zeros(len(negatives)), np.ones(len(positives))]
    return float(roc_auc_score(truth, np.r_[negatives, positives]))


def fpr_at_95_tpr(negatives: np.ndarray, positives: np.ndarray) -> float:
    threshold = np.percentile(positives, 5)  # 95% of positives score at least this
    return float((negatives >= threshold).mean())


def detection_accuracy(negatives: np.ndarray, positives: np.ndarray) -> float:
    """max over thresholds of (TPR + TNR) / 2."""
    thresholds = np.unique(np.r_[negatives, positives])
    neg, pos = np.sort(negatives), np.sort(positives)
    tnr = np.searchsorted(neg, thresholds, side="left") / len(neg)
    tpr = 1 - np.searchsorted(pos, thresholds, side="left") / len(pos)
    return float(((tpr + tnr) / 2).max())


def kind_group(kind: str) -> str:
    """'corrupted:snow:3' → 'corrupted:snow', 'adversarial:pgd:0.1' → 'adversarial:pgd'."""
    parts = kind.split(":")
    return ":".join(parts[:2])


@dataclass
class Scores:
    """Per-image 'challenge' scores (higher = more novel) of each method on the test split."""

    by_method: dict[str, np.ndarray] = field(default_factory=dict)


class _Penultimate(nn.Module):
    """The classifier up to the input of its last layer (the peers' feature space)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        from detectors.gradients import parameterized_layers

        self.model = model
        self.last = parameterized_layers(model)[-1][1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        captured: list[torch.Tensor] = []
        handle = self.last.register_forward_hook(lambda _m, i, _o: captured.append(i[0]))
        try:
            self.model(x)
        finally:
            handle.remove()
        return captured[0].flatten(1)


def peer_scores(
    model: nn.Module,
    data: PreparedData,
    progress: bool = True,
    reference: tuple[np.ndarray, np.ndarray] | None = None,
) -> Scores:
    """The peers' novelty scores on the test split, fitted on clean training images:
    ``reference`` (images, labels), by default the 60,000 Fashion-MNIST training images."""
    from pytorch_ood.detector import (
        KNN,
        ODIN,
        EnergyBased,
        Mahalanobis,
        MaxSoftmax,
        ViM,
    )
    from tqdm import tqdm

    from detectors.fit.fashion_mnist import load_fashion_mnist, to_float
    from detectors.signals import embed

    model = model.eval()
    if reference is None:
        train = load_fashion_mnist("train")
        reference = (to_float(train.images), train.labels)
    _, train_embeddings = embed(model, reference[0])
    z_train, y_train = torch.from_numpy(train_embeddings), torch.from_numpy(reference[1])
    test = data.signals["test"]
    z_test = torch.from_numpy(test.embeddings)
    last = _Penultimate(model).last
    out: dict[str, np.ndarray] = {}
    out["Mahalanobis"] = Mahalanobis(None).fit_features(z_train, y_train).predict_features(z_test)
    out["KNN"] = KNN(None, k=50).fit_features(z_train, y_train).predict_features(z_test)
    bias = last.bias.detach() if last.bias is not None else torch.zeros(last.weight.shape[0])
    vim = ViM(None, d=min(64, z_train.shape[1] // 2), w=last.weight.detach(), b=bias)
    out["ViM"] = vim.fit_features(z_train, y_train).predict_features(z_test)
    images = torch.from_numpy(data.splits["test"].images)
    image_peers: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "MSP": MaxSoftmax(model).predict,
        "Energy": EnergyBased(model).predict,
        "ODIN": ODIN(model, eps=0.002, temperature=1000.0).predict,
        "GradNorm": _gradnorm(model, last).predict,
    }
    for name, predict in tqdm(
        image_peers.items(), desc="peers", disable=not progress, file=sys.stderr
    ):
        parts = []
        for start in range(0, len(images), 500):
            with torch.enable_grad():
                parts.append(predict(images[start : start + 500]).detach())
        out[name] = torch.cat(parts)
    return Scores({k: np.asarray(v, dtype=np.float64).reshape(-1) for k, v in out.items()})


# Above this many parameters, per-sample gradients of all of them (pytorch-ood's default)
# cost tens of bytes per parameter and image and a full backward per image: GradNorm then
# takes the final layer's weights only, as its paper does.
_GRADNORM_ALL_PARAMETERS_UP_TO = 750_000


def _gradnorm(model: nn.Module, last: nn.Module) -> object:
    from pytorch_ood.detector import GradNorm

    parameters = sum(p.numel() for p in model.parameters())
    if parameters <= _GRADNORM_ALL_PARAMETERS_UP_TO:
        return GradNorm(model)
    names = {f"{n}.weight" for n, m in model.named_modules() if m is last}
    return GradNorm(model, param_filter=lambda name: name in names)


def h_scores(probs: np.ndarray) -> np.ndarray:
    """H's challenge score: 1 − P(in_distribution)."""
    return 1.0 - probs[:, FAMILIES.index("in_distribution")]


def per_kind_metrics(
    kinds: np.ndarray, scores: dict[str, np.ndarray], by: Callable[[str], str]
) -> dict[str, dict[str, dict[str, float]]]:
    """{kind: {method: {auroc, fpr95, detection_accuracy}}} for each kind vs clean."""
    clean = kinds == "clean"
    table: dict[str, dict[str, dict[str, float]]] = {}
    groups = sorted({by(k) for k in kinds if k != "clean"})
    for group in groups:
        mask = np.array([by(k) == group for k in kinds])
        table[group] = {}
        for method, s in scores.items():
            neg, pos = s[clean], s[mask]
            table[group][method] = {
                "auroc": auroc(neg, pos),
                "fpr95": fpr_at_95_tpr(neg, pos),
                "detection_accuracy": detection_accuracy(neg, pos),
            }
    return table


def family_of(kind: str) -> str:
    return {"ood": "ood", "corrupted": "corrupted", "adversarial": "adversarial"}[
        kind.split(":")[0]
    ]


def signal_columns(featurizer: SignalFeaturizer, data: PreparedData) -> list[str]:
    """The names of H's input columns for this data (layers numbered, not named)."""
    _, n_classes, n_layers = data.signals["train"].features.shape
    return featurizer.column_names(n_classes, [f"layer{i}" for i in range(n_layers)])


def leave_one_out(
    data: PreparedData, featurizer: SignalFeaturizer, progress: bool = True, guard: bool = False
) -> dict[str, float]:
    """AUROC (vs clean) on each held-out kind, for an H (on ``featurizer``'s signals, with the
    novelty guard when ``guard``) trained and calibrated without that kind."""
    from tqdm import tqdm

    columns = signal_columns(featurizer, data)
    x = {
        s: vectors(featurizer, data.signals[s], data.splits[s].images)
        for s in ("train", "val", "test")
    }
    y = {s: data.splits[s].family for s in ("train", "val", "test")}
    kinds = {s: np.array([kind_group(k) for k in data.splits[s].kind]) for s in x}
    groups = sorted({k for k in kinds["test"] if k != "clean"})
    results = {}
    for group in tqdm(groups, desc="leave-one-out", disable=not progress, file=sys.stderr):
        keep = {s: kinds[s] != group for s in ("train", "val")}
        trained = fit_h(
            featurizer,
            columns,
            x["train"][keep["train"]],
            y["train"][keep["train"]],
            x["val"][keep["val"]],
            y["val"][keep["val"]],
            guard=guard,
        )
        score = h_scores(trained.predict_proba_vectors(x["test"]))
        results[group] = auroc(score[kinds["test"] == "clean"], score[kinds["test"] == group])
    return results
