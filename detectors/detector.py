"""Detector H: signals → calibrated probabilities of the four verdicts, served with onnxruntime.

Training (``fit``) uses scikit-learn: a standardizing MLP over ``SignalFeaturizer`` vectors,
then temperature scaling of its log-probabilities on the validation split (one parameter,
fitted by minimizing the validation log-loss), so that the scores are calibrated. The fitted
pipeline is exported with skl2onnx; at run time only the ONNX graph, the featurizer's arrays
(``.npz``, never pickled) and a JSON manifest are read, and loading refuses a detector whose
manifest names another classifier.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from detectors.guard import NoveltyGuard
from detectors.signals import SignalFeaturizer
from detectors.stability import STABILITY_COLUMNS

# Signals only the guard reads. Feature squeezing, learnt by the MLP from the seen attacks,
# taught it that a softmax that moves under squeezing means "adversarial", and it then called
# unseen noise and smudges more normal; as a one-class tail in the guard it transfers.
GUARD_ONLY_COLUMNS = frozenset(STABILITY_COLUMNS)

VERDICTS = ("in_distribution", "ood", "corrupted", "adversarial")
ONNX_FILE = "detector.onnx"
FEATURIZER_FILE = "featurizer.npz"
MANIFEST_FILE = "detector.json"
FORMAT = "gradprobe.detector.v3"
# Formats this release reads. Each marks signals the releases before it cannot compute: v2 the
# image layout group, v3 the stability group (which needs the squeezed views' logits).
READABLE_FORMATS = ("gradprobe.detector.v1", "gradprobe.detector.v2", FORMAT)


class DetectorMismatch(RuntimeError):
    """The detector was trained for another classifier, or its files were altered."""


@dataclass
class DetectorManifest:
    format: str
    version: str
    classifier_sha256: str
    onnx_sha256: str
    featurizer_sha256: str
    verdicts: list[str]
    columns: list[str]
    groups: list[str]
    temperature: float
    hidden_layers: list[int]
    training_data: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    # The operating point: an image is in_distribution when P(in_distribution) reaches it
    # (chosen on validation data for a target false-positive rate); None: the most probable
    # verdict.
    threshold: float | None = None
    # The novelty guard's numbers (``detectors.guard``); None: H's probabilities as they are.
    guard: dict[str, Any] | None = None
    # Indices of the columns the MLP reads (the rest only the guard); None: every column.
    h_inputs: list[int] | None = None


def verdict_indices(probs: np.ndarray, threshold: float | None = None) -> np.ndarray:
    """Index into ``VERDICTS`` per row of calibrated probabilities (B, 4)."""
    if threshold is None:
        return probs.argmax(1)
    novel = probs[:, 1:].argmax(1) + 1  # the most probable of ood / corrupted / adversarial
    return np.where(probs[:, 0] >= threshold, 0, novel)


def threshold_for_fpr(clean_probs: np.ndarray, target_fpr: float) -> float:
    """The P(in_distribution) threshold that flags ``target_fpr`` of these clean images."""
    if not 0.0 < target_fpr < 1.0:
        raise ValueError(f"the target false-positive rate must be in (0, 1), got {target_fpr}")
    return float(np.quantile(clean_probs[:, 0], target_fpr))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _softmax_t(log_probs: np.ndarray, temperature: float) -> np.ndarray:
    z = log_probs / temperature
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def fit_temperature(probs: np.ndarray, labels: np.ndarray) -> float:
    """The temperature minimizing log-loss of softmax(log p / T) on held-out data."""
    log_p = np.log(np.clip(probs, 1e-12, 1.0))
    grid = np.exp(np.linspace(np.log(0.25), np.log(8.0), 200))
    losses = [
        -np.log(_softmax_t(log_p, t)[np.arange(len(labels)), labels] + 1e-12).mean() for t in grid
    ]
    return float(grid[int(np.argmin(losses))])


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    confidence, predicted = probs.max(1), probs.argmax(1)
    edges = np.linspace(0, 1, bins + 1)
    error = 0.0
    for lo, hi in itertools.pairwise(edges):
        inside = (confidence > lo) & (confidence <= hi)
        if inside.any():
            gap = abs((predicted[inside] == labels[inside]).mean() - confidence[inside].mean())
            error += inside.mean() * gap
    return float(error)


@dataclass
class TrainedH:
    """A fitted H before export: the sklearn pipeline, its temperature, its featurizer."""

    pipeline: Any
    temperature: float
    featurizer: SignalFeaturizer
    columns: list[str]
    guard: NoveltyGuard | None = None
    # Validation rows the guard did not see (for the operating point); None: all of them.
    holdout: np.ndarray | None = None
    h_inputs: list[int] | None = None  # the columns the pipeline reads; None: all

    def predict_proba_vectors(self, vectors: np.ndarray) -> np.ndarray:
        h_vectors = vectors if self.h_inputs is None else vectors[:, self.h_inputs]
        log_p = np.log(np.clip(self.pipeline.predict_proba(h_vectors), 1e-12, 1.0))
        probs = _softmax_t(log_p, self.temperature)
        return probs if self.guard is None else self.guard.apply(vectors, probs)


def fit(
    featurizer: SignalFeaturizer,
    columns: list[str],
    train_x: np.ndarray,
    train_y: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    hidden_layers: tuple[int, ...] = (256, 128),
    seed: int = 0,
    guard: bool = False,
) -> TrainedH:
    """Fit the pipeline on train, the temperature on val. Labels index ``VERDICTS``.
    With ``guard``, P(in_distribution) also answers to one-class signals among ``columns``
    (``detectors.guard``), fitted on val. Columns in ``GUARD_ONLY_COLUMNS`` are read by the
    guard alone: without the guard they are left out.

    Width and ``alpha`` were chosen on the validation split (macro-F1 and per-family AUROC);
    wider or deeper nets and smaller ``alpha`` did no better there.
    """
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.utils.class_weight import compute_sample_weight

    missing = set(range(len(VERDICTS))) - set(np.unique(train_y).tolist())
    if missing:
        raise ValueError(f"training data lacks verdicts {[VERDICTS[m] for m in missing]}")
    # Balance the families by weighting; resampling with replacement put copies of training
    # rows into the early-stopping split, which then stopped too late (val macro-F1 −0.008).
    weights = compute_sample_weight("balanced", train_y)
    h_inputs = [i for i, name in enumerate(columns) if name not in GUARD_ONLY_COLUMNS]
    pipeline = make_pipeline(
        StandardScaler(),
        MLPClassifier(
            hidden_layers,
            alpha=1e-2,
            batch_size=256,
            learning_rate_init=2e-3,
            max_iter=200,
            early_stopping=True,
            n_iter_no_change=10,
            random_state=seed,
        ),
    )
    pipeline.fit(train_x[:, h_inputs], train_y, mlpclassifier__sample_weight=weights)
    temperature = fit_temperature(pipeline.predict_proba(val_x[:, h_inputs]), val_y)
    every = len(h_inputs) == len(columns)
    trained = TrainedH(
        pipeline, temperature, featurizer, columns, h_inputs=None if every else h_inputs
    )
    if guard:
        # Half of val's clean images are the guard's reference; the other half stays out of
        # it, so the operating point is set on images the guard ranks as it will rank new ones.
        clean = np.flatnonzero(val_y == 0)
        trained.holdout = np.zeros(len(val_y), dtype=bool)
        trained.holdout[clean[1::2]] = True
        keep = ~trained.holdout
        val_probs = trained.predict_proba_vectors(val_x[keep])
        trained.guard = NoveltyGuard.fit(columns, val_x[keep], val_probs, val_y[keep])
    return trained


def export(
    trained: TrainedH,
    out_dir: Path,
    *,
    classifier_sha256: str,
    training_data: dict[str, Any],
    metrics: dict[str, Any],
    threshold: float | None = None,
) -> DetectorManifest:
    """Write the ONNX graph, the featurizer arrays and the manifest into ``out_dir``."""
    from skl2onnx import to_onnx

    out_dir.mkdir(parents=True, exist_ok=True)
    inputs = len(trained.columns) if trained.h_inputs is None else len(trained.h_inputs)
    sample = np.zeros((1, inputs), dtype=np.float32)
    onnx_model = to_onnx(
        trained.pipeline, sample, options={"zipmap": False}, target_opset={"": 17, "ai.onnx.ml": 3}
    )
    (out_dir / ONNX_FILE).write_bytes(onnx_model.SerializeToString())
    trained.featurizer.save(out_dir / FEATURIZER_FILE)
    onnx_sha, featurizer_sha = _sha256(out_dir / ONNX_FILE), _sha256(out_dir / FEATURIZER_FILE)
    manifest = DetectorManifest(
        format=FORMAT,
        version=hashlib.sha256((onnx_sha + featurizer_sha).encode()).hexdigest()[:12],
        classifier_sha256=classifier_sha256,
        onnx_sha256=onnx_sha,
        featurizer_sha256=featurizer_sha,
        verdicts=list(VERDICTS),
        columns=trained.columns,
        groups=list(trained.featurizer.groups),
        temperature=trained.temperature,
        hidden_layers=list(trained.pipeline[-1].hidden_layer_sizes),
        training_data=training_data,
        metrics=metrics,
        threshold=threshold,
        guard=None if trained.guard is None else trained.guard.to_dict(),
        h_inputs=trained.h_inputs,
    )
    (out_dir / MANIFEST_FILE).write_text(json.dumps(asdict(manifest), indent=2) + "\n")
    return manifest


class OnnxDetector:
    """The served H: featurizer (numpy) → ONNX pipeline (onnxruntime) → temperature.

    Implements the ``service.assessor.Detector`` protocol.
    """

    def __init__(self, folder: Path, classifier_sha256: str) -> None:
        import onnxruntime

        folder = Path(folder).resolve()
        path = folder / MANIFEST_FILE
        if not path.exists():
            raise DetectorMismatch(
                f"no {MANIFEST_FILE} in {folder}: not a detector folder; "
                "make one with `gradprobe fit --classifier FILE --train-data DIR --output "
                "MODEL_DIR`"
            )
        values = json.loads(path.read_text())
        found = values.get("format") if isinstance(values, dict) else None
        if found not in READABLE_FORMATS:
            raise DetectorMismatch(
                f"{path} has an unknown or missing format {found!r}; this release reads "
                f"{', '.join(READABLE_FORMATS)}: a detector written by a newer GradProbe needs "
                "that release (upgrade gradprobe), or refit it with this one (`gradprobe fit`)"
            )
        self.manifest = DetectorManifest(**values)
        if self.manifest.classifier_sha256 != classifier_sha256:
            raise DetectorMismatch(
                f"the detector in {folder} was trained for the classifier with sha256 "
                f"{self.manifest.classifier_sha256}, but the classifier in use has sha256 "
                f"{classifier_sha256}; fit a detector for it with `gradprobe fit`"
            )
        for name, expected in (
            (ONNX_FILE, self.manifest.onnx_sha256),
            (FEATURIZER_FILE, self.manifest.featurizer_sha256),
        ):
            actual = _sha256(folder / name)
            if actual != expected:
                raise DetectorMismatch(
                    f"{folder / name} has sha256 {actual}, its manifest says "
                    f"{expected}: the file was altered or replaced"
                )
        self.folder = folder
        try:
            self.featurizer = SignalFeaturizer.load(folder / FEATURIZER_FILE)
        except ValueError as exc:  # made by a release that computed other signals
            raise DetectorMismatch(f"{folder}: {exc}") from None
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1  # tiny graph: threads cost more than they give
        self.session = onnxruntime.InferenceSession(
            str(folder / ONNX_FILE), options, providers=["CPUExecutionProvider"]
        )
        self._input = self.session.get_inputs()[0].name
        self.version = self.manifest.version
        self.sha256 = self.manifest.onnx_sha256
        guard = self.manifest.guard
        self.guard = None if guard is None else NoveltyGuard.from_dict(guard)
        self._check_columns(path)

    def _check_columns(self, path: Path) -> None:
        """The columns the MLP and the guard read exist, and the graph takes as many as the
        manifest gives it: a manifest edited by hand fails here, not on the first request."""
        columns, inputs = len(self.manifest.columns), self.manifest.h_inputs
        refit = "the manifest was altered; refit the detector with `gradprobe fit`"
        for name, indices in (
            ("h_inputs", inputs or []),
            ("guard columns", [] if self.guard is None else self.guard.columns),
        ):
            if not all(0 <= i < columns for i in indices):
                raise DetectorMismatch(
                    f"{path}: its {name} name columns beyond its {columns} columns: {refit}"
                )
        width = columns if inputs is None else len(inputs)
        graph_width = self.session.get_inputs()[0].shape[-1]
        if isinstance(graph_width, int) and graph_width != width:
            raise DetectorMismatch(
                f"{path} names {width} of its columns as H's inputs, but the ONNX graph takes "
                f"{graph_width}: {refit}"
            )

    @property
    def needs_squeezed_logits(self) -> bool:
        """Whether the signals must come from ``GradientFeatures(model, squeeze=True)``: the
        featurizer computes the stability columns and the MLP or the guard reads one."""
        if not self.featurizer.needs_squeezed_logits:
            return False
        columns = self.manifest.columns
        read = range(len(columns)) if self.manifest.h_inputs is None else self.manifest.h_inputs
        if self.guard is not None:
            read = [*read, *self.guard.columns]
        return any(columns[i] in STABILITY_COLUMNS for i in read)

    def predict_proba_vectors(self, vectors: np.ndarray) -> np.ndarray:
        inputs = self.manifest.h_inputs
        h_vectors = vectors if inputs is None else vectors[:, inputs]
        _, probs = self.session.run(None, {self._input: h_vectors.astype(np.float32)})
        log_p = np.log(np.clip(probs, 1e-12, 1.0))
        probs = _softmax_t(log_p, self.manifest.temperature)
        return probs if self.guard is None else self.guard.apply(vectors, probs)

    def verdict_indices(self, probs: np.ndarray) -> np.ndarray:
        """Index into ``VERDICTS`` per image, at the detector's operating point."""
        return verdict_indices(probs, self.manifest.threshold)

    def predict_proba(self, signals: object, images: np.ndarray | None = None) -> np.ndarray:
        """Calibrated (B, 4) from ``GradientSignals`` and the images they were computed from
        (needed when the featurizer uses image statistics)."""
        return self.predict_proba_vectors(self.featurizer.transform_signals(signals, images))
