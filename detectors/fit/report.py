"""`gradprobe evaluate`: the detector report (markdown + PNG plots) on held-out data."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from detectors.fit.challenge.dataset import FAMILIES
from detectors.fit.evaluation import (
    PEERS,
    family_of,
    h_scores,
    kind_group,
    leave_one_out,
    peer_scores,
    per_kind_metrics,
    signal_columns,
)
from detectors.fit.prepared import PreparedData, vectors
from detectors.signals import PORTABLE_GROUPS, SignalFeaturizer

FeaturizerFactory = Callable[[tuple[str, ...]], SignalFeaturizer]

# Signal sets of H (no absolute image statistics: they would assume a background).
PORTABLE_ABLATION = [
    ("gradients", ("gradients", "gradient_summary")),
    ("gradients + logits", ("gradients", "gradient_summary", "logits", "margin")),
    (
        "gradients + logits + knn + mahalanobis",
        ("gradients", "gradient_summary", "logits", "margin", "knn", "mahalanobis"),
    ),
    (
        "all but stability (+ relative image statistics and layout)",
        tuple(g for g in PORTABLE_GROUPS if g != "stability"),
    ),
    ("all (+ stability under squeezing, read by the guard) = H", PORTABLE_GROUPS),
    (
        "gradients + relative image statistics and layout",
        ("gradients", "gradient_summary", "image_relative", "image_layout"),
    ),
    ("relative image statistics and layout only", ("image_relative", "image_layout")),
    (
        "peers' signals only (logits, margin, knn, mahalanobis)",
        ("logits", "margin", "knn", "mahalanobis"),
    ),
]


def _ablation(
    data: PreparedData,
    make_featurizer: FeaturizerFactory,
    sets: list[tuple[str, tuple[str, ...]]],
    progress: bool,
    guard: bool = False,
) -> list[tuple[str, dict]]:
    """What each signal group adds to the gradient features: H retrained per signal set."""
    from sklearn.metrics import f1_score

    from detectors.detector import fit as fit_h

    rows = []
    kinds = data.splits["test"].kind
    for name, groups in sets:
        featurizer = make_featurizer(groups)
        x = {
            s: vectors(featurizer, data.signals[s], data.splits[s].images)
            for s in ("train", "val", "test")
        }
        y = {s: data.splits[s].family for s in ("train", "val", "test")}
        columns = signal_columns(featurizer, data)
        trained = fit_h(
            featurizer, columns, x["train"], y["train"], x["val"], y["val"], guard=guard
        )
        probs = trained.predict_proba_vectors(x["test"])
        score = h_scores(probs)
        by_family = per_kind_metrics(kinds, {"H": score}, lambda k: k.split(":")[0])
        rows.append(
            (
                name,
                {
                    "macro_f1": float(f1_score(y["test"], probs.argmax(1), average="macro")),
                    **{
                        f: by_family[f]["H"]["auroc"] if f in by_family else float("nan")
                        for f in ("ood", "corrupted", "adversarial")
                    },
                },
            )
        )
        if progress:
            print(f"ablation {name}: {rows[-1][1]}", file=sys.stderr)
    return rows


def write_report(
    data: PreparedData,
    model: object,
    detector: object,
    out_dir: Path,
    progress: bool = True,
    leave_out: bool = True,
    *,
    reference: tuple[np.ndarray, np.ndarray],
    make_featurizer: FeaturizerFactory,
    intro: str,
    ablation_sets: list[tuple[str, tuple[str, ...]]] | None = None,
    caveat: str = "",
) -> Path:
    """Compute everything and write ``REPORT.md`` and the plots into ``out_dir``.

    ``reference`` is the clean training images and labels (peers and featurizers are fitted
    on them); ``make_featurizer`` builds a featurizer for a tuple of signal groups.
    """
    from sklearn.metrics import confusion_matrix, f1_score

    from detectors.detector import _softmax_t, expected_calibration_error

    out_dir.mkdir(parents=True, exist_ok=True)
    test = data.splits["test"]
    probs = detector.predict_proba_vectors(
        vectors(detector.featurizer, data.signals["test"], test.images)
    )
    peers = peer_scores(model, data, progress, reference=reference)
    scores = {"H": h_scores(probs), **peers.by_method}
    by_kind = per_kind_metrics(test.kind, scores, lambda k: k)
    by_group = per_kind_metrics(test.kind, scores, kind_group)
    by_family = per_kind_metrics(test.kind, scores, lambda k: k.split(":")[0])
    predicted = detector.verdict_indices(probs)
    matrix = confusion_matrix(test.family, predicted, labels=range(len(FAMILIES)))
    macro_f1 = float(f1_score(test.family, predicted, average="macro"))
    temperature = float(detector.manifest.temperature)
    # Undo the temperature (softmax(T · log p) inverts softmax(log p / T)) for the raw ECE.
    raw = _softmax_t(np.log(np.clip(probs, 1e-12, 1.0)), 1.0 / temperature)
    ece = expected_calibration_error(probs, test.family)
    ece_raw = expected_calibration_error(raw, test.family)
    groups = tuple(detector.featurizer.groups)
    guard = detector.guard is not None
    unseen = leave_one_out(data, make_featurizer(groups), progress, guard) if leave_out else {}
    sets = ablation_sets or PORTABLE_ABLATION
    ablation = _ablation(data, make_featurizer, sets, progress, guard)

    _plot_roc(test.kind, scores, out_dir / "roc_by_family.png")
    _plot_histograms(test.kind, scores["H"], out_dir / "h_score_histograms.png")
    _plot_confusion(matrix, out_dir / "confusion_matrix.png")

    methods = ["H", *PEERS]
    counts = ", ".join(f"{f}: {int((test.family == i).sum())}" for i, f in enumerate(FAMILIES))
    lines = [
        "# Detector H: held-out evaluation",
        "",
        intro,
        "",
        f"Test images: {len(test)} ({counts}).",
        "",
        "## By family",
        "",
        _table(by_family, methods),
        "",
        "## Seen vs unseen (leave one kind out of H's training)",
        "",
        "`H seen`: H trained on all kinds. `H unseen`: H trained without this OOD set / "
        "corruption type / attack, tested on it. `best peer`: the best of the seven peers "
        "on the same images (peers never see challenge data).",
        "",
        "| kind | H seen | H unseen | best peer | unseen − best peer |",
        "|---|---:|---:|---|---:|",
    ]
    shortfalls = []
    for group, row in by_group.items():
        peer, value = max(((p, row[p]["auroc"]) for p in PEERS), key=lambda t: t[1])
        u = unseen.get(group)
        lines.append(
            f"| {group} | {row['H']['auroc']:.4f} | "
            f"{'-' if u is None else f'{u:.4f}'} | {peer} {value:.4f} | "
            f"{'-' if u is None else f'{u - value:+.4f}'} |"
        )
        if u is not None and u < value:
            shortfalls.append(
                f"{group} by {value - u:.3f} AUROC (unseen {u:.3f}, {peer} {value:.3f})"
            )
    lines += [
        "",
        "**Where unseen H falls behind the best peer:** "
        + ("; ".join(shortfalls) if shortfalls else "nowhere in this list")
        + "."
        + caveat,
    ]
    lines += [
        "",
        "## 4-way verdict",
        "",
        f"Macro-F1 {macro_f1:.4f}, accuracy {(predicted == test.family).mean():.4f}. "
        f"Calibration: temperature {temperature:.3f} (fitted on the validation split), "
        f"expected calibration error {ece:.4f} ({ece_raw:.4f} before temperature scaling).",
        "",
        "| true \\ predicted | " + " | ".join(FAMILIES) + " |",
        "|---|" + "---:|" * len(FAMILIES),
    ]
    for i, fam in enumerate(FAMILIES):
        lines.append(f"| {fam} | " + " | ".join(str(v) for v in matrix[i]) + " |")
    lines += [
        "",
        "## What each signal adds (H retrained on each signal set)",
        "",
        "| signals | macro-F1 | OOD AUROC | corrupted AUROC | adversarial AUROC |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, row in ablation:
        lines.append(
            f"| {name} | {row['macro_f1']:.4f} | {row['ood']:.4f} | "
            f"{row['corrupted']:.4f} | {row['adversarial']:.4f} |"
        )
    lines += ["", "## Attack success rates (test split; only successful attacks are used)", ""]
    lines += ["| attack:strength | success rate |", "|---|---:|"]
    lines += [f"| {k} | {v:.1%} |" for k, v in test.attack_success.items()]
    lines += [
        "",
        "## Every kind (AUROC / FPR@95%TPR / detection accuracy)",
        "",
        "| kind | " + " | ".join(methods) + " |",
        "|---|" + "---:|" * len(methods),
    ]
    for kind, row in by_kind.items():
        cells = [
            f"{row[m]['auroc']:.3f} / {row[m]['fpr95']:.2f} / {row[m]['detection_accuracy']:.3f}"
            for m in methods
        ]
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "![ROC by family](roc_by_family.png)",
        "",
        "![H score histograms](h_score_histograms.png)",
        "",
        "![confusion matrix](confusion_matrix.png)",
        "",
    ]
    path = out_dir / "REPORT.md"
    path.write_text("\n".join(lines))
    return path


def _table(rows: dict, methods: list[str]) -> str:
    header = "| family | " + " | ".join(methods) + " |\n|---|" + "---:|" * len(methods)
    body = []
    for name, row in rows.items():
        best = max(row[m]["auroc"] for m in methods[1:])
        cells = [
            f"**{row[m]['auroc']:.4f}**"
            if m == "H" and row[m]["auroc"] >= best
            else f"{row[m]['auroc']:.4f}"
            for m in methods
        ]
        body.append(f"| {name} | " + " | ".join(cells) + " |")
    return header + "\n" + "\n".join(body)


def _plot_roc(kinds: np.ndarray, scores: dict[str, np.ndarray], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    clean = kinds == "clean"
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8))
    for ax, family in zip(axes, ("ood", "corrupted", "adversarial"), strict=True):
        mask = np.array([k != "clean" and family_of(k) == family for k in kinds])
        truth = np.r_[np.zeros(clean.sum()), np.ones(mask.sum())]
        for method, s in scores.items():
            fpr, tpr, _ = roc_curve(truth, np.r_[s[clean], s[mask]])
            ax.plot(fpr, tpr, linewidth=2.5 if method == "H" else 1, label=method)
        ax.plot([0, 1], [0, 1], ":", color="grey")
        ax.set_title(f"{family} vs clean")
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_histograms(kinds: np.ndarray, score: np.ndarray, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    bins = np.linspace(0, 1, 41)
    for family in ("clean", "ood", "corrupted", "adversarial"):
        mask = (
            kinds == "clean"
            if family == "clean"
            else np.array([k != "clean" and family_of(k) == family for k in kinds])
        )
        ax.hist(score[mask], bins=bins, histtype="step", linewidth=1.5, density=True, label=family)
    ax.set_yscale("log")
    ax.set_xlabel("H score: 1 − P(in_distribution)")
    ax.set_ylabel("density")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_confusion(matrix: np.ndarray, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.8))
    normalized = matrix / matrix.sum(1, keepdims=True)
    ax.imshow(normalized, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(FAMILIES)):
        for j in range(len(FAMILIES)):
            ax.text(
                j,
                i,
                f"{matrix[i, j]}\n{normalized[i, j]:.0%}",
                ha="center",
                va="center",
                color="white" if normalized[i, j] > 0.5 else "black",
                fontsize=8,
            )
    ax.set_xticks(range(len(FAMILIES)), FAMILIES, rotation=30)
    ax.set_yticks(range(len(FAMILIES)), FAMILIES)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
