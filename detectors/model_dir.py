"""Core: a model dir on disk — the classifier file, its manifest, the detector H — loaded and
verified before anything is served.

Layout (``gradprobe fit`` writes it; ``serve``, ``assess``, ``features``, ``info`` read it)::

    MODEL_DIR/
      manifest.json          the classifier: format, sha256, input spec, classes, layers
      classifier.pt2 | .pt   a torch.export program or a TorchScript file
      detector/              H: detector.json (hashes, columns), detector.onnx, featurizer.npz
      report/                the held-out report of the fit (REPORT.md and plots)

Nothing here is unpickled from the model dir: the classifier is a torch.export or TorchScript
file whose sha256 is checked against the manifest before it is read, H is ONNX plus a
``.npz`` read with ``allow_pickle=False``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from detectors.importer import lift, load_program
from detectors.spec import MANIFEST_FILE, MODEL_FILES, ArtifactError, Manifest, ModelSpec

DETECTOR_DIR = "detector"
REPORT_DIR = "report"

__all__ = [
    "DETECTOR_DIR",
    "MANIFEST_FILE",
    "REPORT_DIR",
    "ArtifactError",
    "ClassCountMismatch",
    "LoadedClassifier",
    "Manifest",
    "atomic_dir",
    "gradprobe_home",
    "load_classifier",
    "sha256_file",
]


class ClassCountMismatch(ArtifactError):
    """The classifier's logits do not have one column per class of its data."""


@dataclass
class LoadedClassifier:
    """A classifier file checked against its manifest: ``module`` is the eager module the
    gradient engine hooks into, lifted from the file and checked against it on load (with the
    manifest's normalization in front); ``exported`` answers plain predictions, and is the same
    module (one copy of the weights on the device)."""

    model_dir: Path
    manifest: Manifest
    module: nn.Module
    exported: nn.Module

    @property
    def path(self) -> Path:
        return self.model_dir / self.manifest.file

    @property
    def spec(self) -> ModelSpec:
        return self.manifest.spec

    @property
    def name(self) -> str:
        return self.model_dir.name


def gradprobe_home() -> Path:
    """Where built artifacts and caches live: ``$GRADPROBE_HOME``, default
    ``~/.cache/gradprobe``."""
    return Path(os.environ.get("GRADPROBE_HOME", Path.home() / ".cache" / "gradprobe"))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verified_file(model_dir: Path, manifest: Manifest) -> Path:
    """The classifier file, after checking that it is the one the manifest describes."""
    if manifest.file not in MODEL_FILES.values():
        raise ArtifactError(
            f"{model_dir}: the manifest names {manifest.file!r}; a model dir's classifier is "
            f"one of {sorted(MODEL_FILES.values())}"
        )
    path = model_dir / manifest.file
    if not path.exists():
        raise ArtifactError(f"{path} is missing: the model dir is incomplete")
    actual = sha256_file(path)
    if actual != manifest.sha256:
        raise ArtifactError(
            f"{path} has sha256 {actual} but its manifest says {manifest.sha256}: the file was "
            "altered or replaced; rebuild the model dir (`gradprobe fit`, or `gradprobe "
            "train-model --fit --force` for the built-in example)"
        )
    return path


def load_classifier(model_dir: Path, device: str | torch.device = "cpu") -> LoadedClassifier:
    """Load a model dir's classifier after checking its hash, lift it to an eager module and
    cross-check the two on a probe batch."""
    model_dir = Path(model_dir).resolve()
    manifest = Manifest.read(model_dir)
    spec = manifest.spec
    path = verified_file(model_dir, manifest)
    program, parameters, original = load_program(path, manifest.format, spec.input_shape)
    module = lift(program, parameters, spec.mean, spec.std)
    layers = [name for name, _ in _parameterized(module)]
    if manifest.layers and layers != list(manifest.layers):
        raise ArtifactError(
            f"{path}: the model's layers {layers} differ from its manifest's {manifest.layers}"
        )
    # On the CPU, where both run the same kernels (a GPU's TF32 convolutions would differ by
    # more than the tolerance without anything being wrong).
    check_agreement(original, module, spec)
    module = module.to(device)
    return LoadedClassifier(model_dir=model_dir, manifest=manifest, module=module, exported=module)


def check_agreement(original: nn.Module, lifted: nn.Module, spec: ModelSpec) -> None:
    """The lifted module must give the original's logits (normalization applied first)."""
    probe = torch.rand(2, *spec.input_shape, generator=torch.Generator().manual_seed(0))
    normalized = probe
    if spec.mean is not None and spec.std is not None:
        mean = torch.tensor(spec.mean).view(1, -1, 1, 1)
        std = torch.tensor(spec.std).view(1, -1, 1, 1)
        normalized = (probe - mean) / std
    with torch.no_grad():
        try:
            expected = original(normalized)
        except Exception as exc:
            raise ArtifactError(
                f"the classifier does not accept a float32 batch of shape "
                f"{tuple(probe.shape)}: {exc}"
            ) from exc
        got = lifted(probe)
    if isinstance(expected, tuple | list):
        expected = expected[0]
    if expected.shape != (2, spec.n_classes):
        raise ClassCountMismatch(
            f"the classifier returns shape {tuple(expected.shape)} for a batch of 2; expected "
            f"logits (2, {spec.n_classes}) for its {spec.n_classes} classes"
        )
    if not torch.allclose(expected, got, rtol=1e-4, atol=1e-5):
        worst = float((expected - got).abs().max())
        raise ArtifactError(
            f"the eager form of the classifier disagrees with the file (max |Δ| {worst:.3g}); "
            "please report this model's graph"
        )


def _parameterized(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from detectors.gradients import parameterized_layers

    return parameterized_layers(model)


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """A staging folder beside ``target`` that replaces it only when the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield staging
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            target.rename(old)
            staging.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
