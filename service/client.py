"""A small Python client of the reliability service.

from service.client import ReliabilityClient

with ReliabilityClient("127.0.0.1:50051") as client:
    info = client.info()                    # input_shape [C, H, W], classes, ...
    for answer in client.assess(images):   # float32 (B, C, H, W) in [0, 1] or uint8
        print(answer["verdict"], answer["scores"])

Against a server with TLS, mutual TLS and bearer tokens (see README.md, Security):

ReliabilityClient("gradprobe:50051", tls_ca="ca.crt", tls_cert="client.crt",
                  tls_key="client.key", token=read_token_file("token"))
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from service._proto.gradprobe.v1 import reliability_pb2 as pb
from service._proto.gradprobe.v1 import reliability_pb2_grpc as pb_grpc

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
_VERDICT_NAMES = {
    pb.IN_DISTRIBUTION: "in_distribution",
    pb.OOD: "ood",
    pb.CORRUPTED: "corrupted",
    pb.ADVERSARIAL: "adversarial",
}


def image_messages(images: np.ndarray) -> list[pb.Image]:
    """One ``Image`` per image of a (B, C, H, W) uint8/float32 array (also (B, H, W) for
    one-channel models, or uint8 (B, H, W, C)).

    Values and shapes are not checked against the model here: the server validates them and
    says what is wrong.
    """
    images = np.asarray(images)
    dtypes = {np.dtype(np.uint8): pb.RawPixels.UINT8, np.dtype(np.float32): pb.RawPixels.FLOAT32}
    if images.dtype not in dtypes:
        hint = " (cast with .astype(np.float32))" if images.dtype.kind == "f" else ""
        raise ValueError(f"images must be uint8 or float32; got {images.dtype}{hint}")
    if images.ndim not in (3, 4):
        raise ValueError(f"images must be (B, C, H, W) or (B, H, W); got {images.shape}")
    dtype = dtypes[images.dtype]
    little_endian = images.astype(images.dtype.newbyteorder("<"), copy=False)
    return [
        pb.Image(raw=pb.RawPixels(data=image.tobytes(), shape=list(image.shape), dtype=dtype))
        for image in little_endian
    ]


def assessment_dict(message: pb.ImageAssessment, index: int) -> dict[str, Any]:
    t = message.timings
    return {
        "index": index,
        "prediction": message.predicted_class,
        "class_name": message.predicted_name,
        "probabilities": list(message.probabilities),
        "verdict": _VERDICT_NAMES.get(message.verdict, "unspecified"),
        "scores": {
            "in_distribution": message.scores.in_distribution,
            "ood": message.scores.ood,
            "corrupted": message.scores.corrupted,
            "adversarial": message.scores.adversarial,
        },
        "timings_ms": {
            "decode": t.decode_ms,
            "queue": t.queue_ms,
            "forward": t.forward_ms,
            "gradients": t.gradients_ms,
            "squeeze": t.squeeze_ms,
            "detector": t.detector_ms,
            "total": t.total_ms,
        },
        "batch_size": t.batch_size,
    }


class StreamError(RuntimeError):
    """One request of a stream failed; the stream itself goes on."""

    def __init__(self, request_id: str, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"request {request_id or '?'}: {code.name}: {message}")
        self.request_id = request_id
        self.code = code


def read_token_file(path: str | os.PathLike[str]) -> str:
    """The token of a token file: its first line that is neither blank nor a # comment (the
    format of the server's --auth-token-file, so one file can serve both)."""
    for line in _read(path, "token file").decode("utf-8", errors="replace").splitlines():
        if line.strip() and not line.strip().startswith("#"):
            return line.strip()
    raise ValueError(f"token file {path} holds no token: put the token on a line of its own")


def _read(path: str | os.PathLike[str], what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(
            f"{what} {path}: cannot read it ({exc.strerror or exc}); check the path"
        ) from None


def channel_credentials(
    tls_ca: str | os.PathLike[str] | None = None,
    tls_cert: str | os.PathLike[str] | None = None,
    tls_key: str | os.PathLike[str] | None = None,
) -> grpc.ChannelCredentials:
    """TLS credentials: the server is checked against ``tls_ca`` (default: the system's
    roots); ``tls_cert``/``tls_key``: this client's certificate, for mutual TLS."""
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("a client certificate needs its key: give tls_cert and tls_key together")
    return grpc.ssl_channel_credentials(
        root_certificates=None if tls_ca is None else _read(tls_ca, "TLS CA file"),
        private_key=None if tls_key is None else _read(tls_key, "TLS key file"),
        certificate_chain=None if tls_cert is None else _read(tls_cert, "TLS certificate file"),
    )


def _status_code(number: int) -> grpc.StatusCode:
    return next((c for c in grpc.StatusCode if c.value[0] == number), grpc.StatusCode.UNKNOWN)


class ReliabilityClient:
    """Blocking client of ``gradprobe.v1.Reliability``.

    Args:
        target: ``host:port`` of the server.
        timeout: deadline of each call in seconds (None: no deadline).
        wait_for_ready: queue calls while the channel connects instead of failing at once.
        tls: connect over TLS (implied by any ``tls_*`` file); the server is checked
            against ``tls_ca``, or the system's roots without it.
        tls_cert, tls_key: this client's certificate and key, for a server with mutual TLS.
        tls_server_name: the name to check the server's certificate for, when the target's
            host is not in it (e.g. ``localhost`` when dialling 127.0.0.1).
        token: a bearer token, sent as ``authorization: Bearer <token>`` with every call.
    """

    def __init__(
        self,
        target: str,
        *,
        timeout: float | None = 30.0,
        wait_for_ready: bool = True,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        tls: bool = False,
        tls_ca: str | os.PathLike[str] | None = None,
        tls_cert: str | os.PathLike[str] | None = None,
        tls_key: str | os.PathLike[str] | None = None,
        tls_server_name: str | None = None,
        token: str | None = None,
    ) -> None:
        self.target = target
        self.timeout = timeout
        self.wait_for_ready = wait_for_ready
        # Per-call metadata rather than call credentials: gRPC sends those over TLS only, and
        # a token on a loopback plaintext port is a valid setup.
        self.metadata = (("authorization", f"Bearer {token}"),) if token else None
        options: list[tuple[str, Any]] = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
        ]
        if tls or any(f is not None for f in (tls_ca, tls_cert, tls_key)):
            if tls_server_name:
                options.append(("grpc.ssl_target_name_override", tls_server_name))
            credentials = channel_credentials(tls_ca, tls_cert, tls_key)
            self.channel = grpc.secure_channel(target, credentials, options=options)
        else:
            self.channel = grpc.insecure_channel(target, options=options)
        self.stub = pb_grpc.ReliabilityStub(self.channel)

    def __enter__(self) -> ReliabilityClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def _call(self) -> dict[str, Any]:
        return {
            "timeout": self.timeout,
            "wait_for_ready": self.wait_for_ready,
            "metadata": self.metadata,
        }

    def assess(self, images: np.ndarray, model: str = "") -> list[dict[str, Any]]:
        """One dict per image: index, prediction, class_name, probabilities, verdict, scores,
        timings_ms, batch_size. ``model``: the served model's name (needed when the server
        serves several). Raises ``grpc.RpcError`` (e.g. INVALID_ARGUMENT) on failure."""
        request = pb.AssessRequest(images=image_messages(images), model=model)
        response = self.stub.Assess(request, **self._call())
        return [assessment_dict(m, i) for i, m in enumerate(response.results)]

    def stream(
        self, batches: Iterable[np.ndarray], model: str = ""
    ) -> Iterator[list[dict[str, Any]]]:
        """Assess many batches over one stream; yields each batch's answers in order.

        A batch that fails raises ``StreamError`` when its turn comes.
        """
        requests = (
            pb.AssessRequest(images=image_messages(batch), request_id=str(i), model=model)
            for i, batch in enumerate(batches)
        )
        for response in self.stub.AssessStream(requests, **self._call()):
            if response.HasField("error"):
                raise StreamError(
                    response.request_id, _status_code(response.error.code), response.error.message
                )
            yield [assessment_dict(m, i) for i, m in enumerate(response.results)]

    def predict(self, images: np.ndarray, model: str = "") -> np.ndarray:
        """The classifier's softmax (B, N) alone, without the reliability verdict."""
        response = self.stub.Predict(
            pb.PredictRequest(images=image_messages(images), model=model), **self._call()
        )
        return np.array([list(p.probabilities) for p in response.predictions], dtype=np.float32)

    def info(self, model: str = "") -> dict[str, Any]:
        """What the server serves under ``model`` (the only model when empty)."""
        return model_info_dict(
            self.stub.GetModelInfo(pb.GetModelInfoRequest(model=model), **self._call())
        )

    def list_models(self) -> list[dict[str, Any]]:
        response = self.stub.ListModels(pb.ListModelsRequest(), **self._call())
        return [model_info_dict(m) for m in response.models]


def model_info_dict(m: pb.ModelInfo) -> dict[str, Any]:
    return {
        "name": m.name,
        "resizes_encoded": m.resizes_encoded,
        "classes": list(m.classes),
        "input_shape": list(m.input_shape),
        "classifier_version": m.classifier_version,
        "classifier_sha256": m.classifier_sha256,
        "detector_version": m.detector_version,
        "detector_sha256": m.detector_sha256,
        "verdicts": list(m.verdicts),
        "max_images_per_request": m.max_images_per_request,
        "device": m.device,
    }
