"""TLS, mutual TLS, bearer tokens and the identity allow-list, with real handshakes against real
servers on loopback, certificates made by the test (tests/support/tls_support.py)."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_support import sample_images, start_server
from tls_support import client_with_names

from service._proto.gradprobe.v1 import reliability_pb2 as pb
from service._proto.gradprobe.v1 import reliability_pb2_grpc as pb_grpc
from service.cli import build_parser, main
from service.client import ReliabilityClient, image_messages
from service.errors import MAX_MESSAGE_BYTES
from service.security import SecurityConfigError, load_security
from service.server import ReliabilityServer
from service.settings import Settings, SettingsError

pytestmark = pytest.mark.slow

TOKENS = ("first-token-0123456789abcdef", "second-token-0123456789abcdef")
# Sent by the refused calls: must never show up in the metrics.
WRONG_TOKEN = "wrong-token-leak-canary-0123456789"
ALLOWED_ELSEWHERE = "someone-else.gradprobe.test"


@pytest.fixture(scope="module")
def token_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("auth") / "tokens"
    path.write_text(f"# accepted bearer tokens\n\n{TOKENS[0]}\n  {TOKENS[1]}  \n")
    return path


@pytest.fixture(scope="module")
def tls_server(assessor, pki):
    """TLS only: any client that trusts the CA may call."""
    server = start_server(assessor, tls_cert=pki.server_cert, tls_key=pki.server_key)
    yield server
    server.stop(0)


@pytest.fixture(scope="module")
def guarded(assessor, pki, token_file):
    """Mutual TLS and bearer tokens, metrics and a plaintext health port."""
    server = start_server(
        assessor,
        tls_cert=pki.server_cert,
        tls_key=pki.server_key,
        tls_client_ca=pki.ca_cert,
        auth_token_file=token_file,
        metrics_port=0,
        health_port=0,
    )
    yield server
    server.stop(0)


@pytest.fixture(scope="module")
def allow_list_server(assessor, pki):
    """Mutual TLS with an allow-list that does not name the test client."""
    server = start_server(
        assessor,
        tls_cert=pki.server_cert,
        tls_key=pki.server_key,
        tls_client_ca=pki.ca_cert,
        tls_allowed_identities=(ALLOWED_ELSEWHERE,),
        metrics_port=0,
    )
    yield server
    server.stop(0)


@pytest.fixture(scope="module")
def images():
    return sample_images(per_kind=1)


def client_of(server, pki, *, cert: str = "client", token: str | None = TOKENS[0], **kwargs):
    """A client of ``server`` trusting the test CA; ``cert``: client, other or none."""
    files = {
        "client": (pki.client_cert, pki.client_key),
        "other": (pki.other_client_cert, pki.other_client_key),
        "none": (None, None),
    }[cert]
    return ReliabilityClient(
        server.target,
        timeout=10,
        wait_for_ready=False,
        tls_ca=pki.ca_cert,
        tls_cert=files[0],
        tls_key=files[1],
        token=token,
        **kwargs,
    )


def rpc_error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def requests_counted(server, code: str) -> dict[tuple[str, ...], float]:
    """gradprobe_requests_total series with ``code``, by their whole label set, from the
    metrics port."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(
        f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10
    ).read()
    assert WRONG_TOKEN.encode() not in text and TOKENS[0].encode() not in text
    counted = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            if sample.name == "gradprobe_requests_total" and sample.labels["code"] == code:
                counted[tuple(sorted(sample.labels.items()))] = sample.value
    return counted


# ----------------------------------------------------------------------------- TLS


def test_tls_call_works_and_plaintext_call_fails(tls_server, pki, images):
    with client_of(tls_server, pki, cert="none", token=None) as client:
        assert client.info()["input_shape"] == [1, 28, 28]
        assert len(client.assess(images)) == len(images)
    with ReliabilityClient(tls_server.target, timeout=10, wait_for_ready=False) as plaintext:
        assert rpc_error(plaintext.info).code() == grpc.StatusCode.UNAVAILABLE
    # A client that trusts another CA refuses the server's certificate.
    with ReliabilityClient(
        tls_server.target, timeout=10, wait_for_ready=False, tls_ca=pki.other_ca_cert
    ) as wary:
        assert rpc_error(wary.info).code() == grpc.StatusCode.UNAVAILABLE


def test_server_name_override_checks_the_name_the_certificate_carries(tls_server, pki):
    with client_of(tls_server, pki, cert="none", token=None, tls_server_name="localhost") as ok:
        assert ok.info()["classes"]
    with client_of(tls_server, pki, cert="none", token=None, tls_server_name="evil.test") as bad:
        assert rpc_error(bad.info).code() == grpc.StatusCode.UNAVAILABLE


# ----------------------------------------------------------------------------- mutual TLS


def test_mutual_tls_needs_a_client_certificate_the_ca_signed(guarded, pki, images):
    for cert in ("none", "other"):
        with client_of(guarded, pki, cert=cert) as client:
            assert rpc_error(client.info).code() == grpc.StatusCode.UNAVAILABLE, cert
    with client_of(guarded, pki) as client:
        answers = client.assess(images)
    assert [a["verdict"] for a in answers]
    assert len(answers) == len(images)


def test_allow_list_refuses_other_names_with_permission_denied(allow_list_server, pki):
    before = requests_counted(allow_list_server, "PERMISSION_DENIED")
    with client_of(allow_list_server, pki, token=None) as client:
        error = rpc_error(client.info)
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert pki.client_name in error.details() and "--tls-allowed-identities" in error.details()
    after = requests_counted(allow_list_server, "PERMISSION_DENIED")
    assert sum(after.values()) - sum(before.values()) == 1


def test_a_certificate_of_many_names_is_refused_with_a_short_message(allow_list_server, pki):
    """The refusal quoted every name of the certificate: percent-encoded in the status
    trailer ("%" takes 3 bytes there), 7 KB of names exceeded the client's metadata limit and
    the client saw RESOURCE_EXHAUSTED. (A larger certificate fails the handshake itself.)"""
    names = [f"{i:03d}-{'%' * 60}.gradprobe.test" for i in range(90)]
    cert, key = client_with_names(pki, "000-many-names.gradprobe.test", names, "many-names")
    with ReliabilityClient(
        allow_list_server.target,
        timeout=10,
        wait_for_ready=False,
        tls_ca=pki.ca_cert,
        tls_cert=cert,
        tls_key=key,
    ) as client:
        error = rpc_error(client.info)
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED, error.details()
    assert "000-many-names.gradprobe.test" in error.details()
    assert f"and {len(names) + 1 - 5} more" in error.details()
    assert len(error.details().encode()) <= MAX_MESSAGE_BYTES


def test_allow_list_admits_the_names_it_holds(assessor, pki):
    server = start_server(
        assessor,
        tls_cert=pki.server_cert,
        tls_key=pki.server_key,
        tls_client_ca=pki.ca_cert,
        tls_allowed_identities=(ALLOWED_ELSEWHERE, pki.client_name),
    )
    try:
        with client_of(server, pki, token=None) as client:
            assert client.info()["classes"]
    finally:
        server.stop(0)


# ----------------------------------------------------------------------------- tokens


@pytest.mark.parametrize(
    ("metadata", "says"),
    [
        ((), "send the metadata `authorization: Bearer <token>`"),
        ((("authorization", f"Bearer {WRONG_TOKEN}"),), "not one this server accepts"),
        ((("authorization", f"Basic {TOKENS[0]}"),), "must read `Bearer <token>`"),
        ((("authorization", TOKENS[0]),), "must read `Bearer <token>`"),
        ((("authorization", "Bearer"),), "one or more spaces, then the token"),
        ((("authorization", f"Bearer{TOKENS[0]}"),), "one or more spaces, then the token"),
    ],
    ids=["missing", "wrong", "other-scheme", "no-scheme", "no-token", "no-space"],
)
def test_calls_without_an_accepted_token_are_unauthenticated(guarded, pki, metadata, says):
    with client_of(guarded, pki, token=None) as client:
        stub = pb_grpc.ReliabilityStub(client.channel)
        error = rpc_error(
            lambda: stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10, metadata=metadata)
        )
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert says in error.details()


def test_every_accepted_token_answers_and_the_scheme_is_case_insensitive(guarded, pki, images):
    for token in TOKENS:
        with client_of(guarded, pki, token=token) as client:
            assert client.predict(images).shape == (len(images), 10)
    with client_of(guarded, pki, token=None) as client:
        stub = pb_grpc.ReliabilityStub(client.channel)
        lower = (("authorization", f"bearer {TOKENS[1]}"),)
        assert stub.ListModels(pb.ListModelsRequest(), timeout=10, metadata=lower).models
        # One or more spaces after the scheme, as RFC 6750 and the refusal's message say.
        spaced = (("authorization", f"Bearer   {TOKENS[0]}"),)
        assert stub.ListModels(pb.ListModelsRequest(), timeout=10, metadata=spaced).models


def test_streams_need_the_token_too(guarded, pki, images):
    with client_of(guarded, pki, token=None) as client:
        error = rpc_error(lambda: list(client.stream([images])))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    with client_of(guarded, pki) as client:
        assert [len(batch) for batch in client.stream([images, images[:1]])] == [len(images), 1]


def test_health_needs_no_token_and_reflection_does(guarded, pki):
    with client_of(guarded, pki, token=None) as client:
        health = health_pb2_grpc.HealthStub(client.channel)
        answer = health.Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(client.channel)
        ask = reflection_pb2.ServerReflectionRequest(list_services="")
        error = rpc_error(lambda: list(reflection.ServerReflectionInfo(iter([ask]), timeout=10)))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        metadata = (("authorization", f"Bearer {TOKENS[0]}"),)
        (listed,) = reflection.ServerReflectionInfo(iter([ask]), timeout=10, metadata=metadata)
    names = {s.name for s in listed.list_services_response.service}
    assert "gradprobe.v1.Reliability" in names


def test_plaintext_health_port_serves_health_alone(guarded):
    channel = grpc.insecure_channel(f"127.0.0.1:{guarded.health_port}")
    try:
        answer = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=10
        )
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        stub = pb_grpc.ReliabilityStub(channel)
        error = rpc_error(lambda: stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10))
        assert error.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        channel.close()


def test_refused_calls_are_counted_without_request_data(guarded, pki, images):
    before = requests_counted(guarded, "UNAUTHENTICATED")
    with client_of(guarded, pki, token=WRONG_TOKEN) as client:
        stub = pb_grpc.ReliabilityStub(client.channel)
        request = pb.AssessRequest(
            images=image_messages(images), model="client-chosen-name", request_id="req-canary"
        )
        metadata = (("authorization", f"Bearer {WRONG_TOKEN}"),)
        for _ in range(2):
            error = rpc_error(lambda: stub.Assess(request, timeout=10, metadata=metadata))
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        assert rpc_error(client.info).code() == grpc.StatusCode.UNAUTHENTICATED
    after = requests_counted(guarded, "UNAUTHENTICATED")
    served = guarded.servicer.models.keys() | {"unknown"}
    for labels in after:
        assert dict(labels).keys() == {"model", "method", "code"}
        assert dict(labels)["model"] in served  # never the request's model field
    gained = {
        dict(labels)["method"]: value - before.get(labels, 0.0) for labels, value in after.items()
    }
    assert gained.get("Assess") == 2 and gained.get("GetModelInfo") == 1


# ----------------------------------------------------------------------------- configuration


def settings_for(pki, **values) -> Settings:
    return Settings(port=0, metrics_port=-1, **values)


@pytest.mark.parametrize(
    ("values", "says"),
    [
        (lambda p: {"tls_cert": p.server_cert}, "tls_cert and tls_key go together"),
        (lambda p: {"tls_key": p.server_key}, "tls_cert and tls_key go together"),
        (lambda p: {"tls_client_ca": p.ca_cert}, "needs TLS"),
        (
            lambda p: {
                "tls_cert": p.server_cert,
                "tls_key": p.server_key,
                "tls_allowed_identities": ("x",),
            },
            "give --tls-client-ca too",
        ),
    ],
    ids=["cert-without-key", "key-without-cert", "ca-without-tls", "identities-without-mtls"],
)
def test_incomplete_tls_settings_are_refused(pki, values, says):
    with pytest.raises(SettingsError, match=says):
        settings_for(pki, **values(pki))


def _write(pki, name: str, text: str) -> Path:
    path = pki.directory / name
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("values", "file", "says"),
    [
        (
            lambda p: {"tls_cert": p.directory / "absent.crt", "tls_key": p.server_key},
            "absent.crt",
            "cannot read it",
        ),
        (
            lambda p: {"tls_cert": p.server_cert, "tls_key": p.client_key},
            "client.key",
            "is not the private key of --tls-cert",
        ),
        (
            lambda p: {"tls_cert": _write(p, "junk.crt", "not a cert"), "tls_key": p.server_key},
            "junk.crt",
            "holds no PEM certificate",
        ),
        (
            lambda p: {"tls_cert": p.server_cert, "tls_key": p.server_cert},
            "server.crt",
            "holds no PEM private key",
        ),
        (
            lambda p: {
                "tls_cert": p.server_cert,
                "tls_key": p.server_key,
                "tls_client_ca": _write(p, "junk-ca.crt", "-----BEGIN CERTIFICATE-----\nxx\n"),
            },
            "junk-ca.crt",
            "no usable PEM CA certificate",
        ),
        (
            lambda p: {"auth_token_file": _write(p, "empty-tokens", "# none yet\n\n")},
            "empty-tokens",
            "holds no token",
        ),
        (
            lambda p: {"auth_token_file": _write(p, "short-tokens", "secret\n")},
            "short-tokens",
            "openssl rand -hex 32",
        ),
    ],
    ids=["unreadable", "key-mismatch", "not-pem", "key-not-pem", "bad-ca", "no-token", "short"],
)
def test_bad_files_fail_at_start_naming_the_file(pki, values, file, says):
    settings = settings_for(pki, **values(pki))
    with pytest.raises(SecurityConfigError) as caught:
        ReliabilityServer(settings)
    assert file in str(caught.value) and says in str(caught.value)


def test_serve_reports_a_bad_key_in_one_line_before_loading_models(pki, capsys):
    # The mismatch is caught before the models load (there is no model dir to load here).
    status = main(
        ["serve", "--port", "0", "--tls-cert", str(pki.server_cert),
         "--tls-key", str(pki.client_key), "--model-dir", str(pki.directory / "no-such-model")]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert status == 2
    assert "gradprobe serve: error:" in err and "client.key" in err
    assert "Traceback" not in err


def test_serve_flags_and_environment_fill_the_security_settings(tmp_path):
    args = build_parser().parse_args(
        ["serve", "--tls-cert", "s.crt", "--tls-key", "s.key", "--tls-client-ca", "ca.crt",
         "--tls-allowed-identities", "a.test", "--tls-allowed-identities", "b.test, c.test",
         "--auth-token-file", "tokens", "--health-port", "50052"]
    )  # fmt: skip
    settings = Settings.from_sources(args, env={})
    assert (settings.tls_cert, settings.tls_key) == (Path("s.crt"), Path("s.key"))
    assert settings.tls_client_ca == Path("ca.crt")
    # Repeated or comma-separated, as the environment takes them.
    assert settings.tls_allowed_identities == ("a.test", "b.test", "c.test")
    assert (settings.auth_token_file, settings.health_port) == (Path("tokens"), 50052)
    env = {
        "GRADPROBE_TLS_CERT": "/etc/gradprobe/tls/tls.crt",
        "GRADPROBE_TLS_KEY": "/etc/gradprobe/tls/tls.key",
        "GRADPROBE_TLS_CLIENT_CA": "/etc/gradprobe/tls/ca.crt",
        "GRADPROBE_TLS_ALLOWED_IDENTITIES": "a.test, b.test",
        "GRADPROBE_AUTH_TOKEN_FILE": "/etc/gradprobe/auth/tokens",
        "GRADPROBE_HEALTH_PORT": "50052",
    }
    from_env = Settings.from_sources(env=env)
    assert from_env.tls_key == Path("/etc/gradprobe/tls/tls.key")
    assert from_env.tls_allowed_identities == ("a.test", "b.test")
    assert from_env.health_port == 50052
    assert Settings.from_sources(env={}).tls_cert is None
    # No files were needed to parse them; reading them is the server's start.
    with pytest.raises(SecurityConfigError, match=r"s\.crt"):
        load_security(settings)


# ----------------------------------------------------------------------------- clients


def test_cli_assess_reaches_a_guarded_server(guarded, pki, token_file, tmp_path, capsys):
    batch = tmp_path / "batch.npy"
    np.save(batch, sample_images(per_kind=1))
    tls = ["--tls-ca", str(pki.ca_cert), "--tls-cert", str(pki.client_cert),
           "--tls-key", str(pki.client_key)]  # fmt: skip
    command = ["assess", "--server", guarded.target, "--images", str(batch), *tls]
    assert main([*command, "--token-file", str(token_file)]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert len(rows) == 3 and '"verdict"' in rows[0]

    assert main(command) == 1
    err = capsys.readouterr().err
    assert "UNAUTHENTICATED" in err and "--token-file" in err


def test_cli_assess_takes_the_token_from_the_environment(
    guarded, pki, tmp_path, capsys, monkeypatch
):
    batch = tmp_path / "batch.npy"
    np.save(batch, sample_images(per_kind=1)[:1])
    monkeypatch.setenv("GRADPROBE_TOKEN", TOKENS[1])
    status = main(
        ["assess", "--server", guarded.target, "--images", str(batch), "--tls-ca",
         str(pki.ca_cert), "--tls-cert", str(pki.client_cert), "--tls-key", str(pki.client_key)]
    )  # fmt: skip
    assert status == 0 and len(capsys.readouterr().out.splitlines()) == 1


def test_cli_assess_says_which_client_file_is_missing(tmp_path, capsys):
    batch = tmp_path / "batch.npy"
    np.save(batch, np.zeros((1, 1, 28, 28), np.float32))
    missing = tmp_path / "absent-ca.crt"
    status = main(
        ["assess", "--server", "127.0.0.1:1", "--images", str(batch), "--tls-ca", str(missing)]
    )
    err = capsys.readouterr().err
    assert status == 2 and "absent-ca.crt" in err and "cannot read it" in err
