"""End to end: a real TorchServe serving the GradProbe archive beside a real GradProbe server.

Three archives of the same classifier, loaded at TorchServe's start:
- ``monitor``: predictions at once, verdicts to GradProbe's metrics and the model log;
- ``gate``: verdict in the response, unreliable inputs flagged, outages marked;
- ``strict``: gate that refuses unreliable inputs (422) and answers 503 when GradProbe is out.
"""

from __future__ import annotations

import io
import json
import re
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image
from torchserve_support import GradProbeProcess, TorchServeProcess, torchserve_grpc_stubs

pytestmark = pytest.mark.slow

# Generous: on a loaded 2-core CI machine a healthy GradProbe must never look "unavailable".
GATE_TIMEOUT_MS = 3000.0


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _post(url: str, body: bytes, content_type: str = "image/png") -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


@pytest.fixture(scope="module")
def images(assessor) -> dict[str, list]:
    """uint8 28x28 images with the verdict GradProbe gives offline: confident clean ones and
    MNIST digits judged ood (what TorchServe's path must reproduce)."""
    from detectors.fit.challenge.ood import mnist_digits
    from detectors.fit.fashion_mnist import load_fashion_mnist

    clean = load_fashion_mnist("test").images[-300:]
    digits = np.round(mnist_digits(300, seed=77) * 255).astype(np.uint8)
    picked: dict[str, list] = {}
    for kind, pool, verdict in (("clean", clean, "in_distribution"), ("ood", digits, "ood")):
        batch = assessor.assess(pool.astype(np.float32)[:, None] / 255.0)
        chosen = [
            (image, a)
            for image, a in zip(pool, batch.assessments, strict=True)
            if a.verdict == verdict and a.scores[verdict] > 0.8
        ][:4]
        assert len(chosen) == 4, f"not enough {kind} images with a confident {verdict} verdict"
        picked[kind] = chosen
    return picked


@pytest.fixture(scope="module")
def stack(tmp_path_factory, default_model_dir, default_detector):
    """GradProbe and TorchServe, started once for the module; both stopped at the end."""
    from service.registry import DEFAULT_MODEL_NAME
    from service.torchserve_archive import ArchiveOptions, build_archive

    folder = tmp_path_factory.mktemp("torchserve")
    gradprobe = GradProbeProcess(folder)
    store = folder / "model-store"
    common = {"target": gradprobe.target, "timeout_ms": GATE_TIMEOUT_MS, "batch_size": 4}
    for name, options in (
        ("monitor", ArchiveOptions(mode="monitor", **common)),
        # Names GradProbe's model as `gradprobe serve` names the built-in one; the others don't.
        ("gate", ArchiveOptions(mode="gate", model=DEFAULT_MODEL_NAME, **common)),
        (
            "strict",
            ArchiveOptions(mode="gate", on_unreliable="refuse", on_unavailable="refuse", **common),
        ),
    ):
        build_archive(default_model_dir, store, name=name, options=options)
    torchserve = TorchServeProcess(
        folder, store, {name: f"{name}.mar" for name in ("monitor", "gate", "strict")}
    )
    gradprobe.start()
    try:
        torchserve.start()
        yield gradprobe, torchserve
    finally:
        torchserve.stop()
        gradprobe.kill()


def _check_prediction(body: dict, assessment) -> None:
    assert body["prediction"] == assessment.prediction
    np.testing.assert_allclose(body["probabilities"], assessment.probabilities, atol=1e-4)


def test_rest_monitor_answers_predictions_and_verdicts_reach_gradprobe(stack, images):
    gradprobe, torchserve = stack
    before = _verdict_total(gradprobe.metrics())
    logged_before = torchserve.model_log().count("GRADPROBE_VERDICT")
    sent = 0
    for kind in ("clean", "ood"):
        for image, assessment in images[kind]:
            status, body = _post(f"{torchserve.rest}/predictions/monitor", _png(image))
            assert status == 200, body
            _check_prediction(body, assessment)
            assert body["reliability"] == {"mode": "monitor", "status": "submitted"}
            sent += 1
    # The verdicts arrive in the background: GradProbe counts them, the model log records them.
    _wait_for(lambda: _verdict_total(gradprobe.metrics()) >= before + sent, "verdict metrics")
    _wait_for(
        lambda: torchserve.model_log().count("GRADPROBE_VERDICT") >= logged_before + sent,
        "GRADPROBE_VERDICT lines in the model log",
    )
    lines = re.findall(r"GRADPROBE_VERDICT (\{.*\})", torchserve.model_log())
    verdicts = [json.loads(line)["verdict"] for line in lines[-sent:]]
    assert verdicts.count("ood") >= len(images["ood"]), verdicts
    # TorchServe's own Prometheus endpoint counts the same requests (job "torchserve").
    assert 'ts_inference_requests_total{model_name="monitor"' in torchserve.metrics()


def test_rest_gate_carries_the_offline_verdict(stack, images):
    _, torchserve = stack
    for kind in ("clean", "ood"):
        for image, assessment in images[kind]:
            status, body = _post(f"{torchserve.rest}/predictions/gate", _png(image))
            assert status == 200, body
            _check_prediction(body, assessment)
            reliability = body["reliability"]
            assert reliability["status"] == "ok", reliability
            assert reliability["verdict"] == assessment.verdict
            assert reliability["reliable"] is (assessment.verdict == "in_distribution")
            for name, score in reliability["scores"].items():
                assert score == pytest.approx(assessment.scores[name], abs=1e-4)


def test_rest_strict_gate_refuses_unreliable_inputs(stack, images):
    _, torchserve = stack
    image, _ = images["clean"][0]
    status, body = _post(f"{torchserve.rest}/predictions/strict", _png(image))
    assert status == 200 and body["reliability"]["reliable"] is True, body
    image, _ = images["ood"][0]
    status, body = _post(f"{torchserve.rest}/predictions/strict", _png(image))
    assert status == 422, body
    assert "GradProbe judged it ood" in body["error"]
    assert body["reliability"]["verdict"] == "ood"


def test_rest_json_pixels_are_accepted(stack, images):
    _, torchserve = stack
    image, assessment = images["clean"][1]
    payload = json.dumps({"pixels": image.tolist()}).encode()
    status, body = _post(f"{torchserve.rest}/predictions/gate", payload, "application/json")
    assert status == 200, body
    assert body["prediction"] == assessment.prediction
    assert body["reliability"]["verdict"] == assessment.verdict


@pytest.mark.parametrize(
    ("body", "content_type", "expected"),
    [
        (_png(np.zeros((32, 32), np.uint8)), "image/png", "is 32x32 pixels: expected 28x28"),
        (b"\x89PNG not really", "application/octet-stream", "not a readable image"),
        (b'{"pixels": [[1, 2]]}', "application/json", "has shape [1, 2]"),
        (json.dumps({"pixels": [[float("nan")] * 28] * 28}).encode(), "application/json", "NaN"),
        (json.dumps({"pixels": [[300] * 28] * 28}).encode(), "application/json", "0..255"),
        (b'{"image": 1}', "application/json", 'without a "pixels" field'),
    ],
)
def test_rest_bad_input_gets_400_and_the_worker_keeps_serving(
    stack, images, body, content_type, expected
):
    _, torchserve = stack
    status, answer = _post(f"{torchserve.rest}/predictions/gate", body, content_type)
    assert status == 400, answer
    assert expected in answer["error"]
    image, assessment = images["clean"][0]
    status, answer = _post(f"{torchserve.rest}/predictions/gate", _png(image))
    assert status == 200 and answer["prediction"] == assessment.prediction


def test_grpc_inference_api_in_both_modes(stack, images, tmp_path):
    _, torchserve = stack
    pb, pb_grpc = torchserve_grpc_stubs(tmp_path / "ts_stubs")
    image, assessment = images["ood"][1]
    with grpc.insecure_channel(torchserve.grpc_target) as channel:
        stub = pb_grpc.InferenceAPIsServiceStub(channel)
        for model in ("monitor", "gate"):
            reply = stub.Predictions(
                pb.PredictionsRequest(model_name=model, input={"data": _png(image)}), timeout=60
            )
            body = json.loads(reply.prediction)
            _check_prediction(body, assessment)
            if model == "gate":
                assert body["reliability"]["verdict"] == "ood"
                assert body["reliability"]["reliable"] is False
        # TorchServe 0.12's gRPC API drops a worker's per-request status (it answers OK), so
        # the refusal and the bad-input error are read from the body, as its docs say.
        refused = stub.Predictions(
            pb.PredictionsRequest(model_name="strict", input={"data": _png(image)}), timeout=60
        )
        assert "GradProbe judged it ood" in json.loads(refused.prediction)["error"]
        bad = stub.Predictions(
            pb.PredictionsRequest(model_name="gate", input={"data": b"not an image"}), timeout=60
        )
        assert "not a readable image" in json.loads(bad.prediction)["error"]


def test_gradprobe_frozen_then_killed_mid_run_torchserve_keeps_answering(stack, images):
    """GradProbe stops answering (SIGSTOP), then dies (SIGKILL), then comes back, while
    traffic flows through all three models: no request is lost or hangs."""
    gradprobe, torchserve = stack
    image, assessment = images["clean"][2]
    png = _png(image)
    answers: dict[str, list[tuple[int, dict]]] = {"monitor": [], "gate": [], "strict": []}
    stop = threading.Event()
    errors: list[BaseException] = []

    def traffic() -> None:
        try:
            while not stop.is_set():
                for model, seen in answers.items():
                    seen.append(_post(f"{torchserve.rest}/predictions/{model}", png))
        except BaseException as exc:  # surfaced in the main thread
            errors.append(exc)

    def gate_reason_since(start: int) -> Callable[[], bool]:
        return lambda: any(
            body.get("reliability", {}).get("status") == "unavailable"
            for _, body in answers["gate"][start:]
        )

    thread = threading.Thread(target=traffic, daemon=True)
    thread.start()
    try:
        _wait_for(lambda: len(answers["gate"]) >= 2, "traffic before the outage")
        gradprobe.signal(signal.SIGSTOP)  # slow: connected, never answers
        frozen_at = len(answers["gate"])
        _wait_for(gate_reason_since(frozen_at), "a gate answer marked unavailable (frozen)")
        gradprobe.kill()  # down: connection refused
        killed_at = len(answers["gate"])
        _wait_for(gate_reason_since(killed_at + 1), "a gate answer marked unavailable (killed)")
        _wait_for(lambda: len(answers["strict"]) > killed_at + 2, "strict answers while down")
        gradprobe.start()
        back_at = len(answers["gate"])
        _wait_for(
            lambda: any(b["reliability"]["status"] == "ok" for _, b in answers["gate"][back_at:]),
            "gate verdicts again after GradProbe restarts",
            timeout_s=60,
        )
    finally:
        stop.set()
        thread.join(120)
    assert not errors, errors
    for model, seen in answers.items():
        for status, body in seen:
            if model == "strict" and status == 503:
                assert body["error"].startswith("reliability unavailable, prediction withheld")
                continue
            assert status == 200, (model, status, body)
            _check_prediction(body, assessment)
    reasons = [
        body["reliability"].get("reason", "")
        for _, body in answers["gate"]
        if body["reliability"]["status"] == "unavailable"
    ]
    assert any(f"did not answer within {GATE_TIMEOUT_MS:g} ms" in r for r in reasons) or any(
        "DEADLINE_EXCEEDED" in r for r in reasons
    ), reasons
    assert any("UNAVAILABLE" in r for r in reasons), reasons
    assert any(status == 503 for status, _ in answers["strict"]), "strict never refused"
    statuses = {body["reliability"]["status"] for _, body in answers["monitor"]}
    assert statuses <= {"submitted", "skipped"}, statuses


def _verdict_total(metrics_text: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics_text.splitlines()
        if line.startswith("gradprobe_verdicts_total{")
    )


def _wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 45) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_archive_holds_what_the_handler_needs(default_model_dir, tmp_path):
    import zipfile

    from service.torchserve_archive import build_archive

    archive = build_archive(default_model_dir, tmp_path, name="fashion")
    names = set(zipfile.ZipFile(archive).namelist())
    assert {
        "classifier.pt2",
        "manifest.json",
        "gradprobe_handler.py",
        "gradprobe_sidecar.py",
        "gradprobe_v1/reliability_pb2.py",
        "gradprobe_v1/reliability_pb2_grpc.py",
        "model-config.yaml",
        "MAR-INF/MANIFEST.json",
    } <= names
    with pytest.raises(FileExistsError, match="--force"):
        build_archive(default_model_dir, tmp_path, name="fashion")
    assert Path(archive).exists()
