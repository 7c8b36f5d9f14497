"""The built-in example's deployment: where it lives, and building it once per content.

It is built like any user's: `gradprobe train-model` trains the Fashion-MNIST classifier
(``default_classifier_dir``), then `gradprobe fit` makes the model dir served by default
(``default_model_dir``: the classifier, its detector H and the held-out report) from the
installed Fashion-MNIST training images, with the test images as validation data.

Both are cached under ``$GRADPROBE_HOME`` (default ``~/.cache/gradprobe``) in folders named by
a key over everything they are built from: the code, the recipes, the data and the torch
version. Anything that would change them changes the key, so a cached one is not stale, and
tests and the CLI share one build.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import shlex
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
    from detectors.fit.training import FitOptions


def default_classifier_key(recipe: TrainingRecipe | None = None) -> str:
    recipe = recipe or TrainingRecipe()
    parts = {
        "code": code_fingerprint([Path(classifier_module.__file__)]),
        "recipe": asdict(recipe),
        "data": datasets.fashion_mnist_digest(),
        "torch": torch.__version__,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def default_classifier_dir(recipe: TrainingRecipe | None = None) -> Path:
    """Where `gradprobe train-model` puts the built-in example's classifier."""
    return gradprobe_home() / "models" / f"fashion-cnn-{default_classifier_key(recipe)}"


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


def build_default_classifier(
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


def ensure_default_classifier(*, force: bool = False, quiet: bool = False) -> Path:
    """The built-in example's classifier dir, trained first if it is absent (or ``force``)."""
    target = default_classifier_dir()
    with _build_lock(target):
        if force or not (target / classifier_module.MANIFEST_FILE).exists():
            build_default_classifier(target, quiet=quiet)
    return target


class FitUnavailable(RuntimeError):
    """A serving-only install was asked to build the built-in example's detector."""


# The default deployment's `gradprobe fit` arguments besides the classifier and the output.
DEFAULT_TRAIN_DATA = "fashion-mnist:train"
DEFAULT_VAL_DATA = "fashion-mnist:test"


def default_fit_options(*, progress: bool = True) -> FitOptions:
    """The full challenge recipe, without a time limit: the recipe does not depend on how fast
    the machine is (a time limit would size it to the machine)."""
    from detectors.fit.training import FitOptions

    return FitOptions(val_data=Path(DEFAULT_VAL_DATA), time_limit_s=None, progress=progress)


def default_fit_command(classifier_dir: Path | None = None, output: Path | None = None) -> str:
    classifier_dir = classifier_dir or default_classifier_dir()
    output = output or default_model_dir()
    classifier = shlex.quote(str(classifier_dir / classifier_module.MODEL_FILE))
    return (
        f"gradprobe fit --classifier {classifier} "
        f"--train-data {DEFAULT_TRAIN_DATA} --val-data {DEFAULT_VAL_DATA} --time-limit 0 "
        f"--output {shlex.quote(str(output))}"
    )


# What H is made with besides our code (versions read from the install, nothing imported).
FIT_PACKAGES = ("torch", "scikit-learn", "skl2onnx", "torchattacks", "pytorch-ood", "scipy",
                "scikit-image", "numpy")  # fmt: skip


def _versions(names: tuple[str, ...]) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in names:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "absent"
    return found


def default_model_dir() -> Path:
    """The model dir served when none is named: keyed by the classifier and everything `fit`
    is made of (the detectors package's code, the options, torch)."""
    import detectors

    package = Path(detectors.__file__).parent
    # The options' defaults (the recipe above all) are in the code; the rest is named here.
    # Nothing of fitting is imported: `serve` asks for this path on a serving-only install.
    parts = {
        "classifier": default_classifier_key(),
        "code": code_fingerprint([*sorted(package.rglob("*.py")), Path(__file__)]),
        "data": [DEFAULT_TRAIN_DATA, DEFAULT_VAL_DATA, "no time limit"],
        "packages": _versions(FIT_PACKAGES),
    }
    key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]
    return gradprobe_home() / "models" / f"fashion-{key}"


def default_model_built() -> bool:
    """Whether the default model dir holds its detector H (the last thing `fit` writes)."""
    from detectors.detector import MANIFEST_FILE as DETECTOR_MANIFEST
    from detectors.model_dir import DETECTOR_DIR

    return (default_model_dir() / DETECTOR_DIR / DETECTOR_MANIFEST).exists()


def ensure_default_model(*, force: bool = False, quiet: bool = False) -> Path:
    """The default model dir (classifier, H, report), built first if it is absent (or
    ``force``): `train-model`, then `fit` (several minutes on a new machine)."""
    target = default_model_dir()
    with _build_lock(target):
        if force or not default_model_built():
            try:
                from detectors.fit.training import fit
            except ImportError as exc:
                raise FitUnavailable(
                    f"building the built-in example's detector needs the fitting packages "
                    f"({exc.name} is missing): install them with `pip install 'gradprobe[fit]'` "
                    "(`make setup` does), or pass --model-dir"
                ) from None
            classifier_dir = ensure_default_classifier(force=force, quiet=quiet)
            fit(
                classifier_dir / classifier_module.MODEL_FILE,
                Path(DEFAULT_TRAIN_DATA),
                target,
                default_fit_options(progress=not quiet),
            )
    return target


def default_classifier_only(*, quiet: bool = False) -> Path:
    """For commands that need only the classifier (info, features, archive): the default model
    dir when it is built, else the classifier's own dir (trained if absent), never a fit."""
    return default_model_dir() if default_model_built() else ensure_default_classifier(quiet=quiet)


def load_default_classifier(device: str = "cpu", *, quiet: bool = False) -> LoadedClassifier:
    """The built-in example's classifier (its model dir need not be fitted yet)."""
    return classifier_module.load_classifier(default_classifier_only(quiet=quiet), device=device)
