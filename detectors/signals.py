"""H's input vector: the gradient features, plus the peers' cheap signals from the same pass.

The core signal is the N × L matrix of log squared gradient norms, with each sample's labels
sorted by how much change they ask for (the predicted class first), so that H learns the
*shape* of the response rather than which class an image happens to be. Beside it, optionally,
the signals the strongest peers use, all computed from the forward pass the features need
anyway: maximum softmax, energy (log-sum-exp of the logits), the top-two logit margin, cosine
distance to the k-th nearest training embedding (KNN) and the class-conditional Mahalanobis
distance. Image statistics enter only relative to the user's clean training images
(``image_relative``): ``portable_image_statistics`` (brightness and its spread, clipping,
sharpness, noise, colour, JPEG blockiness, the brightness of the image's outer frame) z-scored
against theirs, and (``image_layout``)
where the image puts its light and detail, cell by cell, against where theirs do; so nothing
assumes a background colour, a size or a channel count. ``stability``: how far the softmax moves
when the image is squeezed by a pixel-scale blur or median (``detectors.stability``), the trace
of perturbations tuned to cross a decision boundary (read by the novelty guard alone, see
``detectors.detector.GUARD_ONLY_COLUMNS``).
Which groups are used is part of the detector's manifest; the evaluation measures what each
adds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from detectors.stability import STABILITY_COLUMNS, stability_columns

GROUPS = (
    "gradients",
    "logits",
    "knn",
    "mahalanobis",
    "gradient_summary",
    "image_relative",
    "margin",
    "image_layout",
    "stability",
)
# The signals that need no images (the featurizer's default).
BASIC_GROUPS = ("gradients", "logits", "knn", "mahalanobis")
# For a user's classifier: nothing that assumes a background, a size or a class count.
PORTABLE_GROUPS = (
    "gradients",
    "gradient_summary",
    "logits",
    "margin",
    "knn",
    "mahalanobis",
    "image_relative",
    "image_layout",
    "stability",
)
EPS = 1e-30
LAYOUT_COLUMNS = (
    "layout_log_mean_z2",
    "layout_log_max_z",
    "layout_detail_log_mean_z2",
    "layout_detail_log_max_z",
)
# Cells per side of the layout maps (fewer for smaller images), and the smallest spread a cell
# is measured against: a cell that is the same in every clean image (a flat background) makes
# any change there stand out, but not infinitely.
_LAYOUT_CELLS = 8
_LAYOUT_MIN_STD = 0.01
RELATIVE_IMAGE_COLUMNS = (
    "rel_mean",
    "rel_std",
    "rel_q05",
    "rel_q50",
    "rel_q95",
    "rel_clipped_dark",
    "rel_clipped_bright",
    "rel_log_total_variation",
    "rel_log_laplacian_energy",
    "rel_log_noise",
    "rel_colourfulness",
    "rel_saturation",
    "rel_log_blockiness",
    "rel_frame_mean",
    "rel_frame_std",
)


def portable_image_statistics(images: np.ndarray) -> np.ndarray:
    """(B, len(RELATIVE_IMAGE_COLUMNS)) float64 statistics of images (B, C, H, W) in [0, 1]
    that hold for any size, channel count and background: brightness and its spread,
    clipping, sharpness, a robust noise level, colourfulness and saturation (0 for one
    channel), 8×8 block edges (JPEG), and the brightness of the outer frame (a band 1/14 of
    the short side wide) and its spread. They mean something only relative to the user's
    clean images: ``SignalFeaturizer`` turns them into z-scores against those."""
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"images must be (B, C, H, W), got shape {images.shape}")
    # In chunks of about two million values: at 224 px a few hundred images in float64
    # (and their differences) would take gigabytes at once.
    step = max(1, _STATISTICS_CHUNK_VALUES // max(1, images[0].size))
    parts = [_portable_statistics(images[i : i + step]) for i in range(0, len(images), step)]
    return np.concatenate(parts) if parts else np.zeros((0, len(RELATIVE_IMAGE_COLUMNS)))


_STATISTICS_CHUNK_VALUES = 1 << 21


def _portable_statistics(images: np.ndarray) -> np.ndarray:
    x = np.asarray(images, dtype=np.float64)
    y = x.mean(1)
    flat = y.reshape(len(y), -1)
    dx, dy = np.abs(np.diff(y, axis=2)), np.abs(np.diff(y, axis=1))
    total_variation = dx.mean((1, 2)) + dy.mean((1, 2))
    laplacian = (
        4 * y[:, 1:-1, 1:-1] - y[:, :-2, 1:-1] - y[:, 2:, 1:-1] - y[:, 1:-1, :-2] - y[:, 1:-1, 2:]
    )
    flat_laplacian = np.abs(laplacian.reshape(len(y), -1))
    noise = np.median(flat_laplacian, axis=1) / 0.6745 / np.sqrt(20.0)  # σ of white noise
    if x.shape[1] == 3:
        r, g, b = x[:, 0], x[:, 1], x[:, 2]
        rg, yb = (r - g).reshape(len(x), -1), (0.5 * (r + g) - b).reshape(len(x), -1)
        colourfulness = np.hypot(rg.std(1), yb.std(1)) + 0.3 * np.hypot(rg.mean(1), yb.mean(1))
        high, low = x.max(1), x.min(1)
        saturation = ((high - low) / (high + 1e-3)).reshape(len(x), -1).mean(1)
    else:
        colourfulness = saturation = np.zeros(len(x))
    if y.shape[2] >= 16:
        at_edges = dx[:, :, 7::8].mean((1, 2))
        blockiness = np.log((at_edges + 1e-4) / (dx.mean((1, 2)) + 1e-4))
    else:
        blockiness = np.zeros(len(x))
    quantiles = np.percentile(flat, [5, 50, 95], axis=1).T
    # Where the user's images have a plain surround (a studio background, sky, a page), its
    # brightness is steady and anything else is far from it; where the surround varies, the
    # z-scores stay small.
    band = max(1, min(y.shape[1], y.shape[2]) // 14)
    edges = (y[:, :band], y[:, -band:], y[:, band:-band, :band], y[:, band:-band, -band:])
    frame = np.concatenate([e.reshape(len(y), -1) for e in edges], axis=1)
    return np.column_stack(
        [
            flat.mean(1),
            flat.std(1),
            quantiles,
            (flat < 0.02).mean(1),
            (flat > 0.98).mean(1),
            np.log(total_variation + 1e-6),
            np.log((laplacian**2).mean((1, 2)) + 1e-8),
            np.log(noise + 1e-5),
            colourfulness,
            saturation,
            blockiness,
            frame.mean(1),
            frame.std(1),
        ]
    )


def layout_maps(images: np.ndarray) -> np.ndarray:
    """(B, 2, C, G, G) float64: each image's mean brightness and mean local detail (absolute
    differences to the right and below) per cell of a G×G grid, G = min(8, H, W). Where the
    user's clean images put their light and their detail: ``image_layout`` compares an image's
    maps cell by cell with theirs."""
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"images must be (B, C, H, W), got shape {images.shape}")
    # In chunks, as the statistics: float64 copies of a 224 px split would take gigabytes.
    step = max(1, _STATISTICS_CHUNK_VALUES // max(1, images[0].size))
    return np.concatenate([_layout_maps(images[i : i + step]) for i in range(0, len(images), step)])


def _layout_maps(images: np.ndarray) -> np.ndarray:
    x = np.asarray(images, dtype=np.float64)
    h, w = x.shape[2:]
    detail = np.zeros_like(x)
    detail[..., :, :-1] += np.abs(np.diff(x, axis=3))
    detail[..., :-1, :] += np.abs(np.diff(x, axis=2))
    cells = min(_LAYOUT_CELLS, h, w)
    rows = np.linspace(0, h, cells + 1).round().astype(int)
    cols = np.linspace(0, w, cells + 1).round().astype(int)

    def pooled(values: np.ndarray) -> np.ndarray:
        # Sums over row bands, then column bands: any size, cells of nearly equal area.
        bands = np.add.reduceat(values, rows[:-1], axis=2)
        summed = np.add.reduceat(bands, cols[:-1], axis=3)
        area = np.outer(np.diff(rows), np.diff(cols))
        return summed / area

    return np.stack([pooled(x), pooled(detail)], axis=1)


@dataclass
class SignalFeaturizer:
    """Fitted state for the distance signals; ``fit`` on clean training embeddings first."""

    groups: tuple[str, ...] = BASIC_GROUPS
    knn_k: int = 10
    bank: np.ndarray | None = None  # (M, D) L2-normalized training embeddings
    class_means: np.ndarray | None = None  # (N, D)
    precision: np.ndarray | None = None  # (D, D) inverse of the shared covariance
    # Ranked gradient columns kept per layer: None keeps all N labels; with many classes the
    # first few ranks (the most plausible labels) and ``gradient_summary`` carry the signal.
    max_ranks: int | None = None
    # ``image_relative``: the clean images' statistics (mean, std per column; precision of
    # their z-scores), the reference every image is measured against.
    image_mean: np.ndarray | None = None
    image_std: np.ndarray | None = None
    image_precision: np.ndarray | None = None
    layout_mean: np.ndarray | None = None  # (2, C, G, G) over the clean training images
    layout_std: np.ndarray | None = None

    def fit(
        self,
        embeddings: np.ndarray,
        labels: np.ndarray,
        bank_size: int = 5_000,
        seed: int = 0,
        images: np.ndarray | None = None,
    ) -> SignalFeaturizer:
        """Fit on clean training embeddings. ``bank_size`` training embeddings (a random
        subset) are the KNN's neighbours: at one image per call the KNN reads the whole bank,
        so its size sets the call's cost (20,000 × 128 floats took 0.7 ms of a 3.7 ms Assess;
        5,000 take a quarter, and KNN's distance needs only a sample of the data)."""
        unknown = set(self.groups) - set(GROUPS)
        if unknown:
            raise ValueError(f"unknown signal groups {sorted(unknown)}; choose from {GROUPS}")
        embeddings = embeddings.astype(np.float64)
        pick = np.random.default_rng(seed).permutation(len(embeddings))[:bank_size]
        self.bank = _normalize(embeddings[pick]).astype(np.float32)
        classes = np.unique(labels)
        self.class_means = np.stack([embeddings[labels == c].mean(0) for c in classes])
        centered = embeddings - self.class_means[np.searchsorted(classes, labels)]
        covariance = centered.T @ centered / len(embeddings)
        self.precision = np.linalg.pinv(covariance + 1e-6 * np.eye(len(covariance)))
        self.class_means = self.class_means.astype(np.float32)
        self.precision = self.precision.astype(np.float32)
        if "image_relative" in self.groups:
            if images is None:
                raise ValueError("image_relative needs the clean training images: pass images")
            self._fit_image_reference(images)
        if "image_layout" in self.groups:
            if images is None:
                raise ValueError("image_layout needs the clean training images: pass images")
            maps = layout_maps(images)
            self.layout_mean = maps.mean(0)
            self.layout_std = np.maximum(maps.std(0), _LAYOUT_MIN_STD)
        return self

    def _fit_image_reference(self, images: np.ndarray) -> None:
        from sklearn.covariance import LedoitWolf

        stats = portable_image_statistics(images)
        self.image_mean = stats.mean(0)
        std = stats.std(0)
        self.image_std = np.where(std > 1e-8, std, 1.0)
        z = (stats - self.image_mean) / self.image_std
        self.image_precision = LedoitWolf().fit(z).precision_

    def relative_image_columns(self, images: np.ndarray) -> np.ndarray:
        """z-scores of the image statistics against the clean images, and the log
        Mahalanobis distance of the whole vector from them."""
        if self.image_mean is None or self.image_std is None or self.image_precision is None:
            raise RuntimeError("this featurizer was fitted without clean images")
        # A featurizer fitted before later statistics were added reads the ones it knows.
        stats = portable_image_statistics(images)[:, : len(self.image_mean)]
        z = (stats - self.image_mean) / self.image_std
        distance = ((z @ self.image_precision) * z).sum(1)
        return np.column_stack([z, np.log(distance + 1e-6)])

    def layout_columns(self, images: np.ndarray) -> np.ndarray:
        """How far each image's brightness and detail maps lie from the clean images', cell
        by cell (z-scores): log of the mean square and of the largest, per map. A smudge, a
        snowflake or a patch moves a few cells far; exposure or haze moves all a little."""
        if self.layout_mean is None or self.layout_std is None:
            raise RuntimeError("this featurizer was fitted without clean images")
        z = (layout_maps(images) - self.layout_mean) / self.layout_std
        z2 = (z**2).reshape(len(z), 2, -1)
        return np.column_stack(
            [
                np.log(z2[:, 0].mean(1) + 1e-6),
                0.5 * np.log(z2[:, 0].max(1) + 1e-6),
                np.log(z2[:, 1].mean(1) + 1e-6),
                0.5 * np.log(z2[:, 1].max(1) + 1e-6),
            ]
        )

    def column_names(self, n_classes: int, layers: list[str]) -> list[str]:
        names: list[str] = []
        if "gradients" in self.groups:
            ranks = range(self._ranks(n_classes))
            names += [f"log_grad[rank{r}][{layer}]" for r in ranks for layer in layers]
        if "gradient_summary" in self.groups:
            names += [f"log_grad_{s}[{layer}]" for s in ("mean", "std", "max") for layer in layers]
        if "logits" in self.groups:
            names += ["msp", "energy", "max_logit"]
        if "margin" in self.groups:
            names += ["logit_margin"]
        if "knn" in self.groups:
            names += [f"knn{self.knn_k}_cosine_distance"]
        if "mahalanobis" in self.groups:
            names += ["mahalanobis_min"]
        if "image_relative" in self.groups:
            known = len(RELATIVE_IMAGE_COLUMNS if self.image_mean is None else self.image_mean)
            names += [*RELATIVE_IMAGE_COLUMNS[:known], "rel_image_distance"]
        if "image_layout" in self.groups:
            names += list(LAYOUT_COLUMNS)
        if "stability" in self.groups:
            names += list(STABILITY_COLUMNS)
        return names

    def transform(
        self,
        features: np.ndarray,
        logits: np.ndarray,
        embeddings: np.ndarray,
        images: np.ndarray | None = None,
        squeezed_logits: np.ndarray | None = None,
    ) -> np.ndarray:
        """(B, d) float32 from features (B, N, L), logits (B, N), embeddings (B, D) and, for
        the image groups, the images (B, C, H, W) the signals were computed from; for the
        ``stability`` group, the logits of their squeezed views (B, K, N)."""
        columns = []
        log_grad = np.log(features.astype(np.float64) + EPS)
        if "gradients" in self.groups:
            order = np.argsort(log_grad.sum(-1), axis=1)  # labels by total change asked for
            order = order[:, : self._ranks(features.shape[1])]
            ranked = np.take_along_axis(log_grad, order[:, :, None], axis=1)
            columns.append(ranked.reshape(len(features), -1))
        if "gradient_summary" in self.groups:
            stats = (log_grad.mean(1), log_grad.std(1), log_grad.max(1))
            columns.append(np.concatenate(stats, axis=1))
        if "logits" in self.groups:
            z = logits.astype(np.float64)
            top = z.max(1, keepdims=True)
            lse = top[:, 0] + np.log(np.exp(z - top).sum(1))
            columns.append(np.stack([np.exp(top[:, 0] - lse), lse, top[:, 0]], axis=1))
        if "margin" in self.groups:
            # Top logit minus the runner-up: attacks that stop just past the decision boundary
            # (C&W, DeepFool, minimal-budget PGD) leave it near zero, whatever their pixels.
            z = logits.astype(np.float64)
            if z.shape[1] < 2:
                columns.append(np.zeros((len(z), 1)))
            else:
                top2 = -np.partition(-z, 1, axis=1)[:, :2]
                columns.append((top2[:, 0] - top2[:, 1])[:, None])
        if "knn" in self.groups or "mahalanobis" in self.groups:
            self._check_fitted()
        if "knn" in self.groups:
            similarity = _normalize(embeddings.astype(np.float32)) @ self.bank.T
            kth = -np.partition(-similarity, self.knn_k - 1, axis=1)[:, self.knn_k - 1]
            columns.append((1.0 - kth)[:, None])
        if "mahalanobis" in self.groups:
            diff = embeddings[:, None, :].astype(np.float32) - self.class_means[None]
            # (diff P) * diff summed: a BLAS product; the equivalent einsum is ~20x slower.
            distances = ((diff @ self.precision) * diff).sum(-1)
            columns.append(np.log(distances.min(1) + 1e-6)[:, None])
        if "image_relative" in self.groups:
            if images is None or len(images) != len(features):
                raise ValueError("this featurizer measures the images: pass one per row")
            columns.append(self.relative_image_columns(images))
        if "image_layout" in self.groups:
            if images is None or len(images) != len(features):
                raise ValueError("this featurizer measures the images: pass one per row")
            columns.append(self.layout_columns(images))
        if "stability" in self.groups:
            if squeezed_logits is None or len(squeezed_logits) != len(features):
                raise ValueError(
                    "this featurizer uses the stability signals: compute the signals with "
                    "GradientFeatures(model, squeeze=True)"
                )
            columns.append(stability_columns(logits, squeezed_logits))
        return np.concatenate(columns, axis=1).astype(np.float32)

    @property
    def needs_squeezed_logits(self) -> bool:
        """Whether ``transform`` needs the squeezed views' logits (the stability group)."""
        return "stability" in self.groups

    def _ranks(self, n_classes: int) -> int:
        return n_classes if self.max_ranks is None else min(n_classes, self.max_ranks)

    def transform_signals(self, signals: object, images: np.ndarray | None = None) -> np.ndarray:
        """From ``GradientSignals`` (tensors) directly, and the images they were computed from."""
        names = ("features", "logits", "embeddings", "squeezed_logits")
        tensors = {k: getattr(signals, k, None) for k in names}
        as_np = {k: None if t is None else t.detach().cpu().numpy() for k, t in tensors.items()}
        return self.transform(
            as_np["features"],
            as_np["logits"],
            as_np["embeddings"],
            images,
            as_np["squeezed_logits"],
        )

    def save(self, path: Path) -> None:
        self._check_fitted()
        np.savez(
            path,
            groups=np.array(self.groups),
            knn_k=np.array(self.knn_k),
            bank=self.bank,
            class_means=self.class_means,
            precision=self.precision,
            max_ranks=np.array(-1 if self.max_ranks is None else self.max_ranks),
            **{
                name: getattr(self, name)
                for name in (
                    "image_mean",
                    "image_std",
                    "image_precision",
                    "layout_mean",
                    "layout_std",
                )
                if getattr(self, name) is not None
            },
        )

    @classmethod
    def load(cls, path: Path) -> SignalFeaturizer:
        with np.load(path, allow_pickle=False) as data:
            groups = tuple(str(g) for g in data["groups"])
            unknown = sorted(set(groups) - set(GROUPS))
            if unknown:  # e.g. the absolute "image" statistics, which are gone
                raise ValueError(
                    f"{path} was fitted with signal groups {unknown} that this version no "
                    "longer computes: fit the detector again with `gradprobe fit`"
                )
            return cls(
                groups=groups,
                knn_k=int(data["knn_k"]),
                bank=data["bank"],
                class_means=data["class_means"],
                precision=data["precision"],
                max_ranks=_optional_int(data["max_ranks"]) if "max_ranks" in data else None,
                image_mean=data.get("image_mean", None),
                image_std=data.get("image_std", None),
                image_precision=data.get("image_precision", None),
                layout_mean=data.get("layout_mean", None),
                layout_std=data.get("layout_std", None),
            )

    def _check_fitted(self) -> None:
        if self.bank is None or self.class_means is None or self.precision is None:
            raise RuntimeError("SignalFeaturizer.fit must run before transform or save")


def _optional_int(value: np.ndarray) -> int | None:
    return None if int(value) < 0 else int(value)


def _normalize(x: np.ndarray) -> np.ndarray:
    return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-12)


@torch.no_grad()
def embed(
    model: torch.nn.Module, images: np.ndarray, batch: int = 1000
) -> tuple[np.ndarray, np.ndarray]:
    """Logits and last-layer inputs of a clean batch, without gradients (for ``fit``)."""
    from detectors.gradients import parameterized_layers

    last = parameterized_layers(model)[-1][1]
    captured: list[torch.Tensor] = []
    handle = last.register_forward_hook(lambda _m, inputs, _o: captured.append(inputs[0]))
    logits = []
    try:
        model.eval()
        for i in range(0, len(images), batch):
            logits.append(model(torch.from_numpy(images[i : i + batch])))
    finally:
        handle.remove()
    return torch.cat(logits).numpy(), torch.cat(captured).flatten(1).numpy()
