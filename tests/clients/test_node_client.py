"""The Node client (clients/node), built at run time from proto/ alone, against the real server:
the .proto is the contract, not the Python client."""

from __future__ import annotations

import io
import json
import os
import secrets
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from grpc_support import sample_images, start_server
from PIL import Image

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
NODE_CLIENT = REPO / "clients" / "node"


@pytest.fixture(scope="module")
def node() -> str:
    # CI runs `make test`, which installs these first; a missing install is a failure to fix,
    # not a reason to skip the only check that the .proto alone suffices.
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not installed: run `make setup` (it installs nodejs and npm)")
    if not (NODE_CLIENT / "node_modules" / "@grpc" / "grpc-js").is_dir():
        pytest.fail("clients/node/node_modules is missing: run `make setup` (it runs npm ci)")
    return node


@pytest.fixture(scope="module")
def server(assessor):
    server = start_server(assessor)
    yield server
    server.stop(0)


@pytest.fixture(scope="module")
def images():
    return sample_images(per_kind=2)


def run_cli(
    node: str, *args: str, stdin: str | None = None, token: str | None = None
) -> tuple[int, list[dict]]:
    """Runs cli.js; its exit status and the JSON lines it printed."""
    env = {k: v for k, v in os.environ.items() if k not in ("GRADPROBE_TOKEN", "GRADPROBE_TARGET")}
    if token is not None:
        env["GRADPROBE_TOKEN"] = token
    # The timeout only keeps a hung client from hanging the suite.
    done = subprocess.run(
        [node, str(NODE_CLIENT / "cli.js"), *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode in (0, 2), done.stderr  # 2: a call failed, reported as JSON
    return done.returncode, [json.loads(line) for line in done.stdout.splitlines()]


def save_npy(folder: Path, images: np.ndarray, name: str = "image") -> list[str]:
    paths = []
    for i, image in enumerate(images):
        path = folder / f"{name}{i}.npy"
        np.save(path, image)
        paths.append(str(path))
    return paths


def save_png(folder: Path, pixels: np.ndarray) -> list[str]:
    paths = []
    for i, image in enumerate(pixels):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        path = folder / f"png{i}.png"
        path.write_bytes(buffer.getvalue())
        paths.append(str(path))
    return paths


def check_matches_core(results: list[dict], expected) -> None:
    """Node's ImageAssessment messages (proto field names, enum names) against the core."""
    assert [r["predicted_class"] for r in results] == [e.prediction for e in expected.assessments]
    assert [r["verdict"].lower() for r in results] == [e.verdict for e in expected.assessments]
    for r, e in zip(results, expected.assessments, strict=True):
        assert r["scores"] == pytest.approx(e.scores, abs=1e-4)
        assert r["probabilities"] == pytest.approx(e.probabilities.tolist(), abs=1e-4)


def test_assess_raw_float_pixels_equals_the_core(node, server, assessor, images, tmp_path):
    files = save_npy(tmp_path, images)  # float32 (1, 28, 28) each: the model's [C, H, W]
    code, (response,) = run_cli(
        node, "--target", server.target, "assess", "--request-id", "raw-1", *files
    )
    assert code == 0, response
    assert response["request_id"] == "raw-1"
    check_matches_core(response["results"], assessor.assess(images))
    assert len({r["verdict"] for r in response["results"]}) > 1  # the sample really differs
    first = response["results"][0]
    assert first["predicted_name"] == assessor.classes[first["predicted_class"]]


def test_assess_png_and_uint8_pixels_equal_the_core(node, server, assessor, images, tmp_path):
    pixels = np.round(images[:3, 0] * 255).astype(np.uint8)
    expected = assessor.assess(pixels[:, None].astype(np.float32) / np.float32(255))
    for files in (save_png(tmp_path, pixels), save_npy(tmp_path, pixels, "uint8_")):
        code, (response,) = run_cli(
            node, "--target", server.target, "assess", "--request-id", "png-2", *files
        )
        assert code == 0, response
        assert response["request_id"] == "png-2"
        check_matches_core(response["results"], expected)


def test_stream_answers_each_request_in_order(node, server, assessor, images, tmp_path):
    files = save_npy(tmp_path, images)
    bad = tmp_path / "bad.npy"
    np.save(bad, np.full((1, 28, 28), 2.0, np.float32))  # outside [0, 1]
    batches = {"a": [0], "b": [1, 2], "c": None, "d": [3], "e": [4, 5]}
    lines = [
        json.dumps(
            {"request_id": rid, "images": [str(bad)] if at is None else [files[i] for i in at]}
        )
        for rid, at in batches.items()
    ]
    code, responses = run_cli(node, "--target", server.target, "stream", stdin="\n".join(lines))
    assert code == 0, responses
    assert [r["request_id"] for r in responses] == list(batches)
    for response, at in zip(responses, batches.values(), strict=True):
        if at is None:  # the bad request gets an error, and the stream goes on
            assert response["results"] == []
            assert response["error"]["code"] == 3  # INVALID_ARGUMENT
            assert "[0, 1]" in response["error"]["message"]
        else:
            assert response["error"] is None
            check_matches_core(response["results"], assessor.assess(images[at]))


def test_model_info_and_list_models(node, server, assessor):
    code, (info,) = run_cli(node, "--target", server.target, "info")
    assert code == 0, info
    assert info["input_shape"] == [1, 28, 28]
    assert info["classes"] == assessor.classes
    assert info["verdicts"] == ["in_distribution", "ood", "corrupted", "adversarial"]
    assert info["detector_sha256"] == assessor.detector.sha256
    assert info["classifier_sha256"] == assessor.classifier.manifest.sha256
    code, (listing,) = run_cli(node, "--target", server.target, "models")
    assert code == 0, listing
    assert listing["models"] == [info]


def test_a_wrong_shape_is_invalid_argument_with_the_message(node, server, tmp_path):
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.zeros((28, 27), np.float32))
    code, (answer,) = run_cli(node, "--target", server.target, "assess", str(wrong))
    assert code == 2
    assert answer["error"]["code_name"] == "INVALID_ARGUMENT"
    assert "shape is [28, 27]" in answer["error"]["details"]


def test_health_is_serving(node, server):
    for service in ("", "gradprobe.v1.Reliability"):
        code, (answer,) = run_cli(node, "--target", server.target, "health", service)
        assert code == 0, answer
        assert answer == {"status": "SERVING"}


# ----------------------------------------------------------------------------- TLS, tokens


@pytest.fixture(scope="module")
def token_file(tmp_path_factory) -> Path:
    from tls_support import write_tokens

    return write_tokens(tmp_path_factory.mktemp("token") / "tokens", secrets.token_hex(32))


@pytest.fixture(scope="module")
def tls_server(assessor, pki, token_file):
    """Server-authenticated TLS with bearer tokens, as a cluster would run it."""
    server = start_server(
        assessor, tls_cert=pki.server_cert, tls_key=pki.server_key, auth_token_file=token_file
    )
    yield server
    server.stop(0)


@pytest.fixture(scope="module")
def mtls_server(assessor, pki):
    server = start_server(
        assessor, tls_cert=pki.server_cert, tls_key=pki.server_key, tls_client_ca=pki.ca_cert
    )
    yield server
    server.stop(0)


def test_tls_with_a_bearer_token_assesses_and_streams(
    node, tls_server, pki, token_file, assessor, images, tmp_path
):
    files = save_npy(tmp_path, images[:3])
    tls = ("--target", tls_server.target, "--ca", str(pki.ca_cert))
    code, (response,) = run_cli(
        node, *tls, "--token-file", str(token_file), "assess", "--request-id", "t1", *files
    )
    assert code == 0, response
    assert response["request_id"] == "t1"
    check_matches_core(response["results"], assessor.assess(images[:3]))
    # A stream carries the token once, on the call.
    ids = ["x", "y", "z"]
    lines = [json.dumps({"request_id": i, "images": [f]}) for i, f in zip(ids, files, strict=True)]
    code, responses = run_cli(
        node, *tls, "--token-file", str(token_file), "stream", stdin="\n".join(lines)
    )
    assert code == 0, responses
    assert [r["request_id"] for r in responses] == ids
    assert [len(r["results"]) for r in responses] == [1, 1, 1]


def test_without_the_right_token_calls_are_unauthenticated(node, tls_server, pki):
    tls = ("--target", tls_server.target, "--ca", str(pki.ca_cert))
    code, (answer,) = run_cli(node, *tls, "info")
    assert code == 2
    assert answer["error"]["code_name"] == "UNAUTHENTICATED"
    assert "authorization: Bearer <token>" in answer["error"]["details"]
    code, (answer,) = run_cli(node, *tls, "info", token=secrets.token_hex(32))
    assert code == 2
    assert answer["error"]["code_name"] == "UNAUTHENTICATED"
    assert "not one this server accepts" in answer["error"]["details"]
    # Health is exempt from tokens: probes carry none.
    assert run_cli(node, *tls, "health") == (0, [{"status": "SERVING"}])


def test_tls_needs_the_servers_ca(node, tls_server, pki, token_file):
    for ca in ((), ("--ca", str(pki.other_ca_cert))):  # plaintext, or an unrelated CA
        code, (answer,) = run_cli(
            node, "--target", tls_server.target, *ca, "--token-file", str(token_file), "info"
        )
        assert code == 2
        assert answer["error"]["code_name"] == "UNAVAILABLE"


def test_mutual_tls_needs_a_client_certificate_the_ca_signed(node, mtls_server, pki, assessor):
    tls = ("--target", mtls_server.target, "--ca", str(pki.ca_cert))
    mine = ("--cert", str(pki.client_cert), "--key", str(pki.client_key))
    code, (info,) = run_cli(node, *tls, *mine, "info")
    assert code == 0, info
    assert info["classes"] == assessor.classes
    assert run_cli(node, *tls, *mine, "health") == (0, [{"status": "SERVING"}])
    other = ("--cert", str(pki.other_client_cert), "--key", str(pki.other_client_key))
    for credentials in ((), other):  # none, or one from a CA the server does not trust
        code, (answer,) = run_cli(node, *tls, *credentials, "info")
        assert code == 2
        assert answer["error"]["code_name"] == "UNAVAILABLE"
