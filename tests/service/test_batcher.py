"""The micro-batcher alone, with plain compute functions (no model): fast and exact."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from service.batcher import BatchOutput, MicroBatcher
from service.errors import Cancelled, DeadlineExceeded, NotReady, Overloaded


class Recorder:
    """A compute that records batch sizes and returns each image's first pixel; it can be
    held (to pile requests up behind it) and poisoned (to fail on a marker value)."""

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Event()

    def __call__(self, images: np.ndarray) -> BatchOutput:
        self.started.set()
        self.gate.wait(5)
        if (images == -1).any():
            raise RuntimeError("poisoned batch")
        self.batches.append(len(images))
        # -2 marks an image whose own computation failed (as one that alone runs out of
        # accelerator memory): an exception in its place.
        return BatchOutput(
            [ValueError("failed image") if x.flat[0] == -2 else float(x.flat[0]) for x in images],
            {"forward": 1.0},
        )


def images(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32)[:, None, None, None] * np.ones(
        (1, 1, 28, 28), np.float32
    )


def make(compute: Recorder, **kwargs) -> MicroBatcher:
    options = {"max_batch_size": 8, "max_wait_ms": 200.0, "max_queue": 32, **kwargs}
    batcher = MicroBatcher({"assess": compute, "predict": compute}, **options)
    batcher.start()
    return batcher


def hold(compute: Recorder, batcher: MicroBatcher) -> object:
    """Occupy the worker with a one-image batch until ``compute.gate`` is set."""
    compute.gate.clear()
    compute.started.clear()
    future = batcher.submit("assess", images(0.5))
    assert compute.started.wait(5)
    return future


def test_concurrent_requests_share_one_batch_and_get_their_own_slice():
    compute = Recorder()
    batcher = make(compute)
    first = hold(compute, batcher)
    futures = [batcher.submit("assess", images(i / 10, i / 10 + 0.01)) for i in range(3)]
    compute.gate.set()
    results = [f.result(5) for f in futures]
    batcher.stop(5)
    assert first.result(5).results == [0.5]
    assert compute.batches == [1, 6]
    for i, result in enumerate(results):
        assert result.results == pytest.approx([i / 10, i / 10 + 0.01])
        assert result.batch_size == 6
        assert result.timings_ms["queue"] >= 0 and result.timings_ms["forward"] == 1.0


def test_a_lone_request_waits_at_most_max_wait():
    compute = Recorder()
    batcher = make(compute, max_wait_ms=50.0)
    start = time.monotonic()
    batcher.submit("assess", images(0.1)).result(5)
    batcher.stop(5)
    assert time.monotonic() - start < 1.0


def test_a_lone_client_is_not_kept_waiting_for_company():
    compute = Recorder()
    batcher = make(compute, max_wait_ms=60_000.0)  # a wait would outlast result()'s timeout
    for value in (0.1, 0.2, 0.3):
        assert batcher.submit("assess", images(value)).result(5).results == [pytest.approx(value)]
    batcher.stop(5)
    assert compute.batches == [1, 1, 1]


def test_batches_never_exceed_max_batch_size_and_kinds_never_mix():
    compute = Recorder()
    batcher = make(compute, max_batch_size=4)
    hold(compute, batcher)
    futures = [batcher.submit("assess", images(0.1, 0.2, 0.3)) for _ in range(3)]
    futures.append(batcher.submit("predict", images(0.4)))
    compute.gate.set()
    for f in futures:
        f.result(5)
    batcher.stop(5)
    # 3+3 > 4, so each 3-image request runs alone; the predict never joins an assess batch.
    assert compute.batches == [1, 3, 3, 3, 1]


def test_batching_off_computes_one_request_at_a_time():
    compute = Recorder()
    batcher = make(compute, batching=False)
    hold(compute, batcher)
    futures = [batcher.submit("assess", images(0.1, 0.2)) for _ in range(3)]
    compute.gate.set()
    for f in futures:
        assert f.result(5).batch_size == 2
    batcher.stop(5)
    assert compute.batches == [1, 2, 2, 2]


def test_a_full_queue_is_overloaded():
    compute = Recorder()
    batcher = make(compute, max_queue=4)
    hold(compute, batcher)
    batcher.submit("assess", images(0.1, 0.2, 0.3))
    with pytest.raises(Overloaded, match="queue is full"):
        batcher.submit("assess", images(0.1, 0.2))
    assert batcher.queued_images == 3
    compute.gate.set()
    batcher.stop(5)


def test_images_being_decoded_count_against_the_queue_before_they_are_allocated():
    compute = Recorder()
    batcher = make(compute, max_queue=4)
    hold(compute, batcher)
    with batcher.admitting(3):
        # Room for 3 is held while they decode: a 2-image request is refused before decoding.
        with pytest.raises(Overloaded, match="being decoded"), batcher.admitting(2):
            pytest.fail("admitted past the queue's room")
        future = batcher.submit("assess", images(0.1, 0.2, 0.3))
    # Queued now, and the decode's hold is released: 1 more image fits, 2 do not.
    with batcher.admitting(1):
        pass
    with pytest.raises(Overloaded), batcher.admitting(2):
        pass
    compute.gate.set()
    assert future.result(5).batch_size == 3
    with batcher.admitting(4):  # all room is back once computed
        pass
    batcher.stop(5)
    with pytest.raises(NotReady), batcher.admitting(1):
        pass


def test_expired_and_cancelled_requests_are_dropped_before_compute():
    compute = Recorder()
    drops: list[str] = []

    class Observer:
        def observe_batch(self, kind, n):
            pass

        def observe_drop(self, reason):
            drops.append(reason)

        def set_queue_depth(self, n):
            pass

    batcher = make(compute, observer=Observer())
    hold(compute, batcher)
    expired = batcher.submit("assess", images(0.2), deadline=time.monotonic() + 0.01)
    gone = batcher.submit("assess", images(0.3), is_active=lambda: False)
    alive = batcher.submit("assess", images(0.4))
    time.sleep(0.05)  # past the first deadline
    compute.gate.set()
    assert alive.result(5).results == [pytest.approx(0.4)]
    with pytest.raises(DeadlineExceeded):
        expired.result(5)
    with pytest.raises(Cancelled):
        gone.result(5)
    batcher.stop(5)
    assert compute.batches == [1, 1]  # the held one, then only the live request
    assert sorted(drops) == ["cancelled", "deadline"]


def test_a_failing_request_fails_alone_not_its_batch():
    compute = Recorder()
    batcher = make(compute)
    hold(compute, batcher)
    good = [batcher.submit("assess", images(0.1)) for _ in range(2)]
    bad = batcher.submit("assess", images(-1))
    compute.gate.set()
    with pytest.raises(RuntimeError, match="poisoned"):
        bad.result(5)
    assert [f.result(5).results for f in good] == [[pytest.approx(0.1)]] * 2
    batcher.stop(5)


def test_a_failed_image_fails_its_request_and_the_batch_is_not_rerun():
    compute = Recorder()
    batcher = make(compute)
    hold(compute, batcher)
    good = batcher.submit("assess", images(0.1, 0.2))
    bad = batcher.submit("assess", images(0.3, -2))
    compute.gate.set()
    with pytest.raises(ValueError, match="failed image"):
        bad.result(5)
    assert good.result(5).results == [pytest.approx(0.1), pytest.approx(0.2)]
    assert good.result(5).batch_size == 4
    batcher.stop(5)
    assert compute.batches == [1, 4]  # the held one, then one pass: no request was rerun


def test_stop_finishes_queued_requests_then_refuses_new_ones():
    compute = Recorder()
    batcher = make(compute)
    hold(compute, batcher)
    queued = batcher.submit("assess", images(0.7))
    threading.Timer(0.05, compute.gate.set).start()
    batcher.stop(5)
    assert queued.result(0).results == [pytest.approx(0.7)]
    with pytest.raises(NotReady):
        batcher.submit("assess", images(0.1))
