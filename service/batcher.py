"""Dynamic micro-batching: concurrent requests' images share one model pass.

Requests are validated before they get here, so a batch only ever holds well-formed images.
One worker thread owns the model (the gradient engine hooks into the module, so two passes at
once would mix their captures): it takes the oldest request, then gathers more of the same
kind until ``max_batch_size`` images or until that request has waited ``max_wait_ms`` (only
when the previous batch held several requests: a lone client is never kept waiting), drops
those whose deadline passed or whose client went away, runs one compute on the stacked
images and hands each request its slice.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from service.errors import Cancelled, DeadlineExceeded, NotReady, Overloaded

log = logging.getLogger("gradprobe.batcher")


@dataclass
class BatchOutput:
    """What a compute returns for a stacked batch: one result per image, and stage timings.

    An exception in an image's place fails that image's request with it; the batch's other
    requests get their results (nothing is recomputed).
    """

    results: Sequence[Any]
    timings_ms: dict[str, float]


ComputeFn = Callable[[np.ndarray], BatchOutput]


@dataclass
class JobResult:
    """One request's share of a batch."""

    results: list[Any]
    timings_ms: dict[str, float]  # queue + the batch's stages
    batch_size: int


@dataclass
class _Job:
    kind: str
    images: np.ndarray
    deadline: float | None  # time.monotonic() seconds
    is_active: Callable[[], bool]
    enqueued: float = field(default_factory=time.monotonic)
    future: Future = field(default_factory=Future)


class BatchObserver(Protocol):
    def observe_batch(self, kind: str, images: int) -> None: ...
    def observe_drop(self, reason: str) -> None: ...
    def set_queue_depth(self, images: int) -> None: ...


class MicroBatcher:
    """Queue of validated requests in front of one compute thread.

    Args:
        computes: kind ("assess", "predict") → function computing a stacked batch.
        max_batch_size: images per compute (a single larger request still runs, alone).
        max_wait_ms: how long the oldest request waits for others to join its batch.
        max_queue: images waiting at most; ``submit`` raises ``Overloaded`` beyond.
        batching: False computes one request at a time (the comparison baseline).
        observer: metrics sink (batch sizes, drops, queue depth).
    """

    def __init__(
        self,
        computes: dict[str, ComputeFn],
        *,
        max_batch_size: int,
        max_wait_ms: float,
        max_queue: int,
        batching: bool = True,
        observer: BatchObserver | None = None,
    ) -> None:
        self._computes = computes
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000
        self.max_queue = max_queue
        self.batching = batching
        self._observer = observer
        self._queue: collections.deque[_Job] = collections.deque()
        self._queued_images = 0
        self._admitted_images = 0  # being decoded, not queued yet
        self._condition = threading.Condition()
        self._accepting = False
        self._stopping = False
        self._worker: threading.Thread | None = None
        # Requests in the last batch: waiting for company only pays when requests arrive
        # concurrently; a lone client would otherwise wait max_wait on every call for nobody.
        self._last_batch_requests = 0

    @property
    def queued_images(self) -> int:
        return self._queued_images

    def start(self) -> None:
        with self._condition:
            self._accepting, self._stopping = True, False
        self._worker = threading.Thread(target=self._run, name="gradprobe-batcher", daemon=True)
        self._worker.start()

    def stop(self, timeout: float | None = None) -> None:
        """Refuse new requests, finish the queued ones, then end the worker."""
        with self._condition:
            self._accepting = False
            self._stopping = True
            self._condition.notify_all()
        if self._worker is not None:
            self._worker.join(timeout)

    @contextlib.contextmanager
    def admitting(self, images: int) -> Iterator[None]:
        """Room for ``images`` that are about to be decoded, held until the block ends.

        Decoding allocates the float batch before ``submit`` can refuse it; a request the
        queue has no room for, counting those being decoded, is refused before it allocates.
        """
        with self._condition:
            if not self._accepting:
                raise NotReady("the server is not accepting requests (starting or stopping)")
            waiting = self._queued_images + self._admitted_images
            if waiting + images > self.max_queue:
                raise Overloaded(
                    f"the queue is full ({waiting} of {self.max_queue} images waiting or being "
                    "decoded); retry with backoff"
                )
            self._admitted_images += images
        try:
            yield
        finally:
            with self._condition:
                self._admitted_images -= images

    def submit(
        self,
        kind: str,
        images: np.ndarray,
        *,
        deadline: float | None = None,
        is_active: Callable[[], bool] = lambda: True,
    ) -> Future:
        """Queue validated images (n, 1, 28, 28); the future resolves to a ``JobResult``."""
        if kind not in self._computes:
            raise ValueError(f"unknown kind {kind!r}; expected one of {sorted(self._computes)}")
        job = _Job(kind, images, deadline, is_active)
        with self._condition:
            if not self._accepting:
                raise NotReady("the server is not accepting requests (starting or stopping)")
            if self._queued_images + len(images) > self.max_queue:
                raise Overloaded(
                    f"the queue is full ({self._queued_images} of {self.max_queue} images "
                    "waiting); retry with backoff"
                )
            self._queue.append(job)
            self._queued_images += len(images)
            self._set_depth()
            self._condition.notify_all()
        return job.future

    def _set_depth(self) -> None:
        if self._observer is not None:
            self._observer.set_queue_depth(self._queued_images)

    def _take(self) -> _Job:
        job = self._queue.popleft()
        self._queued_images -= len(job.images)
        return job

    def _next_batch(self) -> list[_Job] | None:
        with self._condition:
            while not self._queue:
                if self._stopping:
                    return None
                self._condition.wait()
            batch = [self._take()]
            if not self.batching:
                self._set_depth()
                return batch
            images = len(batch[0].images)
            # The oldest request's wait bounds the batch's: it never waits twice. Without
            # recent concurrency, it takes what is queued and does not wait at all.
            until = batch[0].enqueued + (self.max_wait_s if self._last_batch_requests > 1 else 0)
            while images < self.max_batch_size:
                if self._queue:
                    head = self._queue[0]
                    if (
                        head.kind != batch[0].kind
                        or images + len(head.images) > self.max_batch_size
                    ):
                        break
                    batch.append(self._take())
                    images += len(head.images)
                    continue
                remaining = until - time.monotonic()
                if remaining <= 0 or self._stopping:
                    break
                self._condition.wait(remaining)
            self._set_depth()  # once per batch taken, not per request
            self._last_batch_requests = len(batch)
            return batch

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            live = [job for job in batch if self._still_wanted(job)]
            if live:
                self._compute(live)

    def _still_wanted(self, job: _Job) -> bool:
        """Drop before compute what nobody will read: expired or cancelled requests."""
        if job.deadline is not None and time.monotonic() >= job.deadline:
            reason, error = "deadline", DeadlineExceeded("the deadline passed while queued")
        elif job.future.cancelled() or not job.is_active():
            reason, error = "cancelled", Cancelled("the client cancelled the request")
        else:
            return job.future.set_running_or_notify_cancel()
        if self._observer is not None:
            self._observer.observe_drop(reason)
        if job.future.set_running_or_notify_cancel():
            job.future.set_exception(error)
        return False

    def _compute(self, batch: list[_Job]) -> None:
        kind = batch[0].kind
        started = time.monotonic()
        stacked = batch[0].images if len(batch) == 1 else np.concatenate([j.images for j in batch])
        try:
            output = self._computes[kind](stacked)
        except Exception as exc:
            if len(batch) > 1:
                # Isolate the failure: rerun each request alone so only the culprit fails.
                log.warning("a batch of %d requests failed; retrying them one by one", len(batch))
                for job in batch:
                    self._compute_alone(job)
                return
            batch[0].future.set_exception(exc)
            return
        if self._observer is not None:
            self._observer.observe_batch(kind, len(stacked))
        offset = 0
        for job in batch:
            n = len(job.images)
            _resolve(job, output.results[offset : offset + n], output, started, len(stacked))
            offset += n

    def _compute_alone(self, job: _Job) -> None:
        started = time.monotonic()
        try:
            output = self._computes[job.kind](job.images)
        except Exception as exc:
            job.future.set_exception(exc)
            return
        _resolve(job, output.results, output, started, len(job.images))


def _resolve(
    job: _Job, results: Sequence[Any], output: BatchOutput, started: float, batch_size: int
) -> None:
    """Answer ``job`` with its share of a batch: its results, or the first exception among
    them."""
    failure = next((r for r in results if isinstance(r, BaseException)), None)
    if failure is not None:
        job.future.set_exception(failure)
        return
    timings = {"queue": (started - job.enqueued) * 1000, **output.timings_ms}
    job.future.set_result(JobResult(list(results), timings, batch_size))
