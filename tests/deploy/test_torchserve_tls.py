"""The TorchServe handler's link to GradProbe over mutual TLS with a bearer token, against a
real server on loopback (certificates from tests/support/tls_support.py)."""

from __future__ import annotations

import importlib
import sys

import pytest
from grpc_support import sample_images, start_server
from tls_support import write_tokens

pytestmark = pytest.mark.slow

TOKEN = "handler-token-0123456789abcdef"


@pytest.fixture(scope="module")
def token_file(tmp_path_factory):
    return write_tokens(tmp_path_factory.mktemp("auth") / "tokens", TOKEN)


@pytest.fixture(scope="module")
def guarded(assessor, pki, token_file):
    server = start_server(
        assessor,
        tls_cert=pki.server_cert,
        tls_key=pki.server_key,
        tls_client_ca=pki.ca_cert,
        auth_token_file=token_file,
    )
    yield server
    server.stop(0)


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory):
    from service.torchserve_archive import stage_handler

    folder = stage_handler(tmp_path_factory.mktemp("handler"))
    sys.path.insert(0, str(folder))
    try:
        yield importlib.import_module("gradprobe_sidecar")
    finally:
        sys.path.remove(str(folder))


def _environ(server, pki, token_file) -> dict[str, str]:
    return {
        # Dialled by IP, checked for the name the certificate carries: as in the pod.
        "GRADPROBE_TS_TARGET": server.target,
        "GRADPROBE_TS_TLS_SERVER_NAME": "localhost",
        "GRADPROBE_TS_TIMEOUT_MS": "10000",
        "GRADPROBE_TS_TLS_CA": str(pki.ca_cert),
        "GRADPROBE_TS_TLS_CERT": str(pki.client_cert),
        "GRADPROBE_TS_TLS_KEY": str(pki.client_key),
        "GRADPROBE_TS_TOKEN_FILE": str(token_file),
    }


def _assess(sidecar, environ, sha256):
    link = sidecar.ReliabilityLink(sidecar.HandlerConfig.from_sources(None, environ), sha256)
    try:
        return link.assess(sample_images(per_kind=1))
    finally:
        link.close()


def test_link_speaks_mutual_tls_with_a_token(guarded, pki, token_file, assessor, sidecar):
    sha256 = assessor.classifier.manifest.sha256
    results = _assess(sidecar, _environ(guarded, pki, token_file), sha256)
    assert len(results) == 3
    assert {r["verdict"] for r in results} <= {"in_distribution", "ood", "corrupted", "adversarial"}


@pytest.mark.parametrize(
    ("dropped", "says"),
    [
        (("GRADPROBE_TS_TOKEN_FILE",), "UNAUTHENTICATED"),
        (("GRADPROBE_TS_TLS_CERT", "GRADPROBE_TS_TLS_KEY"), "UNAVAILABLE"),
    ],
    ids=["no-token", "no-client-certificate"],
)
def test_link_without_token_or_certificate_is_refused(
    guarded, pki, token_file, assessor, sidecar, dropped, says
):
    environ = {k: v for k, v in _environ(guarded, pki, token_file).items() if k not in dropped}
    with pytest.raises(sidecar.ReliabilityUnavailable, match=says):
        _assess(sidecar, environ, assessor.classifier.manifest.sha256)


def test_handler_tls_settings_are_checked(sidecar, pki, tmp_path):
    with pytest.raises(sidecar.ConfigError, match="go together"):
        sidecar.HandlerConfig.from_sources(None, {"GRADPROBE_TS_TLS_CERT": str(pki.client_cert)})
    absent = sidecar.HandlerConfig.from_sources(
        None, {"GRADPROBE_TS_TLS_CA": str(tmp_path / "absent.crt")}
    )
    with pytest.raises(sidecar.ConfigError, match=r"GRADPROBE_TS_TLS_CA=.*absent\.crt"):
        sidecar.ReliabilityLink(absent, "0" * 64)
    empty = tmp_path / "empty-token"
    empty.write_text("# nothing\n")
    no_token = sidecar.HandlerConfig.from_sources(None, {"GRADPROBE_TS_TOKEN_FILE": str(empty)})
    with pytest.raises(sidecar.ConfigError, match="holds no token"):
        sidecar.ReliabilityLink(no_token, "0" * 64)
