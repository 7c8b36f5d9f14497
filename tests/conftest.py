"""Shared fixtures. The default artifacts are built once per content (cached under
$GRADPROBE_HOME) and shared by every test that needs them, never rebuilt per test."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The built-in example's model dir: `train-model`, then `fit` (minutes on a new machine)."""
    from service.artifacts import ensure_default_model

    return ensure_default_model(quiet=True)


@pytest.fixture(scope="session")
def default_classifier(default_model_dir: Path):
    from service.classifier import load_classifier

    return load_classifier(default_model_dir)


@pytest.fixture(scope="session")
def default_detector(default_classifier):
    """The built-in example's detector H, from its model dir."""
    from service.registry import load_detector

    return load_detector(default_classifier)


@pytest.fixture(scope="session")
def assessor(default_classifier, default_detector):
    """The service core on the default classifier and detector H, shared by server tests."""
    from service.assessor import Assessor

    return Assessor(default_classifier, default_detector, "cpu")


@pytest.fixture(scope="session")
def byom_dir(tmp_path_factory) -> Path:
    """A small RGB classifier (TorchScript, 3x20x24, 4 classes) through `fit` with few
    challenge images: the bring-your-own-classifier model dir the service tests share."""
    from byom_models import CLASSES, SHAPE, save, trained, write_image_folder

    from detectors.fit.domain import FitRecipe
    from detectors.fit.training import FitOptions, fit

    root = tmp_path_factory.mktemp("byom")
    train = write_image_folder(root / "train", CLASSES, 40, SHAPE)
    classifier = save(trained(train), root / "tiny.pt", SHAPE)
    options = FitOptions(recipe=FitRecipe.quick(), leave_one_out=False, progress=False)
    return fit(classifier, train, root / "model", options)


@pytest.fixture(scope="session")
def pki(tmp_path_factory):
    """A throwaway CA with server and client certificates (``tls_support.make_pki``)."""
    from tls_support import make_pki

    return make_pki(tmp_path_factory.mktemp("pki"))
