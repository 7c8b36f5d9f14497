"""A real gRPC server on a loopback port with the real assessor, driven by a real client."""

from __future__ import annotations

import io
import json
import re
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_support import sample_images, start_server
from PIL import Image

from service._proto.gradprobe.v1 import reliability_pb2 as pb
from service.client import ReliabilityClient, StreamError, image_messages

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(assessor):
    # max_wait_ms is long enough that concurrent test requests share micro-batches.
    server = start_server(assessor, max_wait_ms=150.0, metrics_port=0)
    yield server
    server.stop(0)


@pytest.fixture(scope="module")
def client(server):
    with ReliabilityClient(server.target, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def images():
    return sample_images(per_kind=2)


def raw(array: np.ndarray, dtype=pb.RawPixels.FLOAT32, shape=(28, 28)) -> pb.Image:
    return pb.Image(raw=pb.RawPixels(data=array.tobytes(), shape=list(shape), dtype=dtype))


def png(array_uint8: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array_uint8).save(buffer, format=fmt)
    return buffer.getvalue()


def check_matches_core(answers, expected):
    assert [a["prediction"] for a in answers] == [e.prediction for e in expected.assessments]
    assert [a["verdict"] for a in answers] == [e.verdict for e in expected.assessments]
    for a, e in zip(answers, expected.assessments, strict=True):
        assert a["scores"] == pytest.approx(e.scores, abs=1e-4)
        assert a["probabilities"] == pytest.approx(e.probabilities.tolist(), abs=1e-4)


def test_verdicts_equal_the_core(client, assessor, images):
    answers = client.assess(images)
    check_matches_core(answers, assessor.assess(images))
    assert len({a["verdict"] for a in answers}) > 1  # the sample really has different verdicts
    timings = answers[0]["timings_ms"]
    assert timings["total"] >= timings["forward"] > 0 and timings["gradients"] > 0
    assert timings["squeeze"] > 0  # the default detector's guard reads feature squeezing
    assert answers[0]["batch_size"] == len(images)


def test_uint8_and_png_pixels_are_assessed_like_their_float_values(client, assessor, images):
    pixels = np.round(images[:3, 0] * 255).astype(np.uint8)
    expected = assessor.assess(pixels[:, None].astype(np.float32) / np.float32(255))
    check_matches_core(client.assess(pixels), expected)
    request = pb.AssessRequest(images=[pb.Image(encoded=png(p)) for p in pixels])
    response = client.stub.Assess(request, timeout=60)
    assert [r.predicted_class for r in response.results] == [
        e.prediction for e in expected.assessments
    ]


def test_predict_matches_the_classifier(client, assessor, images):
    np.testing.assert_allclose(client.predict(images), assessor.predict(images), atol=1e-5)


def test_model_info(client, assessor):
    info = client.info()
    assert info["classes"] == assessor.classes
    assert info["input_shape"] == [1, 28, 28]
    assert info["detector_version"] == assessor.detector.version
    assert info["detector_sha256"] == assessor.detector.sha256
    assert info["classifier_sha256"] == assessor.classifier.manifest.sha256
    assert info["verdicts"] == ["in_distribution", "ood", "corrupted", "adversarial"]


def test_health_is_serving_and_reflection_lists_the_service(server):
    with grpc.insecure_channel(server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", "gradprobe.v1.Reliability"):
            status = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (answer,) = reflection.ServerReflectionInfo(iter([request]), timeout=5)
        names = {s.name for s in answer.list_services_response.service}
        assert {"gradprobe.v1.Reliability", "grpc.health.v1.Health"} <= names


def test_open_health_watches_hold_no_worker_thread(assessor):
    """grpc-health runs Watch non-blocking, on a pool of its own; the wrapper that refuses
    malformed requests dropped the attributes that say so, and each open Watch then held one
    of the server's worker threads: with two workers, two watches starved every other call."""
    from service._proto.gradprobe.v1 import reliability_pb2_grpc as pb_grpc

    serving = health_pb2.HealthCheckResponse.SERVING
    server = start_server(assessor, workers=2)
    try:
        with grpc.insecure_channel(server.target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            # Deadlines everywhere: a regression fails the test instead of hanging it.
            watches = [health.Watch(health_pb2.HealthCheckRequest(), timeout=60) for _ in range(4)]
            try:
                assert [next(watch).status for watch in watches] == [serving] * 4
                assert health.Check(health_pb2.HealthCheckRequest(), timeout=20).status == serving
                stub = pb_grpc.ReliabilityStub(channel)
                assert stub.ListModels(pb.ListModelsRequest(), timeout=20).models
                # The watches still hear of changes.
                server.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
                statuses = [next(watch).status for watch in watches]
                assert statuses == [health_pb2.HealthCheckResponse.NOT_SERVING] * 4
            finally:
                for watch in watches:
                    watch.cancel()
    finally:
        server.stop(0)


def test_not_serving_and_unavailable_until_the_model_is_warm(assessor, images):
    from service.server import ReliabilityServer
    from service.settings import Settings

    server = ReliabilityServer(Settings(port=0, metrics_port=-1, workers=4))
    server.start()
    try:
        with grpc.insecure_channel(server.target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            check = health_pb2.HealthCheckRequest(service="gradprobe.v1.Reliability")
            assert (
                health.Check(check, timeout=5).status == health_pb2.HealthCheckResponse.NOT_SERVING
            )
            with ReliabilityClient(server.target, timeout=10) as client:
                with pytest.raises(grpc.RpcError) as error:
                    client.assess(images[:1])
                assert error.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "loading" in error.value.details()
                server.load(assessor)
                assert (
                    health.Check(check, timeout=5).status == health_pb2.HealthCheckResponse.SERVING
                )
                assert len(client.assess(images[:1])) == 1
    finally:
        server.stop(0)


BAD = np.full((28, 28), 0.5, np.float32)


def _with(value, at=(3, 4)):
    array = BAD.copy()
    array[at] = value
    return array


@pytest.mark.parametrize(
    ("images", "message"),
    [
        ([raw(np.zeros((28, 27), np.float32), shape=(28, 27))], r"shape is \[28, 27\]"),
        ([raw(np.zeros((2, 28, 28), np.float32), shape=(2, 28, 28))], "one grayscale image"),
        ([raw(BAD, dtype=pb.RawPixels.DTYPE_UNSPECIFIED)], "set it to UINT8"),
        ([raw(BAD.astype(np.float64))], "float64: cast with"),
        ([raw(BAD.astype(np.float32), dtype=pb.RawPixels.UINT8)], "set dtype FLOAT32"),
        ([raw(BAD), raw(_with(np.nan))], "image 1 contains NaN"),
        ([raw(_with(np.inf))], "NaN or infinite"),
        ([raw(_with(1.5))], r"must lie in \[0, 1\]"),
        ([pb.Image(encoded=b"\x89PNG\r\n\x1a\n garbage")], "not a readable PNG or JPEG"),
        (
            [pb.Image(encoded=png(np.zeros((32, 32), np.uint8)))],
            "32×32 pixels; this model takes 28×28",
        ),
        ([pb.Image(encoded=png(np.zeros((28, 28), np.uint8), "GIF"))], "must be PNG or JPEG"),
        ([pb.Image()], "image 0 is empty"),
        ([], "at least one"),
        ([raw(BAD)] * 33, "at most 32"),
    ],
    ids=[
        "shape",
        "several-in-one",
        "dtype-unset",
        "float64",
        "dtype-mismatch",
        "nan",
        "inf",
        "range",
        "undecodable-png",
        "png-size",
        "gif",
        "empty-image",
        "no-images",
        "too-many",
    ],
)
def test_bad_input_is_invalid_argument_with_a_message(client, images, message):
    for call, request in (
        (client.stub.Assess, pb.AssessRequest(images=images)),
        (client.stub.Predict, pb.PredictRequest(images=images)),
    ):
        with pytest.raises(grpc.RpcError) as error:
            call(request, timeout=30)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert re.search(message, error.value.details()), error.value.details()


def test_oversize_message_is_resource_exhausted(client):
    huge = pb.Image(raw=pb.RawPixels(data=bytes(300 * 1024), shape=[28, 28]))
    with pytest.raises(grpc.RpcError) as error:
        client.stub.Assess(pb.AssessRequest(images=[huge]), timeout=30)
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in error.value.details()


@contextmanager
def held_worker(server):
    """Hold the batcher's worker inside its next pass until ``release`` is set (or the block
    ends), so that requests queue behind it whatever the thread scheduling."""
    assessor = server.servicer.assessor
    real_assess = assessor.assess
    started, release = threading.Event(), threading.Event()

    def held_assess(batch):
        started.set()
        assert release.wait(10)
        return real_assess(batch)

    assessor.assess = held_assess  # an instance attribute, shadowing the method
    try:
        yield started, release
    finally:
        release.set()
        del assessor.assess


def wait_until(condition, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def test_a_bad_request_does_not_harm_the_others_in_its_micro_batch(
    client, server, assessor, images
):
    # The good requests queue behind a held pass, so they share the next batch; the bad one
    # arrives among them.
    good = [images[i : i + 2] for i in range(0, 6, 2)]
    bad = pb.AssessRequest(images=[raw(_with(np.nan))])
    batcher = server.servicer.batcher
    with held_worker(server) as (started, release), ThreadPoolExecutor(5) as pool:
        first = pool.submit(client.assess, images[:1])
        assert started.wait(10)
        answers = [pool.submit(client.assess, batch) for batch in good]
        failed = pool.submit(client.stub.Assess, bad, timeout=60)
        with pytest.raises(grpc.RpcError) as error:
            failed.result()
        wait_until(lambda: batcher.queued_images == 6, "the good requests never reached the queue")
        release.set()
        first.result()
        answers = [a.result() for a in answers]
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [a[0]["batch_size"] for a in answers] == [6, 6, 6]  # the good ones shared a batch
    for batch, answer in zip(good, answers, strict=True):
        check_matches_core(answer, assessor.assess(batch))


def test_stream_answers_in_request_order(client, assessor, images):
    batches = [images[:1], images[1:3], images[3:4], images[4:6], images[5:6], images[:2]]
    answers = list(client.stream(batches))
    assert [len(a) for a in answers] == [len(b) for b in batches]
    for batch, answer in zip(batches, answers, strict=True):
        check_matches_core(answer, assessor.assess(batch))


def _stream_handlers() -> int:
    """Threads of this process now inside the server's AssessStream handler."""
    return sum(
        frame.f_code.co_name == "AssessStream" and frame.f_code.co_filename.endswith("server.py")
        for top in sys._current_frames().values()
        for frame, _ in traceback.walk_stack(top)
    )


def test_a_stream_whose_client_cancels_frees_its_handler(client, images):
    # The client sends one request, reads its answer, then cancels while keeping its request
    # iterator open. The handler must notice and return: a handler left waiting holds a gRPC
    # thread forever, and the process at exit (which joins the thread pool).
    more = threading.Event()

    def requests():
        yield pb.AssessRequest(images=image_messages(images[:1]), request_id="a")
        more.wait(10)

    call = client.stub.AssessStream(requests(), timeout=60)
    try:
        assert next(call).request_id == "a"
        # The handler is a generator: it is on its thread's stack again once gRPC has sent
        # the answer and asked for the next one.
        wait_until(lambda: _stream_handlers() == 1, "the stream's handler is not waiting")
        call.cancel()
        wait_until(lambda: _stream_handlers() == 0, "the cancelled stream's handler never returned")
    finally:
        more.set()


def test_a_bad_request_in_a_stream_gets_an_error_and_the_stream_goes_on(client, images):
    requests = [
        pb.AssessRequest(images=image_messages(images[:2]), request_id="a"),
        pb.AssessRequest(images=[raw(_with(2.0))], request_id="b"),
        pb.AssessRequest(images=image_messages(images[2:3]), request_id="c"),
    ]
    responses = list(client.stub.AssessStream(iter(requests), timeout=60))
    assert [r.request_id for r in responses] == ["a", "b", "c"]
    assert [len(r.results) for r in responses] == [2, 0, 1]
    assert responses[1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "[0, 1]" in responses[1].error.message
    with pytest.raises(StreamError, match="INVALID_ARGUMENT"):
        list(client.stream([images[:1], np.full((1, 28, 28), 7, np.float32)]))


def test_a_full_queue_is_resource_exhausted(client, server, images):
    # max_queue 64 images; 32-image requests each run alone (max_batch_size 8). While the
    # worker is held, two of six fit in the queue and four are refused.
    big = np.resize(images, (32, 1, 28, 28))
    batcher = server.servicer.batcher
    with held_worker(server) as (started, release), ThreadPoolExecutor(7) as pool:
        first = pool.submit(client.assess, images[:1])
        assert started.wait(10)
        calls = [pool.submit(client.assess, big) for _ in range(6)]
        wait_until(lambda: sum(c.done() for c in calls) == 4, "four requests were not refused")
        assert batcher.queued_images == 64
        release.set()
        first.result()
        outcomes = []
        for call in calls:
            try:
                outcomes.append(len(call.result()))
            except grpc.RpcError as exc:
                outcomes.append(exc)
    refused = [o for o in outcomes if isinstance(o, grpc.RpcError)]
    assert len(refused) == 4
    assert all(o.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for o in refused)
    assert "queue is full" in refused[0].details()
    assert [o for o in outcomes if not isinstance(o, grpc.RpcError)] == [32, 32]


def test_an_expired_deadline_is_not_computed(client, server, images):
    registry = server.metrics.registry
    model = server.servicer.assessor.name

    def count(name, **labels):
        return registry.get_sample_value(name, {"model": model, **labels}) or 0.0

    def assessed():
        return sum(
            s.value
            for m in registry.collect()
            if m.name == "gradprobe_verdicts"
            for s in m.samples
            if s.name == "gradprobe_verdicts_total"
        )

    dropped_before, assessed_before = (
        count("gradprobe_dropped_requests_total", reason="deadline"),
        assessed(),
    )
    # The worker is held inside a real 32-image pass until the short request has expired
    # in the queue behind it (a pass alone is too quick to wait on).
    big = np.resize(images, (32, 1, 28, 28))
    with held_worker(server) as (started, release), ThreadPoolExecutor(1) as pool:
        busy = pool.submit(client.assess, big)
        assert started.wait(10)
        with pytest.raises(grpc.RpcError) as error:
            client.stub.Assess(pb.AssessRequest(images=image_messages(images[:3])), timeout=0.05)
        assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        release.set()
        busy.result()
    wait_until(
        lambda: count("gradprobe_dropped_requests_total", reason="deadline") > dropped_before,
        "the expired request was never dropped",
    )
    assert assessed() == assessed_before + 32  # the 3 expired images were never assessed


def test_request_metrics_count_methods_and_codes(server, client, images):
    registry = server.metrics.registry
    model = server.servicer.assessor.name
    client.assess(images[:1])

    def count(**labels):
        return registry.get_sample_value("gradprobe_requests_total", labels) or 0.0

    assert count(model=model, method="Assess", code="OK") >= 1
    assert count(model=model, method="Assess", code="INVALID_ARGUMENT") >= 1
    # A name that is not served is counted under "unknown", never as the client wrote it.
    with pytest.raises(grpc.RpcError):
        client.stub.Assess(pb.AssessRequest(images=image_messages(images[:1]), model="x" * 40))
    assert count(model="unknown", method="Assess", code="NOT_FOUND") == 1
    assert all("x" * 40 not in str(m) for m in registry.collect())


def test_cli_assess_writes_one_json_line_per_image(server, assessor, images, tmp_path):
    from service.cli import main

    batch = tmp_path / "batch.npy"
    np.save(batch, images[:4])
    out = tmp_path / "out.jsonl"
    assert (
        main(["assess", "--server", server.target, "--images", str(batch), "--output", str(out)])
        == 0
    )
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    expected = assessor.assess(images[:4]).assessments
    assert [line["index"] for line in lines] == [0, 1, 2, 3]
    assert [line["prediction"] for line in lines] == [e.prediction for e in expected]
    assert [line["verdict"] for line in lines] == [e.verdict for e in expected]
    assert set(lines[0]["scores"]) == {"in_distribution", "ood", "corrupted", "adversarial"}


def test_an_unexpected_error_is_internal_with_a_generic_message(client, server, images, caplog):
    def broken(batch):
        raise RuntimeError("secret detail from deep inside")

    original = server.servicer.assessor.assess
    server.servicer.assessor.assess = broken
    try:
        with pytest.raises(grpc.RpcError) as error:
            client.assess(images[:1])
        responses = list(
            client.stub.AssessStream(
                iter([pb.AssessRequest(images=image_messages(images[:1]), request_id="x")]),
                timeout=30,
            )
        )
    finally:
        server.servicer.assessor.assess = original
    assert error.value.code() == grpc.StatusCode.INTERNAL
    assert "secret" not in error.value.details() and "server log" in error.value.details()
    assert responses[0].error.code == grpc.StatusCode.INTERNAL.value[0]
    assert "secret detail" in caplog.text  # the traceback is in the server's log
    assert len(client.assess(images[:1])) == 1  # and the server carries on


def test_settings_flags_win_over_the_environment():
    import argparse

    from service.settings import Settings, SettingsError, add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    env = {"GRADPROBE_PORT": "7000", "GRADPROBE_MAX_WAIT_MS": "2.5", "GRADPROBE_BATCHING": "off"}
    settings = Settings.from_sources(parser.parse_args(["--port", "7001"]), env)
    assert (settings.port, settings.max_wait_ms, settings.batching) == (7001, 2.5, False)
    assert Settings.from_sources(parser.parse_args([]), {}) == Settings()
    with pytest.raises(SettingsError, match="GRADPROBE_WORKERS='many'"):
        Settings.from_sources(None, {"GRADPROBE_WORKERS": "many"})
    with pytest.raises(SettingsError, match="max_queue must be >= max_images_per_request"):
        Settings(max_queue=4, max_images_per_request=8)


def test_a_call_without_a_deadline_works(server, images):
    with ReliabilityClient(server.target, timeout=None) as client:
        assert len(client.assess(images[:1])) == 1
        assert len(list(client.stream([images[:1]]))) == 1


def test_compute_thread_pools_are_capped_while_serving_and_restored_after(assessor, images):
    import torch
    from threadpoolctl import threadpool_info

    def pools():
        return torch.get_num_threads(), sorted(
            (i["internal_api"], i["num_threads"]) for i in threadpool_info()
        )

    before = pools()
    server = start_server(assessor, compute_threads=3)
    try:
        assert server.servicer._threads.threads == 3
        assert all(i["num_threads"] == 1 for i in threadpool_info() if i["user_api"] == "blas")
        with ReliabilityClient(server.target, timeout=60) as client:
            assert len(client.assess(images[:1])) == 1
    finally:
        server.stop(0)
    assert pools() == before
