"""Faults against real `gradprobe serve` processes on loopback (benchmarks/faults.py runs the
same scenarios and writes RELIABILITY.md's table); each test asserts on what it observed."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch
from grpc_support import start_server

from benchmarks import faults
from service._proto.gradprobe.v1 import reliability_pb2 as pb
from service.client import image_messages

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
    assert data["messages"] == ["the queue is full (64 of 64 images waiting); retry with backoff"]
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


def test_an_image_that_alone_runs_out_of_memory_fails_its_request_only(assessor):
    # In process: the compute raises CUDA's out-of-memory error for any pass holding the
    # marked image, as a device too full for even one image would.
    server = start_server(assessor)
    real_assess = assessor.assess

    def assess(images):
        if (images[:, 0, 0, 0] == 1.0).any():
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return real_assess(images)

    images = np.full((4, 1, 28, 28), 0.5, np.float32)
    marked = images.copy()
    marked[2, 0, 0, 0] = 1.0
    assessor.assess = assess  # an instance attribute, shadowing the method
    try:
        with grpc.insecure_channel(server.target) as channel:
            from service._proto.gradprobe.v1 import reliability_pb2_grpc as pb_grpc

            stub = pb_grpc.ReliabilityStub(channel)
            with pytest.raises(grpc.RpcError) as error:
                stub.Assess(pb.AssessRequest(images=image_messages(marked)), timeout=60)
            fine = stub.Assess(pb.AssessRequest(images=image_messages(images)), timeout=60)
        splits = server.metrics.registry.get_sample_value(
            "gradprobe_memory_splits_total", {"model": assessor.name}
        )
    finally:
        del assessor.assess
        server.stop(0)
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "one image alone does not fit" in error.value.details()
    assert "injected" in error.value.details()
    assert len(fine.results) == 4
    assert splits == 2  # 4 → 2 + 2 → the marked pair split again; then its image alone failed
