"""Serving: which models a server (or the CLI) uses, each a classifier with its detector H.

A model dir made by ``gradprobe fit`` holds its own H (``detector/``); the built-in
Fashion-MNIST example is one such dir (``service.artifacts``). Nothing here trains: a model
dir without H, or a built-in example not built yet, is refused with the command that makes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from detectors.detector import MANIFEST_FILE as DETECTOR_MANIFEST
from detectors.detector import DetectorMismatch, OnnxDetector
from detectors.model_dir import DETECTOR_DIR, LoadedClassifier, load_classifier
from detectors.spec import MANIFEST_FILE, ArtifactError
from service.assessor import Assessor

DEFAULT_MODEL_NAME = "fashion"


def resolve_model_dirs(paths: Sequence[Path]) -> list[Path]:
    """Model dirs from the paths given: a folder of model dirs stands for each of them."""
    found: list[Path] = []
    for path in map(Path, paths):
        if (path / MANIFEST_FILE).exists():
            found.append(path)
            continue
        children = []
        if path.is_dir():
            children = sorted(p for p in path.iterdir() if (p / MANIFEST_FILE).exists())
        if not children:
            raise ArtifactError(
                f"{path} is not a model dir (no {MANIFEST_FILE}) nor a folder of model dirs; "
                "make one with `gradprobe fit --classifier FILE --train-data DIR --output "
                f"{path}`"
            )
        found += children
    return found


def load_detector(classifier: LoadedClassifier) -> OnnxDetector:
    """The classifier's H, from its model dir."""
    own = classifier.model_dir / DETECTOR_DIR
    if (own / DETECTOR_MANIFEST).exists():
        return OnnxDetector(own, classifier.manifest.sha256)
    raise DetectorMismatch(
        f"{classifier.model_dir} has no detector H ({DETECTOR_DIR}/ is missing): make it with "
        f"`gradprobe fit --classifier {classifier.path} --train-data DIR --output "
        f"{classifier.model_dir}`"
    )


def load_assessor(
    model_dir: Path, device: str = "cpu", *, name: str | None = None, quiet: bool = True
) -> Assessor:
    classifier = load_classifier(model_dir, device=device)
    return Assessor(classifier, load_detector(classifier), device, name=name)


def load_assessors(
    model_dirs: Sequence[Path], device: str = "cpu", *, quiet: bool = True
) -> list[Assessor]:
    """One assessor per model dir (the built-in example when none is given, if it is built:
    serving never trains)."""
    if not model_dirs:
        from service import artifacts

        if not artifacts.default_model_built():
            raise DetectorMismatch(
                "the built-in example is not built yet: run `gradprobe demo` (or `gradprobe "
                "train-model`, then the `gradprobe fit` command it prints; several minutes), "
                "or serve your own with --model-dir"
            )
        default = artifacts.default_model_dir()
        return [load_assessor(default, device, name=DEFAULT_MODEL_NAME, quiet=quiet)]
    return [load_assessor(d, device, quiet=quiet) for d in resolve_model_dirs(model_dirs)]
