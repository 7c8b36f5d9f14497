"""Bring your own classifier, end to end: a small RGB model through `fit`, served over gRPC
next to another model, and the same verdicts offline."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from byom_models import SHAPE
from grpc_support import start_server

from service._proto.gradprobe.v1 import reliability_pb2 as pb
from service.cli import main
from service.client import ReliabilityClient

CLASSES = ["bus", "car", "sign", "truck"]


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    rng = np.random.default_rng(5)
    return rng.uniform(0, 1, (6, *SHAPE)).astype(np.float32)


def test_fit_writes_a_complete_model_dir(byom_dir: Path) -> None:
    manifest = json.loads((byom_dir / "manifest.json").read_text())
    assert manifest["format"] == "torchscript" and manifest["file"] == "classifier.pt"
    assert manifest["input_shape"] == list(SHAPE) and manifest["classes"] == CLASSES
    assert manifest["layers"][0] == "stem" and manifest["layers"][-1] == "head"
    detector = json.loads((byom_dir / "detector" / "detector.json").read_text())
    assert detector["classifier_sha256"] == manifest["sha256"]
    assert 0.0 < detector["threshold"] < 1.0
    assert not any("img_" in c for c in detector["columns"])  # no background assumptions
    report = (byom_dir / "report" / "REPORT.md").read_text()
    assert "## By family" in report and "ood:natural" in report
    assert "adversarial:pgd_min" in report  # the minimal attacks: just past the boundary
    assert detector["guard"] is not None and detector["guard"]["columns"]
    assert (byom_dir / "report" / "roc_by_family.png").stat().st_size > 1000


def test_info_describes_the_users_model(capsys, byom_dir: Path) -> None:
    assert main(["info", "--model-dir", str(byom_dir), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["input_shape"] == list(SHAPE) and info["classes"] == CLASSES
    assert info["detector"].endswith("detector") and info["report"].endswith("REPORT.md")


def offline(capsys, model_dir: Path, images: np.ndarray, tmp_path: Path) -> list[dict]:
    np.save(tmp_path / "x.npy", images)
    out = tmp_path / "offline.jsonl"
    argv = ["assess", "--model-dir", str(model_dir), "--images", str(tmp_path / "x.npy")]
    assert main([*argv, "--output", str(out), "--quiet"]) == 0
    capsys.readouterr()
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_served_verdicts_equal_offline_assess(capsys, byom_dir, images, tmp_path) -> None:
    from service.registry import load_assessors

    expected = offline(capsys, byom_dir, images, tmp_path)
    server = start_server(load_assessors([byom_dir]))
    try:
        with ReliabilityClient(server.target, timeout=30) as client:
            answers = client.assess(images)
            info = client.info()
    finally:
        server.stop(0)
    assert info["input_shape"] == list(SHAPE) and info["name"] == "model"
    assert [a["prediction"] for a in answers] == [r["prediction"] for r in expected]
    assert [a["verdict"] for a in answers] == [r["verdict"] for r in expected]
    for a, r in zip(answers, expected, strict=True):
        for verdict, score in r["scores"].items():
            assert a["scores"][verdict] == pytest.approx(score, abs=1e-5)


@pytest.fixture(scope="module")
def two_models(byom_dir: Path, tmp_path_factory):
    """The fitted model dir served twice under two names, in one server."""
    from service.registry import load_assessors

    other = tmp_path_factory.mktemp("second") / "signs-b"
    shutil.copytree(byom_dir, other)
    server = start_server(load_assessors([byom_dir, other]))
    yield server
    server.stop(0)


def test_several_models_each_request_names_its_own(two_models, images) -> None:
    with ReliabilityClient(two_models.target, timeout=30) as client:
        names = [m["name"] for m in client.list_models()]
        assert names == ["model", "signs-b"]
        a = client.assess(images, model="model")
        b = client.assess(images, model="signs-b")
        assert [x["verdict"] for x in a] == [x["verdict"] for x in b]
        assert client.info(model="signs-b")["input_shape"] == list(SHAPE)
        with pytest.raises(grpc.RpcError) as unnamed:
            client.assess(images)
    assert unnamed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "model" in unnamed.value.details() and "signs-b" in unnamed.value.details()


def test_a_stream_counts_under_the_model_its_requests_name(two_models, images) -> None:
    registry = two_models.metrics.registry

    def streams(model: str) -> float:
        labels = {"model": model, "method": "AssessStream", "code": "OK"}
        return registry.get_sample_value("gradprobe_requests_total", labels) or 0.0

    before = {m: streams(m) for m in ("signs-b", "model", "unknown")}
    with ReliabilityClient(two_models.target, timeout=30) as client:
        answers = list(client.stream([images[:2], images[2:3]], model="signs-b"))
    assert len(answers) == 2
    deadline = time.monotonic() + 10  # counted when the server closes the stream
    while streams("signs-b") == before["signs-b"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert streams("signs-b") == before["signs-b"] + 1
    assert streams("model") == before["model"] and streams("unknown") == before["unknown"]


def test_unknown_model_is_not_found_with_the_served_names(two_models, images) -> None:
    with ReliabilityClient(two_models.target, timeout=30) as client:
        with pytest.raises(grpc.RpcError) as err:
            client.assess(images, model="resnet50")
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert "resnet50" in err.value.details() and "signs-b" in err.value.details()
        with pytest.raises(grpc.RpcError) as info:
            client.info(model="resnet50")
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        # The server goes on serving everyone else.
        assert len(client.assess(images[:1], model="model")) == 1


def test_wrong_shape_says_what_the_model_expects(two_models) -> None:
    with ReliabilityClient(two_models.target, timeout=30) as client:
        gray = np.zeros((1, 1, 28, 28), dtype=np.float32)
        with pytest.raises(grpc.RpcError) as err:
            client.assess(gray, model="model")
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "[3, 20, 24]" in err.value.details()
        # Channels-last uint8 pixels, as cameras give them, are accepted.
        hwc = np.random.default_rng(0).integers(0, 255, (2, 20, 24, 3), dtype=np.uint8)
        assert len(client.assess(hwc, model="model")) == 2


def test_encoded_images_must_have_the_models_size(two_models) -> None:
    import io

    from PIL import Image

    def png(width: int, height: int) -> bytes:
        buffer = io.BytesIO()
        Image.new("RGB", (width, height), (200, 30, 30)).save(buffer, format="PNG")
        return buffer.getvalue()

    channel = grpc.insecure_channel(two_models.target)
    stub = __import__("service._proto.gradprobe.v1.reliability_pb2_grpc", fromlist=["x"])
    rpc = stub.ReliabilityStub(channel)
    good = rpc.Assess(
        pb.AssessRequest(images=[pb.Image(encoded=png(24, 20))], model="model"), timeout=30
    )
    assert len(good.results) == 1
    with pytest.raises(grpc.RpcError) as err:
        rpc.Assess(
            pb.AssessRequest(images=[pb.Image(encoded=png(28, 28))], model="model"), timeout=30
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "24×20" in err.value.details()
    channel.close()


def test_serve_fails_fast_naming_fit_when_the_detector_is_missing(byom_dir, tmp_path) -> None:
    bare = tmp_path / "bare"
    shutil.copytree(byom_dir, bare, ignore=shutil.ignore_patterns("detector"))
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", "serve", "--model-dir", str(bare), "--port", "0",
         "--metrics-port", "-1"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert "gradprobe fit" in result.stderr and "detector" in result.stderr
    assert time.monotonic() - started < 60


def test_serve_command_answers_the_assess_command(byom_dir, images, tmp_path, capsys) -> None:
    """`gradprobe serve --model-dir` in its own process; `gradprobe assess --server` asks it."""
    expected = offline(capsys, byom_dir, images, tmp_path)
    process = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--model-dir", str(byom_dir), "--port", "0",
         "--metrics-port", "-1"],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        target = None
        for line in process.stderr:
            found = re.search(r"ready on (\S+)", line)
            if found:
                target = found.group(1).rstrip(",")
                break
        assert target, "the server never said it was ready"
        out = tmp_path / "remote.jsonl"
        argv = ["assess", "--server", target, "--images", str(tmp_path / "x.npy")]
        assert main([*argv, "--output", str(out), "--quiet"]) == 0
        remote = [json.loads(line) for line in out.read_text().splitlines()]
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert [r["verdict"] for r in remote] == [r["verdict"] for r in expected]
    assert [r["prediction"] for r in remote] == [r["prediction"] for r in expected]


def test_features_command_equals_the_per_label_loop(capsys, byom_dir, images, tmp_path) -> None:
    """`gradprobe features --model-dir` on the imported TorchScript file: exact features."""
    import warnings

    import torch

    from detectors.reference import loop_features

    np.save(tmp_path / "x.npy", images)
    out = tmp_path / "f.npy"
    argv = ["features", "--model-dir", str(byom_dir), "--images", str(tmp_path / "x.npy")]
    assert main([*argv, "--output", str(out), "--quiet"]) == 0
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = torch.jit.load(str(byom_dir / "classifier.pt")).eval()
    # The loop over the file's own module, layers in the manifest's order.
    expected = loop_features(model, torch.from_numpy(images)).numpy()
    got = np.load(out)
    assert got.shape == (len(images), len(CLASSES), expected.shape[2])
    assert (abs(got - expected) <= 1e-4 * abs(expected) + 1e-10).all()
