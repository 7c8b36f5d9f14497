"""Fixtures of the service tests: one assessor (classifier + detector H) for the session.

The detector is the small logistic one of ``grpc_support``; to test against the default
trained H instead, change the one line marked below.
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def detector(default_classifier):
    from grpc_support import fit_detector

    return fit_detector(default_classifier)  # swap: service.artifacts.load_default_detector()


@pytest.fixture(scope="session")
def assessor(default_classifier, detector):
    from service.assessor import Assessor

    return Assessor(default_classifier, detector, "cpu")
