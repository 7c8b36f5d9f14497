"""The assessor's out-of-memory path: split in halves, the same answers, one image the limit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from grpc_support import sample_images

from service.assessor import MemoryCap, within_memory

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def images():
    return sample_images(per_kind=3)  # 9 images: an odd count splits unevenly


def assess(assessor):
    def run(batch: np.ndarray):
        done = assessor.assess(batch)
        return done.assessments, done.timings_ms

    return run


def test_a_capped_batch_is_split_and_answered_as_a_whole(assessor, images):
    whole = assessor.assess(images)
    parts = within_memory(assess(assessor), images, memory_cap=MemoryCap(2))
    assert parts.splits == [9, 5, 3, 4]  # 9 → 5 + 4; 5 → 3 + 2; 3 → 2 + 1; 4 → 2 + 2
    assert parts.failed == 0 and "memory cap of 2" in parts.reason
    assert [a.verdict for a in parts.results] == [a.verdict for a in whole.assessments]
    assert [a.prediction for a in parts.results] == [a.prediction for a in whole.assessments]
    for got, expected in zip(parts.results, whole.assessments, strict=True):
        assert got.scores == pytest.approx(expected.scores, abs=1e-5)
    assert set(parts.timings_ms) == set(whole.timings_ms)  # stages summed over the passes


def test_a_batch_within_the_cap_is_not_split(assessor, images):
    done = within_memory(assess(assessor), images, memory_cap=MemoryCap(9))
    assert done.splits == [] and done.reason == "" and len(done.results) == 9


def test_an_image_that_alone_does_not_fit_is_marked_and_the_others_kept(assessor, images):
    # Any pass holding image 2 runs out of memory, as one image too large for the device.
    marked = images.copy()
    marked[2, 0, 0, 0] = 0.123
    passes: list[int] = []

    def run(batch: np.ndarray):
        passes.append(len(batch))
        if (batch[:, 0, 0, 0] == np.float32(0.123)).any():
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return assess(assessor)(batch)

    done = within_memory(run, marked)
    assert [r is None for r in done.results] == [i == 2 for i in range(9)]
    assert done.failed == 1 and done.reason == "CUDA out of memory (injected)"
    # 9 → 5 + 4; 5 → 3 + 2; 3 → 2 + 1, the culprit alone: every other image is computed
    # once, in the first pass that holds it and fits.
    assert done.splits == [9, 5, 3]
    assert passes == [9, 5, 3, 2, 1, 2, 4]
    expected = assessor.assess(np.delete(marked, 2, axis=0)).assessments
    kept = [r for r in done.results if r is not None]
    assert [a.verdict for a in kept] == [a.verdict for a in expected]


def test_other_errors_are_not_retried(images):
    calls = []

    def broken(batch: np.ndarray):
        calls.append(len(batch))
        raise RuntimeError("not a memory error")

    with pytest.raises(RuntimeError, match="not a memory error"):
        within_memory(broken, images, memory_cap=MemoryCap(100))
    assert calls == [9]


def test_the_engine_squeezes_only_for_a_detector_that_reads_it(assessor):
    from service.assessor import Assessor

    assert assessor.detector.needs_squeezed_logits and assessor.engine.squeeze

    class ThirdPartyDetector:  # a Detector written before the stability signals
        version, sha256 = "v", "0" * 64

    plain = Assessor(assessor.classifier, ThirdPartyDetector())
    assert not plain.engine.squeeze
