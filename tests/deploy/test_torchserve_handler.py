"""The TorchServe handler's logic, imported as the archive lays it out, without TorchServe."""

from __future__ import annotations

import importlib
import io
import json
import os
import sys
import zipfile
from concurrent import futures
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml
from grpc_support import free_port, sample_images, start_server
from PIL import Image

# Manifests as `gradprobe fit` / `train-model` write them (the fields the handler reads).
GRAY_MANIFEST = {
    "input_shape": [1, 28, 28],
    "classes": [f"class {k}" for k in range(10)],
    "normalization": None,
    "resize": False,
}
RGB_SHAPE = (3, 20, 24)
RGB_MANIFEST = {
    "input_shape": list(RGB_SHAPE),
    "classes": ["bus", "car", "sign", "truck"],
    "normalization": {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]},
    "resize": False,
}


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory):
    from service.torchserve_archive import stage_handler

    folder = stage_handler(tmp_path_factory.mktemp("handler"))
    sys.path.insert(0, str(folder))
    try:
        yield importlib.import_module("gradprobe_sidecar")
    finally:
        sys.path.remove(str(folder))


@pytest.fixture(scope="module")
def gray(sidecar):
    return sidecar.InputSpec.from_manifest(GRAY_MANIFEST)


@pytest.fixture(scope="module")
def rgb(sidecar):
    return sidecar.InputSpec.from_manifest(RGB_MANIFEST)


def test_config_reads_yaml_then_environment(sidecar):
    config = sidecar.HandlerConfig.from_sources(
        {"mode": "gate", "timeout_ms": 100, "target": "gp:1"},
        {
            "GRADPROBE_TS_TIMEOUT_MS": "75.5",
            "GRADPROBE_TS_ON_UNRELIABLE": "refuse",
            "GRADPROBE_TS_MODEL": "signs",
        },
    )
    assert (config.mode, config.target, config.timeout_ms) == ("gate", "gp:1", 75.5)
    assert (config.on_unreliable, config.model) == ("refuse", "signs")
    assert sidecar.HandlerConfig.from_sources({"model": "fashion"}, {}).model == "fashion"
    assert sidecar.HandlerConfig().model == ""  # the only model GradProbe serves
    assert sidecar.HandlerConfig.from_sources(None, {}) == sidecar.HandlerConfig()


@pytest.mark.parametrize(
    ("section", "environ", "message"),
    [
        ({"mode": "block"}, {}, "mode must be one of"),
        ({}, {"GRADPROBE_TS_TIMEOUT_MS": "soon"}, "bad gradprobe setting"),
        ({}, {"GRADPROBE_TS_TIMEOUT_MS": "0"}, "timeout_ms must be positive"),
        ({"timeout": 5}, {}, "unknown gradprobe setting"),
    ],
)
def test_bad_config_is_refused_with_a_message(sidecar, section, environ, message):
    with pytest.raises(sidecar.ConfigError, match=message):
        sidecar.HandlerConfig.from_sources(section, environ)


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def test_decode_accepts_png_and_json_pixels_alike(sidecar, gray):
    pixels = np.arange(28 * 28, dtype=np.uint16).reshape(28, 28) % 256
    image = pixels.astype(np.uint8)
    expected = (image.astype(np.float32) / 255)[None]
    from_png = sidecar.decode_request({"data": bytearray(_png(image))}, gray)
    from_rest_json = sidecar.decode_request({"body": {"pixels": image.tolist()}}, gray)
    from_grpc_json = sidecar.decode_request({"data": json.dumps({"pixels": image.tolist()})}, gray)
    from_floats = sidecar.decode_request({"body": {"pixels": (image / 255).tolist()}}, gray)
    for decoded in (from_png, from_rest_json, from_grpc_json, from_floats):
        assert decoded.shape == (1, 28, 28) and decoded.dtype == np.float32
        np.testing.assert_allclose(decoded, expected, atol=1e-6)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({}, "no image in the request"),
        ({"garbage": b""}, "only form fields ['garbage']"),
        ({"data": b"\x00\x01"}, "not a readable image"),
        ({"data": _png(np.zeros((30, 28), np.uint8))}, "is 28x30 pixels: expected 28x28,"),
        ({"data": b"{oops"}, "not valid JSON"),
        ({"body": {"pixels": [[0.5] * 28] * 27}}, "has shape [27, 28]"),
        ({"body": {"pixels": [[-1] * 28] * 28}}, "range from -1"),
        ({"body": {"pixels": [[1.5] * 28] * 28}}, "floats in [0, 1]"),
        ({"body": {"pixels": [["a"] * 28] * 28}}, "not a grid of numbers"),
    ],
)
def test_decode_says_what_is_wrong(sidecar, gray, row, message):
    with pytest.raises(sidecar.BadInput) as error:
        sidecar.decode_request(row, gray)
    assert message in str(error.value)
    assert "expected" in str(error.value)


def _rgb_image(seed: int = 0) -> np.ndarray:
    """uint8 (H, W, 3) for RGB_SHAPE, channels last as PIL holds it."""
    c, h, w = RGB_SHAPE
    return np.random.default_rng(seed).integers(0, 256, (h, w, c), dtype=np.uint8)


def test_rgb_png_decodes_to_the_manifest_shape(sidecar, rgb):
    image = _rgb_image()
    decoded = sidecar.decode_request({"data": _png(image)}, rgb)
    assert decoded.shape == RGB_SHAPE and decoded.dtype == np.float32
    assert decoded.min() >= 0.0 and decoded.max() <= 1.0
    np.testing.assert_allclose(decoded, image.transpose(2, 0, 1) / 255, atol=1e-6)
    # A grayscale file is converted to the model's channels, as GradProbe does.
    gray_file = sidecar.decode_request({"data": _png(image[..., 0])}, rgb)
    assert gray_file.shape == RGB_SHAPE
    np.testing.assert_array_equal(gray_file[0], gray_file[2])


def test_a_wrong_size_is_refused_naming_width_by_height(sidecar, rgb):
    transposed = np.ascontiguousarray(_rgb_image().transpose(1, 0, 2))  # 20 wide, 24 high
    with pytest.raises(sidecar.BadInput) as error:
        sidecar.decode_request({"data": _png(transposed)}, rgb)
    message = str(error.value)
    assert "the image is 20x24 pixels: expected 24x20" in message
    assert "RGB" in message and message.isascii()  # it becomes the HTTP reason phrase


def test_a_resizing_manifest_resizes_as_gradprobe_does(sidecar):
    from detectors.spec import ModelSpec
    from service.server import _decode_encoded

    spec = sidecar.InputSpec.from_manifest({**RGB_MANIFEST, "resize": True})
    big = np.random.default_rng(1).integers(0, 256, (50, 37, 3), dtype=np.uint8)
    decoded = sidecar.decode_request({"data": _png(big)}, spec)
    assert decoded.shape == RGB_SHAPE
    server = _decode_encoded(0, _png(big), ModelSpec(RGB_SHAPE, ("a", "b"), resize=True))
    np.testing.assert_allclose(decoded, server / 255, atol=1e-6)
    assert "resized to 24x20" in spec.expected_input


def test_rgb_json_pixels_in_each_layout(sidecar, rgb):
    hwc = _rgb_image(2)
    chw = hwc.transpose(2, 0, 1)
    expected = chw.astype(np.float32) / 255
    for pixels in (chw.tolist(), hwc.tolist(), (chw / 255).tolist(), (hwc / 255).tolist()):
        decoded = sidecar.decode_request({"body": {"pixels": pixels}}, rgb)
        assert decoded.shape == RGB_SHAPE and decoded.dtype == np.float32
        np.testing.assert_allclose(decoded, expected, atol=1e-6)
    # H x W is one channel's layout: an RGB model refuses it, naming what it takes.
    with pytest.raises(sidecar.BadInput) as error:
        sidecar.decode_request({"body": {"pixels": hwc[..., 0].tolist()}}, rgb)
    assert "has shape [20, 24]" in str(error.value)
    assert "20x24x3 (height x width x channels) or 3x20x24" in str(error.value)


def test_gray_json_pixels_take_a_channel_axis_too(sidecar, gray):
    image = np.arange(28 * 28).reshape(28, 28) % 256
    for pixels in (image, image[None], image[..., None]):
        decoded = sidecar.decode_request({"body": {"pixels": pixels.tolist()}}, gray)
        np.testing.assert_allclose(decoded, image[None] / 255, atol=1e-6)


def test_normalization_is_for_the_classifier_only(sidecar, rgb, gray):
    decoded = sidecar.decode_request({"data": _png(_rgb_image())}, rgb)
    assert decoded.min() >= 0.0 and decoded.max() <= 1.0  # what GradProbe is sent
    normalized = rgb.normalize(decoded[None])
    assert normalized.shape == (1, *RGB_SHAPE) and normalized.dtype == np.float32
    for channel, (mean, std) in enumerate(zip((0.5, 0.4, 0.3), (0.2, 0.25, 0.3), strict=True)):
        np.testing.assert_allclose(normalized[0, channel], (decoded[channel] - mean) / std, 1e-5)
    batch = np.full((2, 1, 28, 28), 0.5, np.float32)
    assert gray.normalize(batch) is batch  # no normalization in the manifest


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"input_shape": [2, 20, 24]}, "1 or 3 channels"),
        ({"input_shape": [20, 24]}, "[C, H, W]"),
        ({"normalization": {"mean": [0.5, 0.5], "std": [0.2, 0.2]}}, "1 or 3 values"),
        ({"normalization": {"mean": [0.5]}}, "both mean and std"),
    ],
)
def test_a_manifest_the_handler_cannot_serve_is_refused(sidecar, change, message):
    with pytest.raises(sidecar.ManifestError, match=message):
        sidecar.InputSpec.from_manifest({**RGB_MANIFEST, **change})


def test_link_refuses_a_gradprobe_serving_another_classifier(sidecar, assessor):
    server = start_server(assessor)
    sha256 = assessor.classifier.manifest.sha256
    try:
        images = sample_images(per_kind=1)
        offline = [a.verdict for a in assessor.assess(images).assessments]
        # Unnamed (the only model served), or by GradProbe's name for it.
        for model in ("", assessor.name):
            config = sidecar.HandlerConfig(target=server.target, timeout_ms=30_000, model=model)
            link = sidecar.ReliabilityLink(config, sha256)
            assert [a["verdict"] for a in link.assess(images)] == offline
            link.close()
        other = sidecar.ReliabilityLink(config, "f" * 64)
        with pytest.raises(sidecar.ReliabilityUnavailable) as error:
            other.assess(images)
        other.close()
        unknown = sidecar.ReliabilityLink(replace(config, model="nope"), sha256)
        with pytest.raises(sidecar.ReliabilityUnavailable) as unknown_error:
            unknown.assess(images)
        unknown.close()
    finally:
        server.stop(0)
    message = str(error.value)
    assert sha256[:12] in message and "ffffffffffff" in message
    assert "NOT_FOUND" in str(unknown_error.value)
    assert "GRADPROBE_TS_MODEL" in str(unknown_error.value)


def test_monitor_skips_instead_of_queueing_without_bound(sidecar):
    # Nothing listens on this port: every call fails fast, the worker must keep going.
    config = sidecar.HandlerConfig(target=f"127.0.0.1:{free_port()}", timeout_ms=200)
    link = sidecar.ReliabilityLink(config, "0" * 64)
    results = []
    worker = sidecar.MonitorWorker(link, max_pending=1, on_result=lambda i, r: results.append(r))
    images = np.zeros((1, 1, 28, 28), np.float32)
    statuses = [worker.submit([str(i)], images) for i in range(50)]
    worker.close()
    link.close()
    assert "skipped" in statuses and statuses[0] == "submitted"
    assert worker.counts["submitted"] + worker.counts["skipped"] == 50
    assert worker.counts["unavailable"] == worker.counts["submitted"]
    assert results == []


# ----------------------------------------------------------------------------- the handler


class FakeContext:
    """What the handler uses of TorchServe's context object."""

    def __init__(self, model_dir: Path, yaml_config: dict) -> None:
        self.system_properties = {"model_dir": str(model_dir), "gpu_id": None}
        self.model_yaml_config = yaml_config
        self.statuses: dict[int, tuple[int, str]] = {}

    def set_response_status(self, code: int, phrase: str, idx: int = 0) -> None:
        self.statuses[idx] = (code, phrase)

    def get_request_id(self, idx: int = 0) -> str:
        return f"request-{idx}"


def _fake_gradprobe(sidecar, name: str):
    """A Reliability server on a free port that serves one model, called ``name``, and
    records what it is asked; call ``.server.stop(0)`` after."""
    pb, pb_grpc = sidecar.pb, sidecar.pb_grpc

    class FakeGradProbe(pb_grpc.ReliabilityServicer):
        def __init__(self) -> None:
            self.sha256 = ""
            self.asked: list[str] = []
            self.requests: list = []

        def GetModelInfo(self, request, context):
            self.asked.append(request.model)
            if request.model != name:
                context.abort(grpc.StatusCode.NOT_FOUND, f"no model named {request.model!r}")
            return pb.ModelInfo(name=name, classifier_sha256=self.sha256)

        def Assess(self, request, context):
            self.requests.append(request)
            scores = pb.Scores(in_distribution=0.25, ood=0.75)
            result = pb.ImageAssessment(predicted_class=2, verdict=pb.OOD, scores=scores)
            return pb.AssessResponse(results=[result] * len(request.images))

    fake = FakeGradProbe()
    fake.server = grpc.server(futures.ThreadPoolExecutor(2))
    pb_grpc.add_ReliabilityServicer_to_server(fake, fake.server)
    fake.target = f"127.0.0.1:{fake.server.add_insecure_port('127.0.0.1:0')}"
    fake.server.start()
    return fake


@pytest.fixture
def handler_module(sidecar, monkeypatch):
    for name in list(os.environ):
        if name.startswith("GRADPROBE_TS_"):
            monkeypatch.delenv(name)
    return importlib.import_module("gradprobe_handler")


def _user_model_dir(folder: Path, fmt: str) -> Path:
    """A model dir as `gradprobe fit` leaves it (the classifier and its manifest), without H."""
    from byom_models import make_model, save

    from detectors.model_dir import sha256_file
    from detectors.spec import MODEL_FILES, Manifest

    folder.mkdir(parents=True)
    model = make_model(classes=len(RGB_MANIFEST["classes"]))
    path = save(model, folder / MODEL_FILES[fmt], RGB_SHAPE)
    Manifest(
        architecture="tests.tiny_resnet",
        format=fmt,
        file=path.name,
        sha256=sha256_file(path),
        input_shape=list(RGB_SHAPE),
        input_dtype="float32",
        input_range=[0.0, 1.0],
        classes=RGB_MANIFEST["classes"],
        layers=[],
        normalization=RGB_MANIFEST["normalization"],
    ).write(folder)
    return folder


@pytest.mark.parametrize("fmt", ["torchscript", "torch.export"])
def test_handler_serves_a_user_model_archive_and_names_it_to_gradprobe(
    sidecar, handler_module, fmt, tmp_path
):
    """`gradprobe archive --model-dir` → the .mar's files → the handler, beside a GradProbe
    that answers only for the model named "signs"."""
    import torch
    from byom_models import make_model

    from detectors.spec import MODEL_FILES
    from service.cli import main

    model_dir = _user_model_dir(tmp_path / "signs-model", fmt)
    gradprobe = _fake_gradprobe(sidecar, "signs")
    gradprobe.sha256 = json.loads((model_dir / "manifest.json").read_text())["sha256"]
    store = tmp_path / "store"
    options = ["--mode", "gate", "--target", gradprobe.target, "--timeout-ms", "20000"]
    argv = ["archive", "--model-dir", str(model_dir), "--model", "signs", *options]
    assert main([*argv, "--export-path", str(store), "-q"]) == 0
    archive = zipfile.ZipFile(store / "signs-model.mar")  # named after the model dir
    assert {MODEL_FILES[fmt], "manifest.json", "gradprobe_handler.py"} <= set(archive.namelist())
    archive.extractall(tmp_path / "unpacked")
    config = yaml.safe_load((tmp_path / "unpacked" / "model-config.yaml").read_text())
    assert config["gradprobe"]["model"] == "signs"

    context = FakeContext(tmp_path / "unpacked", config)
    handler = handler_module.GradProbeHandler()
    handler.initialize(context)
    image = _rgb_image(3)
    rows = [
        {"data": _png(image)},
        {"body": {"pixels": image.tolist()}},
        {"data": _png(np.ascontiguousarray(image[:, :20]))},
    ]
    try:
        responses = handler.handle(rows, context)
    finally:
        handler.link.close()
        gradprobe.server.stop(0)

    pixels = torch.from_numpy(image.transpose(2, 0, 1)[None] / 255).float()
    mean = torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)
    std = torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    with torch.no_grad():
        model = make_model(classes=len(RGB_MANIFEST["classes"]))
        expected = torch.softmax(model((pixels - mean) / std), 1)[0].numpy()
        unnormalized = torch.softmax(model(pixels), 1)[0].numpy()
    assert not np.allclose(expected, unnormalized, atol=1e-3)  # normalization matters here
    for response in responses[:2]:
        np.testing.assert_allclose(response["probabilities"], expected, atol=1e-5)
        assert response["class_name"] == RGB_MANIFEST["classes"][int(expected.argmax())]
        reliability = response["reliability"]
        assert (reliability["status"], reliability["verdict"]) == ("ok", "ood")
        assert reliability["reliable"] is False
    assert "expected 24x20" in responses[2]["error"]
    assert context.statuses == {2: (400, responses[2]["error"])}
    # GradProbe was asked for "signs" and sent the [0, 1] pixels, not the normalized ones.
    assert gradprobe.asked == ["signs"]
    (request,) = gradprobe.requests
    assert request.model == "signs" and len(request.images) == 2
    for sent in request.images:
        assert list(sent.raw.shape) == list(RGB_SHAPE)
        received = np.frombuffer(sent.raw.data, dtype="<f4").reshape(RGB_SHAPE)
        np.testing.assert_allclose(received, pixels[0].numpy(), atol=1e-6)


def test_handler_refuses_an_archive_that_does_not_fit_its_manifest(handler_module, tmp_path):
    model_dir = _user_model_dir(tmp_path / "model", "torchscript")
    manifest = json.loads((model_dir / "manifest.json").read_text())
    fewer = {**manifest, "classes": manifest["classes"][:3]}
    (model_dir / "manifest.json").write_text(json.dumps(fewer))
    with pytest.raises(RuntimeError, match="lists 3 classes"):
        handler_module.GradProbeHandler().initialize(FakeContext(model_dir, {}))
    with (model_dir / manifest["file"]).open("ab") as altered:
        altered.write(b"\0")
    with pytest.raises(RuntimeError, match="the archive was altered"):
        handler_module.GradProbeHandler().initialize(FakeContext(model_dir, {}))
