"""Faults against real `gradprobe serve` processes on loopback (benchmarks/faults.py runs the
same scenarios and writes RELIABILITY.md's table); each test asserts on what it observed."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

import grpc
import numpy as np
import pytest
import torch
from grpc_support import start_server

from benchmarks import faults
from service._proto.gradprobe.v1 import reliability_pb2 as pb
from service._proto.gradprobe.v1 import reliability_pb2_grpc as pb_grpc
from service.client import image_messages
from service.errors import OUT_OF_MEMORY_MESSAGE

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model_dir(default_model_dir, default_detector):
    """The built-in example's model dir, its detector H built (servers load it from the
    cache)."""
    return default_model_dir


@pytest.fixture(scope="module")
def shared(model_dir):
    """One server for the faults that leave it running."""
    with faults.shared_server(model_dir) as server:
        yield server


def test_sigterm_mid_batch_answers_in_flight_refuses_new_calls_and_exits_0(model_dir):
    observation = faults.sigterm_mid_batch(model_dir, images=64)
    data = observation["data"]
    assert data["unfinished_at_refusal"] > 0, "nothing was in flight: the test proves nothing"
    assert data["draining_logged"]
    assert data["new_calls"] == {"open channel": "UNAVAILABLE", "new channel": "UNAVAILABLE"}
    assert data["outcomes"] == [64] * data["requests"]  # every one answered in full
    assert data["exit_code"] == 0
    assert observation["passed"]


def test_sigkill_then_restart_reconnects_and_answers_the_same(model_dir):
    observation = faults.sigkill_and_restart(model_dir)
    data = observation["data"]
    assert data["killed_exit_code"] == -9
    assert data["while_down"] == "UNAVAILABLE"
    # SERVING, the watch broken when the process died, then the new process's statuses: it
    # says NOT_SERVING only while it warms up (which may be over before the channel
    # reconnects), then SERVING.
    sequence = data["health_sequence"]
    assert sequence[0] == "SERVING" and sequence[1] == "UNAVAILABLE", sequence
    after_restart = sequence[sequence.index("UNAVAILABLE") + 1 :]
    assert after_restart in (["SERVING"], ["NOT_SERVING", "SERVING"]), sequence
    assert data["serving_on_new_process"]
    assert data["same_verdicts"] and data["same_predictions"]
    assert data["max_score_difference"] < 1e-5
    assert observation["passed"]


@pytest.mark.parametrize("which", ["classifier", "detector"])
def test_a_tampered_file_stops_the_start_naming_the_file_and_both_hashes(
    model_dir, which, tmp_path
):
    observation = faults.tampered_file(model_dir, which, workdir=tmp_path)
    data = observation["data"]
    assert not data["started"]
    assert data["exit_code"] == 2
    assert not data["traceback"], data["error_line"]
    assert data["error_line"].startswith("gradprobe serve: error: ")
    assert data["file"] and data["expected_sha256"] and data["actual_sha256"], data["error_line"]
    assert data["expected"] != data["actual"]


def test_a_full_queue_refuses_without_growing_memory(model_dir, shared):
    observation = faults.full_queue(model_dir, shared, warmup_refusals=300, refusals=2000)
    data = observation["data"]
    assert data["refused"] >= 2000 and data["other"] == 0
    assert data["messages"] == [
        "the queue is full (64 of 64 images waiting or being decoded); retry with backoff"
    ]
    assert data["refused_counted_by_server"] == data["refused"]
    # A leak of a tenth of each refused request would exceed the bound.
    assert data["rss_growth"] <= data["rss_bound"], observation["observed"]
    assert data["still_answers"] == 2


def test_a_client_killed_mid_stream_leaks_no_handler(model_dir, shared):
    observation = faults.stream_disconnect(model_dir, shared, workers=8)
    data = observation["data"]
    assert data["client_was_streaming"]
    assert data["threads_during"] > data["threads_baseline"], "the streams were not seen"
    assert data["threads_returned"], observation["observed"]
    # Every handler thread of the server (--workers 8) is free for new streams again.
    assert data["new_streams_answered"] == 8, data["new_streams_failure"]


@pytest.mark.parametrize("flag", ["--port", "--metrics-port"])
def test_a_taken_port_fails_the_start_in_one_line(model_dir, flag):
    observation = faults.port_taken(model_dir, flag)
    data = observation["data"]
    assert not data["started"]
    assert data["exit_code"] == 2
    assert not data["traceback"], data["error_line"]
    assert data["error_line"].startswith("gradprobe serve: error: ")
    assert data["names_port"] and data["names_flag"], data["error_line"]


def test_out_of_memory_splits_the_batch_and_answers_as_uncapped(model_dir, shared):
    observation = faults.out_of_memory(model_dir, reference=shared, cap=4, images=32)
    data = observation["data"]
    assert data["answered"] == 32, data["failure"]
    assert data["same_verdicts"] and data["same_predictions"]
    assert data["max_score_difference"] < 1e-4
    assert data["splits"] == data["expected_splits"] == 7  # 32 → 2×16 → 4×8 → 8×4
    assert data["server_alive"]


MARK = 1.0  # the first pixel of an image that does not fit in the device's memory, even alone
DEVICE_DETAIL = "CUDA out of memory; GPU 0: 79 GiB in use by process 4242 (injected)"


@dataclass
class FullDevice:
    """What ``full_device`` yields: the sizes of the passes that ran (Assess and Predict);
    ``release``, which every pass waits for (set unless a test clears it, to hold the batcher's
    worker while requests queue); ``entered``, set when a pass has begun."""

    passes: list[int] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)
    entered: threading.Event = field(default_factory=threading.Event)


@contextmanager
def full_device(assessor) -> Iterator[FullDevice]:
    """The assessor raising CUDA's out-of-memory error for any pass holding a marked image,
    as a device too full for even one image would."""
    device = FullDevice()
    device.release.set()

    def failing_on_marked(compute):
        def run(images):
            device.entered.set()
            assert device.release.wait(30)
            device.passes.append(len(images))
            if (images[:, 0, 0, 0] == MARK).any():
                raise torch.cuda.OutOfMemoryError(DEVICE_DETAIL)
            return compute(images)

        return run

    # Instance attributes, shadowing the methods.
    assessor.assess = failing_on_marked(assessor.assess)
    assessor.predict = failing_on_marked(assessor.predict)
    try:
        yield device
    finally:
        del assessor.assess, assessor.predict


def images_of(count: int, marked: int | None = None) -> np.ndarray:
    images = np.full((count, 1, 28, 28), 0.5, np.float32)
    if marked is not None:
        images[marked, 0, 0, 0] = MARK
    return images


def test_an_image_that_alone_runs_out_of_memory_fails_its_request_only(assessor, caplog):
    server = start_server(assessor)
    try:
        with full_device(assessor), grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.ReliabilityStub(channel)
            with pytest.raises(grpc.RpcError) as error:
                stub.Assess(pb.AssessRequest(images=image_messages(images_of(4, 2))), timeout=60)
            fine = stub.Assess(pb.AssessRequest(images=image_messages(images_of(2))), timeout=60)
            with pytest.raises(grpc.RpcError) as predicted:
                stub.Predict(pb.PredictRequest(images=image_messages(images_of(3, 0))), timeout=60)
        splits = server.metrics.registry.get_sample_value(
            "gradprobe_memory_splits_total", {"model": assessor.name}
        )
    finally:
        server.stop(0)
    for failed in (error.value, predicted.value):
        assert failed.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert failed.details() == OUT_OF_MEMORY_MESSAGE
    assert len(fine.results) == 2
    # Assess: 4 → 2 + 2, the marked pair → 1 + 1; Predict: 3 → 2 + 1, the marked pair → 1 + 1.
    assert splits == 4
    # The device's own message (its memory, other processes) is in the server's log only,
    # once per micro-batch however many splits it took.
    warnings = [r.getMessage() for r in caplog.records if "accelerator memory" in r.getMessage()]
    assert len(warnings) == 2 and all(DEVICE_DETAIL in w for w in warnings), warnings


def test_out_of_memory_on_one_image_spares_the_other_requests_of_its_micro_batch(assessor):
    """The out-of-memory error of the one image escaped the halving: the micro-batch's
    finished halves were dropped, and each request was computed again, alone."""
    server = start_server(assessor)
    batcher = server.servicer.batcher
    clean = images_of(2)
    try:
        with (
            full_device(assessor) as device,
            grpc.insecure_channel(server.target) as channel,
            ThreadPoolExecutor(3) as pool,
        ):
            stub = pb_grpc.ReliabilityStub(channel)

            def assess(images):
                return stub.Assess(pb.AssessRequest(images=image_messages(images)), timeout=60)

            device.release.clear()
            held = pool.submit(assess, clean[:1])
            assert device.entered.wait(30), "the first request never reached the model"
            other = pool.submit(assess, clean)
            wait_for(lambda: batcher.queued_images == 2)
            failing = pool.submit(assess, images_of(2, marked=1))
            wait_for(lambda: batcher.queued_images == 4)
            device.release.set()
            held.result()
            answer = other.result()
            with pytest.raises(grpc.RpcError) as error:
                failing.result()
    finally:
        server.stop(0)
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert [r.timings.batch_size for r in answer.results] == [4, 4]  # they shared a batch
    expected = assessor.assess(clean).assessments
    assert [r.predicted_class for r in answer.results] == [a.prediction for a in expected]
    # The held pass; then [clean, clean, fine, marked]: 4 → 2 + 2, the clean pair answered
    # and kept, the other pair → 1 + 1 (its fine image computed, the marked one failed).
    # Nothing ran twice.
    assert device.passes == [1, 4, 2, 2, 1, 1]


def wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the requests never queued behind the held pass"
        time.sleep(0.01)
