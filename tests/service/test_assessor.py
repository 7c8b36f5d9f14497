"""The assessor's out-of-memory path: split in halves, the same answers, one image the limit."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from grpc_support import sample_images

from service.assessor import MemoryCap, OutOfMemory, assess_within_memory
from service.errors import status_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def images():
    return sample_images(per_kind=3)  # 9 images: an odd count splits unevenly


def test_a_capped_batch_is_split_and_answered_as_a_whole(assessor, images):
    whole = assessor.assess(images)
    splits: list[int] = []
    parts = assess_within_memory(
        assessor.assess, images, on_split=splits.append, memory_cap=MemoryCap(2)
    )
    assert splits == [9, 5, 3, 4]  # 9 → 5 + 4; 5 → 3 + 2; 3 → 2 + 1; 4 → 2 + 2
    assert [a.verdict for a in parts.assessments] == [a.verdict for a in whole.assessments]
    assert [a.prediction for a in parts.assessments] == [a.prediction for a in whole.assessments]
    for got, expected in zip(parts.assessments, whole.assessments, strict=True):
        assert got.scores == pytest.approx(expected.scores, abs=1e-5)
    assert set(parts.timings_ms) == set(whole.timings_ms)  # stages summed over the passes


def test_a_batch_within_the_cap_is_not_split(assessor, images):
    splits: list[int] = []
    assess_within_memory(assessor.assess, images, on_split=splits.append, memory_cap=MemoryCap(9))
    assert splits == []


def test_one_image_that_does_not_fit_is_resource_exhausted_with_what_to_do(assessor, images):
    with pytest.raises(OutOfMemory) as error:
        assess_within_memory(assessor.assess, images[:2], memory_cap=MemoryCap(0))
    message = str(error.value)
    assert "one image alone does not fit" in message and "--simulate-memory-cap" in message
    assert "retry later" in message
    assert status_for(error.value) == (grpc.StatusCode.RESOURCE_EXHAUSTED, message)


def test_other_errors_are_not_retried(images):
    calls = []

    def broken(batch: np.ndarray):
        calls.append(len(batch))
        raise RuntimeError("not a memory error")

    with pytest.raises(RuntimeError, match="not a memory error"):
        assess_within_memory(broken, images, memory_cap=MemoryCap(100))
    assert calls == [9]
