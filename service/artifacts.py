"""Where the default artifacts live, and building them once per content.

Artifacts are cached under ``$GRADPROBE_HOME`` (default ``~/.cache/gradprobe``) in a folder
named by a key over everything they are built from: the training code, the recipe, the data
files and the torch version. Anything that would change the artifact changes the key, so a
cached artifact is never stale, and tests and the CLI share one build.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from detectors.fingerprint import code_fingerprint
from detectors.fit import fashion_mnist as datasets
from detectors.model_dir import gradprobe_home
from service import classifier as classifier_module
from service.classifier import LoadedClassifier, TrainingRecipe

if TYPE_CHECKING:
    from detectors.detector import OnnxDetector


def default_model_key(recipe: TrainingRecipe | None = None) -> str:
    recipe = recipe or TrainingRecipe()
    parts = {
        "code": code_fingerprint([Path(classifier_module.__file__)]),
        "recipe": asdict(recipe),
        "data": datasets.fashion_mnist_digest(),
        "torch": torch.__version__,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def default_model_dir(recipe: TrainingRecipe | None = None) -> Path:
    return gradprobe_home() / "models" / f"fashion-cnn-{default_model_key(recipe)}"


@contextlib.contextmanager
def _build_lock(target: Path) -> Iterator[None]:
    """One builder at a time per artifact, across processes (pytest workers, CLI calls)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def build_default_model(
    out_dir: Path, recipe: TrainingRecipe | None = None, *, quiet: bool = False
) -> Path:
    """Train on the 60k Fashion-MNIST images and export into ``out_dir`` (atomically)."""
    from tqdm import tqdm

    recipe = recipe or TrainingRecipe()
    train = datasets.load_fashion_mnist("train")
    test = datasets.load_fashion_mnist("test")
    with tqdm(
        total=1, desc="training the default classifier", unit="step", disable=quiet, file=sys.stderr
    ) as bar:

        def progress(done: int, total: int, loss: float) -> None:
            bar.total = total
            bar.update(done - bar.n)
            if done % 50 == 0:
                bar.set_postfix(loss=f"{loss:.3f}")

        model = classifier_module.train_classifier(train.images, train.labels, recipe, progress)
    test_accuracy = classifier_module.accuracy(model, test.images, test.labels)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".building-", dir=out_dir.parent))
    try:
        classifier_module.export_classifier(
            model,
            staging,
            classes=list(datasets.FASHION_MNIST_CLASSES),
            test_accuracy=test_accuracy,
            recipe=recipe,
            data_sha256=datasets.fashion_mnist_digest(),
        )
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if not quiet:
        print(
            f"default classifier: test accuracy {test_accuracy:.2%}, saved in {out_dir}",
            file=sys.stderr,
        )
    return out_dir


def ensure_default_model(*, force: bool = False, quiet: bool = False) -> Path:
    """The default model folder, built first if it is absent (or ``force``)."""
    target = default_model_dir()
    with _build_lock(target):
        if force or not (target / classifier_module.MANIFEST_FILE).exists():
            build_default_model(target, quiet=quiet)
    return target


def load_default_classifier(device: str = "cpu", *, quiet: bool = False) -> LoadedClassifier:
    return classifier_module.load_classifier(ensure_default_model(quiet=quiet), device=device)


DEFAULT_DETECTOR_MODULES = (
    "detector.py",
    "gradients.py",
    "guard.py",
    "layer_norms.py",
    "signals.py",
    "traced_backward.py",
    "fit/builtin.py",
    "fit/fashion_mnist.py",
)


def default_detector_dir(classifier: LoadedClassifier) -> Path:
    """Keyed by the classifier, the challenge recipe and the code of everything H is made by."""
    import detectors

    package = Path(detectors.__file__).parent
    # The modules the default H is made by; the rest of the package (fitting users' models,
    # importing their files) does not change it.
    made_by = [
        *(package / "fit" / "challenge").glob("*.py"),
        *(package / name for name in DEFAULT_DETECTOR_MODULES),
    ]
    code = code_fingerprint(made_by)
    blob = json.dumps({"classifier": classifier.manifest.sha256, "code": code}, sort_keys=True)
    key = hashlib.sha256(blob.encode()).hexdigest()[:16]
    return gradprobe_home() / "detectors" / f"h-{key}"


def ensure_default_detector(
    classifier: LoadedClassifier, *, force: bool = False, quiet: bool = False
) -> Path:
    """The default detector folder for this classifier, trained first if absent."""
    from detectors.detector import MANIFEST_FILE
    from detectors.fit.builtin import train_detector

    target = default_detector_dir(classifier)
    with _build_lock(target):
        if force or not (target / MANIFEST_FILE).exists():
            train_detector(
                classifier.module, classifier.manifest.sha256, target, progress=not quiet
            )
    return target


def load_default_detector(
    classifier: LoadedClassifier | None = None, *, quiet: bool = False
) -> OnnxDetector:
    from detectors.detector import OnnxDetector

    classifier = classifier or load_default_classifier(quiet=quiet)
    return OnnxDetector(
        ensure_default_detector(classifier, quiet=quiet), classifier.manifest.sha256
    )
