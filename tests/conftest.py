"""Shared fixtures. The default artifacts are built once per content (cached under
$GRADPROBE_HOME) and shared by every test that needs them, never rebuilt per test."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    from service.artifacts import ensure_default_model

    return ensure_default_model(quiet=True)


@pytest.fixture(scope="session")
def default_classifier(default_model_dir: Path):
    from service.classifier import load_classifier

    return load_classifier(default_model_dir)


@pytest.fixture(scope="session")
def default_detector(default_classifier):
    """The default detector H, trained once per content (minutes on a new machine)."""
    from service.artifacts import load_default_detector

    return load_default_detector(default_classifier, quiet=True)


@pytest.fixture(scope="session")
def assessor(default_classifier, default_detector):
    """The service core on the default classifier and detector H, shared by server tests."""
    from service.assessor import Assessor

    return Assessor(default_classifier, default_detector, "cpu")
