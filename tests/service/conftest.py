"""Fixtures of the service tests: one assessor (classifier + the default detector H)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def detector(default_detector):
    return default_detector


@pytest.fixture(scope="session")
def assessor(default_classifier, detector):
    from service.assessor import Assessor

    return Assessor(default_classifier, detector, "cpu")
