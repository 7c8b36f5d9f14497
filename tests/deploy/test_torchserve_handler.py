"""The TorchServe handler's logic, imported as the archive lays it out, without TorchServe."""

from __future__ import annotations

import importlib
import io
import json
import sys

import numpy as np
import pytest
from grpc_support import free_port, sample_images, start_server
from PIL import Image


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory):
    from service.torchserve_archive import stage_handler

    folder = stage_handler(tmp_path_factory.mktemp("handler"))
    sys.path.insert(0, str(folder))
    try:
        yield importlib.import_module("gradprobe_sidecar")
    finally:
        sys.path.remove(str(folder))


def test_config_reads_yaml_then_environment(sidecar):
    config = sidecar.HandlerConfig.from_sources(
        {"mode": "gate", "timeout_ms": 100, "target": "gp:1"},
        {"GRADPROBE_TS_TIMEOUT_MS": "75.5", "GRADPROBE_TS_ON_UNRELIABLE": "refuse"},
    )
    assert (config.mode, config.target, config.timeout_ms) == ("gate", "gp:1", 75.5)
    assert config.on_unreliable == "refuse"
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


def test_decode_accepts_png_and_json_pixels_alike(sidecar):
    pixels = np.arange(28 * 28, dtype=np.uint16).reshape(28, 28) % 256
    image = pixels.astype(np.uint8)
    expected = (image.astype(np.float32) / 255)[None]
    from_png = sidecar.decode_request({"data": bytearray(_png(image))})
    from_rest_json = sidecar.decode_request({"body": {"pixels": image.tolist()}})
    from_grpc_json = sidecar.decode_request({"data": json.dumps({"pixels": image.tolist()})})
    from_floats = sidecar.decode_request({"body": {"pixels": (image / 255).tolist()}})
    for decoded in (from_png, from_rest_json, from_grpc_json, from_floats):
        assert decoded.shape == (1, 28, 28) and decoded.dtype == np.float32
        np.testing.assert_allclose(decoded, expected, atol=1e-6)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({}, "no image in the request"),
        ({"garbage": b""}, "only form fields ['garbage']"),
        ({"data": b"\x00\x01"}, "not a readable image"),
        ({"data": b"{oops"}, "not valid JSON"),
        ({"body": {"pixels": [[0.5] * 28] * 27}}, "has shape [27, 28]"),
        ({"body": {"pixels": [[-1] * 28] * 28}}, "range from -1"),
        ({"body": {"pixels": [[1.5] * 28] * 28}}, "floats in [0, 1]"),
        ({"body": {"pixels": [["a"] * 28] * 28}}, "not a grid of numbers"),
    ],
)
def test_decode_says_what_is_wrong(sidecar, row, message):
    with pytest.raises(sidecar.BadInput) as error:
        sidecar.decode_request(row)
    assert message in str(error.value)
    assert "expected" in str(error.value)


def test_link_refuses_a_gradprobe_serving_another_classifier(sidecar, assessor):
    server = start_server(assessor)
    try:
        images = sample_images(per_kind=1)
        config = sidecar.HandlerConfig(target=server.target, timeout_ms=30_000)
        link = sidecar.ReliabilityLink(config, assessor.classifier.manifest.sha256)
        answers = link.assess(images)
        offline = assessor.assess(images).assessments
        assert [a["verdict"] for a in answers] == [a.verdict for a in offline]
        link.close()
        other = sidecar.ReliabilityLink(config, "f" * 64)
        with pytest.raises(sidecar.ReliabilityUnavailable) as error:
            other.assess(images)
        other.close()
    finally:
        server.stop(0)
    message = str(error.value)
    assert assessor.classifier.manifest.sha256[:12] in message and "ffffffffffff" in message


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
