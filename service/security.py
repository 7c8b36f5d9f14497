"""Transport security and access for the gRPC port: TLS, mutual TLS, bearer tokens and an
allow-list of client-certificate identities.

Every file is read once, when the server is built (``load_security``), and checked there with
the standard library's ``ssl`` so that a bad configuration fails at start with the file named
and the fix said, not at the first handshake. The per-call checks live in
``AccessInterceptor``, composed after ``service.errors.StatusInterceptor`` so that refused
Reliability calls are still counted by status (UNAUTHENTICATED, PERMISSION_DENIED) with no
request data in any label.

Exempt from the per-call checks: ``grpc.health.v1.Health`` (probes and load balancers carry no
token). Server reflection is *not* exempt: it describes the API to whoever asks, and the
people who use it (grpcurl, Postman) can send a token (``grpcurl -H 'authorization: Bearer
…'``). Mutual TLS is a property of the connection, so with it every service, health too,
needs a client certificate; ``--health-port`` serves health alone, in plaintext, for probes.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import ssl
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from service.errors import echo
from service.settings import Settings, SettingsError

log = logging.getLogger("gradprobe.security")

HEALTH_SERVICE = "grpc.health.v1.Health"
EXEMPT_SERVICES = (HEALTH_SERVICE,)
AUTHORIZATION = "authorization"
BEARER = "bearer"
IDENTITIES_SHOWN = 5  # client certificate names quoted in a PERMISSION_DENIED message
# Below this, a token can be guessed; `openssl rand -hex 32` gives 64 characters.
MIN_TOKEN_CHARS = 16
TOKEN_HINT = "make one with `openssl rand -hex 32`"
MISSING_TOKEN = (
    "this server requires a bearer token: send the metadata `authorization: Bearer <token>` "
    "with a token listed in the server's --auth-token-file (gradprobe assess: --token-file or "
    "$GRADPROBE_TOKEN)"
)
MALFORMED_TOKEN = (
    "the `authorization` metadata must read `Bearer <token>`: the scheme Bearer (in any case), "
    "one or more spaces, then the token"
)
WRONG_TOKEN = (
    "the bearer token is not one this server accepts: send a token listed in the server's "
    "--auth-token-file (tokens are compared whole, case-sensitive)"
)


class SecurityConfigError(SettingsError):
    """A TLS or token setting the server cannot start with; the message names the file."""


# ----------------------------------------------------------------------------- files


def read_tokens(path: Path, what: str = "--auth-token-file") -> list[str]:
    """The tokens of a token file: one a line; blank lines and ``#`` comments are skipped."""
    text = _read(path, what).decode("utf-8", errors="replace")
    tokens = []
    for number, line in enumerate(text.splitlines(), start=1):
        token = line.strip()
        if not token or token.startswith("#"):
            continue
        # Metadata values are printable ASCII; a space would split `Bearer <token>`.
        if not token.isascii() or not token.isprintable() or any(c.isspace() for c in token):
            raise SecurityConfigError(
                f"{what} {path}, line {number}: a token must be printable ASCII without "
                f"spaces; {TOKEN_HINT}"
            )
        if len(token) < MIN_TOKEN_CHARS:
            raise SecurityConfigError(
                f"{what} {path}, line {number}: the token has {len(token)} characters; use at "
                f"least {MIN_TOKEN_CHARS} ({TOKEN_HINT})"
            )
        tokens.append(token)
    if not tokens:
        raise SecurityConfigError(
            f"{what} {path} holds no token (one a line; # starts a comment): add one, {TOKEN_HINT}"
        )
    return tokens


def _read(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise SecurityConfigError(
            f"{what} {path}: cannot read it ({reason}); check the path (a Kubernetes secret is "
            "mounted as files: see deploy/k8s/README.md) and that this user may read it"
        ) from None


def _refuse_encrypted(key: Path) -> Callable[[], bytes]:
    def password() -> bytes:
        raise SecurityConfigError(
            f"--tls-key {key} is encrypted; gRPC reads unencrypted PEM keys: decrypt it "
            f"(openssl pkey -in {key} -out server.key) and keep it in a secret instead"
        )

    return password


def _check_pair(cert: Path, key: Path, cert_pem: bytes, key_pem: bytes) -> None:
    if b"-----BEGIN CERTIFICATE-----" not in cert_pem:
        raise SecurityConfigError(
            f"--tls-cert {cert} holds no PEM certificate (-----BEGIN CERTIFICATE-----); give "
            "the PEM certificate chain, the server's certificate first"
        )
    if b"PRIVATE KEY-----" not in key_pem:
        raise SecurityConfigError(
            f"--tls-key {key} holds no PEM private key (-----BEGIN ... PRIVATE KEY-----); give "
            "the key of --tls-cert"
        )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key, password=_refuse_encrypted(key))
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc):
            raise SecurityConfigError(
                f"--tls-key {key} is not the private key of --tls-cert {cert}: give the key "
                "the certificate was issued for (both come from one secret: tls.key, tls.crt)"
            ) from None
        raise SecurityConfigError(
            f"cannot use --tls-cert {cert} with --tls-key {key}: {exc.reason or exc}; give a "
            "PEM certificate chain and its unencrypted PEM key"
        ) from None


def _check_ca(path: Path, pem: bytes, what: str) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_verify_locations(cadata=pem.decode("ascii", errors="replace"))
    except (ssl.SSLError, ValueError) as exc:
        raise SecurityConfigError(
            f"{what} {path} holds no usable PEM CA certificate ({exc}); give the CA that signs "
            "the client certificates (ca.crt of the secret)"
        ) from None


# ----------------------------------------------------------------------------- the whole


@dataclass(frozen=True)
class Security:
    """What ``load_security`` read: the port's credentials (None: plaintext) and the
    per-call checks."""

    credentials: grpc.ServerCredentials | None
    token_digests: tuple[bytes, ...] = ()
    identities: frozenset[str] = frozenset()
    mutual_tls: bool = False

    @property
    def tls(self) -> bool:
        return self.credentials is not None

    def interceptors(self, exempt: Sequence[str] = EXEMPT_SERVICES) -> list[grpc.ServerInterceptor]:
        """What to put after ``StatusInterceptor`` (nothing when no per-call check is on)."""
        if not self.token_digests and not self.identities:
            return []
        return [AccessInterceptor(self.token_digests, self.identities, exempt)]

    def describe(self) -> str:
        parts = ["mTLS" if self.mutual_tls else "TLS" if self.tls else "plaintext"]
        if self.identities:
            parts.append(f"{len(self.identities)} allowed identities")
        if self.token_digests:
            parts.append(f"bearer tokens ({len(self.token_digests)})")
        return ", ".join(parts)


def load_security(settings: Settings) -> Security:
    """Read and check the settings' TLS and token files; ``SecurityConfigError`` names the
    file and the fix."""
    credentials = None
    if settings.tls_cert is not None and settings.tls_key is not None:
        cert_pem = _read(settings.tls_cert, "--tls-cert")
        key_pem = _read(settings.tls_key, "--tls-key")
        _check_pair(settings.tls_cert, settings.tls_key, cert_pem, key_pem)
        client_ca = None
        if settings.tls_client_ca is not None:
            client_ca = _read(settings.tls_client_ca, "--tls-client-ca")
            _check_ca(settings.tls_client_ca, client_ca, "--tls-client-ca")
        credentials = grpc.ssl_server_credentials(
            [(key_pem, cert_pem)],
            root_certificates=client_ca,
            require_client_auth=client_ca is not None,
        )
    digests: tuple[bytes, ...] = ()
    if settings.auth_token_file is not None:
        digests = tuple(_digest(t) for t in read_tokens(settings.auth_token_file))
        if credentials is None:
            log.warning(
                "bearer tokens without TLS travel in clear text: set --tls-cert and --tls-key "
                "unless every client reaches this port over loopback"
            )
    return Security(
        credentials=credentials,
        token_digests=digests,
        identities=frozenset(settings.tls_allowed_identities),
        mutual_tls=settings.tls_client_ca is not None,
    )


def _digest(token: str) -> bytes:
    # Equal-length digests: compare_digest then takes the same time whatever was sent.
    return hashlib.sha256(token.encode()).digest()


# ----------------------------------------------------------------------------- per call


def token_problem(metadata: Iterable[tuple[str, Any]] | None, digests: Sequence[bytes]) -> str:
    """Why a call's ``authorization`` metadata is refused; "" when it carries an accepted
    token."""
    values = [value for key, value in metadata or () if key == AUTHORIZATION]
    if not values:
        return MISSING_TOKEN
    value = values[0] if isinstance(values[0], str) else values[0].decode("ascii", "replace")
    # RFC 6750: the scheme, one or more spaces, the token (as MALFORMED_TOKEN says).
    scheme, _, token = value.strip().partition(" ")
    token = token.lstrip(" ")
    if scheme.lower() != BEARER or not token:
        return MALFORMED_TOKEN
    presented = _digest(token)
    accepted = False
    for digest in digests:  # all of them, so the time says nothing about which matched
        accepted |= hmac.compare_digest(digest, presented)
    return "" if accepted else WRONG_TOKEN


def peer_identities(context: grpc.ServicerContext) -> set[str]:
    """The client certificate's names: its SAN entries and its CN."""
    auth = context.auth_context()
    names = auth.get("x509_subject_alternative_name", []) + auth.get("x509_common_name", [])
    return {n.decode() if isinstance(n, bytes) else n for n in names}


class AccessInterceptor(grpc.ServerInterceptor):
    """Refuses calls without an accepted bearer token (UNAUTHENTICATED) and, with an
    allow-list, calls whose client certificate names none of its identities
    (PERMISSION_DENIED). Services in ``exempt`` pass untouched."""

    def __init__(
        self,
        token_digests: Sequence[bytes],
        identities: Iterable[str] = (),
        exempt: Sequence[str] = EXEMPT_SERVICES,
    ) -> None:
        self._digests = tuple(token_digests)
        self._identities = frozenset(identities)
        self._exempt = tuple(f"/{service}/" for service in exempt)

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(self._exempt):
            return handler
        if self._digests:
            problem = token_problem(handler_call_details.invocation_metadata, self._digests)
            if problem:
                # The request is never parsed: its bytes reach the refusal unread.
                return _replaced(handler, _refusal(grpc.StatusCode.UNAUTHENTICATED, problem), None)
        if self._identities:
            return _replaced(
                handler, _identity_checked(self._identities), handler.request_deserializer
            )
        return handler


def _refusal(code: grpc.StatusCode, message: str) -> Callable[[Callable], Callable]:
    def make(behavior: Callable[..., Any]) -> Callable[..., Any]:
        def refuse(request: Any, context: grpc.ServicerContext) -> Any:
            context.abort(code, message)

        return refuse

    return make


def _identity_checked(allowed: frozenset[str]) -> Callable[[Callable], Callable]:
    def make(behavior: Callable[..., Any]) -> Callable[..., Any]:
        def checked(request: Any, context: grpc.ServicerContext) -> Any:
            names = peer_identities(context)
            if not names & allowed:
                # A certificate may carry any number of names: a few are enough to say which.
                shown = ", ".join(echo(n) for n in sorted(names)[:IDENTITIES_SHOWN])
                if len(names) > IDENTITIES_SHOWN:
                    shown += f" and {len(names) - IDENTITIES_SHOWN} more"
                shown = shown or "none (no client certificate)"
                context.abort(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"the client certificate's names ({shown}) are not in this server's "
                    "--tls-allowed-identities: use a certificate issued to an allowed name, "
                    "or add its name there",
                )
            return behavior(request, context)

        return checked

    return make


def _replaced(
    handler: grpc.RpcMethodHandler,
    wrap: Callable[[Callable[..., Any]], Callable[..., Any]],
    request_deserializer: Callable[[bytes], Any] | None,
) -> grpc.RpcMethodHandler:
    """``handler`` with its behavior wrapped, of the same kind (unary/stream)."""
    kinds = (
        (handler.unary_unary, grpc.unary_unary_rpc_method_handler),
        (handler.unary_stream, grpc.unary_stream_rpc_method_handler),
        (handler.stream_unary, grpc.stream_unary_rpc_method_handler),
        (handler.stream_stream, grpc.stream_stream_rpc_method_handler),
    )
    behavior, build = next((b, build) for b, build in kinds if b is not None)
    return build(
        wrap(behavior),
        request_deserializer=request_deserializer,
        response_serializer=handler.response_serializer,
    )
