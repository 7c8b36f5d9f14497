"""What the TorchServe handler needs to talk to the GradProbe sidecar, kept apart from the
handler class so that it can be tested without a TorchServe worker.

Packed into the model archive next to ``gradprobe_handler.py``, the classifier's
``manifest.json`` and the generated ``gradprobe_v1`` stubs; it imports nothing from the
GradProbe project (it reads the manifest's JSON itself), so the archive runs in any TorchServe
that has ``grpcio``, ``protobuf``, ``numpy`` and ``pillow``.
"""

from __future__ import annotations

import io
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

import grpc
import numpy as np
from gradprobe_v1 import reliability_pb2 as pb
from gradprobe_v1 import reliability_pb2_grpc as pb_grpc

log = logging.getLogger("gradprobe.torchserve")

MODES = ("monitor", "gate")
ON_UNRELIABLE = ("flag", "refuse")
ON_UNAVAILABLE = ("mark", "refuse")
VERDICT_NAMES = {
    pb.IN_DISTRIBUTION: "in_distribution",
    pb.OOD: "ood",
    pb.CORRUPTED: "corrupted",
    pb.ADVERSARIAL: "adversarial",
}
# HTTP statuses the handler answers with; TorchServe maps them onto gRPC codes too.
BAD_INPUT, REFUSED_UNRELIABLE, RELIABILITY_UNAVAILABLE = 400, 422, 503


class ConfigError(ValueError):
    """A handler setting has a value it cannot take."""


@dataclass(frozen=True)
class HandlerConfig:
    """How the handler uses GradProbe.

    Read from the archive's model-config.yaml (section ``gradprobe``), then overridden by
    ``GRADPROBE_TS_<FIELD>`` environment variables, so that a deployment can switch mode or
    target without rebuilding the archive.
    """

    # monitor: answer at once, verdicts go to GradProbe's metrics and to the logs.
    # gate: wait (at most timeout_ms) and put the verdict in the response.
    mode: str = "monitor"
    target: str = "127.0.0.1:50051"
    timeout_ms: float = 250.0
    # gate only: what to do with an input GradProbe does not judge in_distribution.
    on_unreliable: str = "flag"
    # gate only: when GradProbe does not answer in time, answer with a marker or refuse.
    on_unavailable: str = "mark"
    # monitor only: batches waiting for GradProbe; beyond it, verdicts are skipped, not queued.
    monitor_queue: int = 64
    # GradProbe's name for this classifier (its ListModels); empty: the only model it serves.
    model: str = ""
    # A GradProbe with TLS: the CA to check it against (any tls_* file turns TLS on), this
    # handler's certificate and key for mutual TLS, and the name its certificate carries when
    # the target's host is not in it (e.g. localhost for 127.0.0.1).
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    tls_server_name: str = ""
    # A file whose first line (not blank, not a # comment) is the bearer token to send.
    token_file: str = ""

    @classmethod
    def from_sources(
        cls, yaml_section: Mapping[str, Any] | None, environ: Mapping[str, str] = os.environ
    ) -> HandlerConfig:
        values: dict[str, Any] = dict(yaml_section or {})
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise ConfigError(
                f"unknown gradprobe setting(s) in model-config.yaml: {sorted(unknown)}"
            )
        for f in fields(cls):
            env = environ.get(f"GRADPROBE_TS_{f.name.upper()}")
            if env is not None and env != "":
                values[f.name] = env
        defaults = cls()
        try:
            # Each field keeps its default's type: YAML and environment values are converted.
            config = replace(
                defaults,
                **{name: type(getattr(defaults, name))(value) for name, value in values.items()},
            )
        except ValueError as exc:
            raise ConfigError(f"bad gradprobe setting: {exc}") from exc
        config.check()
        return config

    def check(self) -> None:
        for name, allowed in (
            ("mode", MODES),
            ("on_unreliable", ON_UNRELIABLE),
            ("on_unavailable", ON_UNAVAILABLE),
        ):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {allowed}; got {getattr(self, name)!r}")
        if self.timeout_ms <= 0:
            raise ConfigError(f"timeout_ms must be positive; got {self.timeout_ms}")
        if self.monitor_queue < 1:
            raise ConfigError(f"monitor_queue must be at least 1; got {self.monitor_queue}")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError(
                "tls_cert and tls_key go together: set both GRADPROBE_TS_TLS_CERT and "
                "GRADPROBE_TS_TLS_KEY (the handler's certificate for mutual TLS), or neither"
            )

    @property
    def tls(self) -> bool:
        return bool(self.tls_ca or self.tls_cert)


def _read_setting_file(name: str, path: str) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as exc:
        raise ConfigError(
            f"GRADPROBE_TS_{name.upper()}={path}: cannot read it ({exc.strerror or exc}); "
            "mount the secret there or fix the path"
        ) from None


def channel_for(config: HandlerConfig, options: list[tuple[str, Any]]) -> grpc.Channel:
    """The channel to GradProbe: plaintext, or TLS (mutual with a certificate) per config."""
    if not config.tls:
        return grpc.insecure_channel(config.target, options=options)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_read_setting_file("tls_ca", config.tls_ca) if config.tls_ca else None,
        private_key=_read_setting_file("tls_key", config.tls_key) if config.tls_key else None,
        certificate_chain=(
            _read_setting_file("tls_cert", config.tls_cert) if config.tls_cert else None
        ),
    )
    if config.tls_server_name:
        options = [*options, ("grpc.ssl_target_name_override", config.tls_server_name)]
    return grpc.secure_channel(config.target, credentials, options=options)


def read_token(config: HandlerConfig) -> str:
    """The bearer token of ``config.token_file`` ("" without one)."""
    if not config.token_file:
        return ""
    text = _read_setting_file("token_file", config.token_file).decode("utf-8", "replace")
    for line in text.splitlines():
        if line.strip() and not line.strip().startswith("#"):
            return line.strip()
    raise ConfigError(
        f"GRADPROBE_TS_TOKEN_FILE={config.token_file} holds no token: put it on a line of its own"
    )


class BadInput(ValueError):
    """A request the classifier cannot take; answered with 400 and this message."""


class ManifestError(ValueError):
    """The archive's manifest.json describes an input this handler cannot serve."""


@dataclass(frozen=True)
class InputSpec:
    """One image as the classifier takes it, read from the archive's ``manifest.json`` (the
    fields GradProbe's ModelSpec reads; this module cannot import it).

    Pixels are float32 (C, H, W) in [0, 1]; when ``mean``/``std`` are set, the classifier
    wants (x - mean) / std per channel, which ``normalize`` applies (GradProbe gets the [0, 1]
    pixels and normalizes them itself). ``resize``: images of another size are resized to
    W x H instead of refused.
    """

    channels: int
    height: int
    width: int
    resize: bool = False
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any]) -> InputSpec:
        shape = [int(v) for v in manifest["input_shape"]]
        if len(shape) != 3 or shape[0] not in (1, 3) or min(shape) < 1:
            raise ManifestError(
                f"input_shape must be [C, H, W] with 1 or 3 channels; got {manifest['input_shape']}"
            )
        normalization = manifest.get("normalization") or {}
        mean, std = normalization.get("mean"), normalization.get("std")
        if (mean is None) != (std is None):
            raise ManifestError("normalization needs both mean and std")
        for values in (mean, std):
            if values is not None and len(values) not in (1, shape[0]):
                raise ManifestError(
                    f"normalization {values} must have 1 or {shape[0]} values (one per channel)"
                )
        return cls(
            channels=shape[0],
            height=shape[1],
            width=shape[2],
            resize=bool(manifest.get("resize", False)),
            mean=None if mean is None else tuple(float(v) for v in mean),
            std=None if std is None else tuple(float(v) for v in std),
        )

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.height, self.width)

    @property
    def image_size(self) -> str:
        """W x H, as image sizes are said (and which is which, unless it is square)."""
        size = f"{self.width}x{self.height}"
        return size if self.width == self.height else f"{size} (width x height)"

    @property
    def kind(self) -> str:
        return "grayscale" if self.channels == 1 else "RGB"

    @property
    def pil_mode(self) -> str:
        return "L" if self.channels == 1 else "RGB"

    @property
    def expected_input(self) -> str:
        """What a request must hold, for every 400's message (ASCII: it may become the HTTP
        reason phrase)."""
        c, h, w = self.shape
        if self.resize:
            image = f"a {self.kind} PNG or JPEG (resized to {w}x{h})"
        else:
            image = f"a {self.image_size} {self.kind} PNG or JPEG"
        if c == 1:
            grid = f"{h}x{w}" if h == w else f"{h}x{w} (height x width)"
        else:
            grid = f"{h}x{w}x{c} (height x width x channels) or {c}x{h}x{w}"
        return f'{image}, or JSON {{"pixels": {grid} numbers}} (uint8 0..255, or floats in [0, 1])'

    def to_chw(self, array: np.ndarray) -> np.ndarray | None:
        """``array`` as (C, H, W) if it holds one image in an accepted layout: C x H x W,
        H x W x C (as PIL and cameras give it), or H x W for one channel; else None."""
        c, h, w = self.shape
        if array.shape == (c, h, w):
            return array
        if array.shape == (h, w, c):
            return array.transpose(2, 0, 1)
        if c == 1 and array.shape == (h, w):
            return array[None]
        return None

    def normalize(self, batch: np.ndarray) -> np.ndarray:
        """A float32 (n, C, H, W) batch in [0, 1] as the classifier takes it."""
        if self.mean is None or self.std is None:
            return batch
        mean = np.asarray(self.mean, dtype=np.float32).reshape(1, -1, 1, 1)
        std = np.asarray(self.std, dtype=np.float32).reshape(1, -1, 1, 1)
        return ((batch - mean) / std).astype(np.float32, copy=False)


def decode_request(row: Mapping[str, Any] | bytes | bytearray, spec: InputSpec) -> np.ndarray:
    """One TorchServe request → float32 (C, H, W) in [0, 1], as ``spec`` says.

    REST bodies arrive under ``body`` (JSON already parsed by TorchServe), gRPC inputs under
    ``data`` as bytes.
    """
    payload: Any = row
    if isinstance(row, Mapping):
        payload = row.get("data", row.get("body"))
    if payload is None:
        fields_seen = sorted(row) if isinstance(row, Mapping) else []
        seen = f" (only form fields {fields_seen})" if fields_seen else ""
        raise BadInput(f"no image in the request{seen}: expected {spec.expected_input}")
    if isinstance(payload, str):
        payload = payload.encode()
    if isinstance(payload, bytes | bytearray):
        payload = bytes(payload)
        if payload[:1] in (b"{", b"["):
            try:
                payload = json.loads(payload)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise BadInput(
                    f"the body is not valid JSON ({_short(exc)}): expected {spec.expected_input}"
                ) from None
        else:
            return _decode_image_file(payload, spec)
    if isinstance(payload, Mapping):
        if "pixels" not in payload:
            raise BadInput(f'JSON without a "pixels" field: expected {spec.expected_input}')
        payload = payload["pixels"]
    return _pixels_to_float(payload, spec)


def _decode_image_file(data: bytes, spec: InputSpec) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            # The size comes from the header: a wrong one is refused before any pixel decodes.
            width, height = image.size
            if (width, height) != (spec.width, spec.height) and not spec.resize:
                raise BadInput(
                    f"the image is {width}x{height} pixels: expected {spec.image_size}, the "
                    f"classifier's {spec.kind} input (resize it before sending)"
                )
            converted = image.convert(spec.pil_mode)
            if converted.size != (spec.width, spec.height):
                # Bilinear, as GradProbe resizes the encoded images it is sent.
                converted = converted.resize((spec.width, spec.height), Image.Resampling.BILINEAR)
            pixels = np.asarray(converted, dtype=np.uint8)
    except BadInput:
        raise
    except (
        UnidentifiedImageError,
        OSError,
        SyntaxError,
        ValueError,
        Image.DecompressionBombError,
    ) as exc:
        raise BadInput(
            f"the body is not a readable image ({_short(exc)}): expected {spec.expected_input}"
        ) from None
    chw = pixels.reshape(spec.height, spec.width, spec.channels).transpose(2, 0, 1)
    return chw.astype(np.float32) / np.float32(255.0)


def _pixels_to_float(pixels: Any, spec: InputSpec) -> np.ndarray:
    try:
        array = np.asarray(pixels, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise BadInput(
            f'"pixels" is not a grid of numbers ({_short(exc)}): expected {spec.expected_input}'
        ) from None
    chw = spec.to_chw(array)
    if chw is None:
        raise BadInput(f'"pixels" has shape {list(array.shape)}: expected {spec.expected_input}')
    if not np.isfinite(chw).all():
        raise BadInput('"pixels" holds NaN or Inf: expected finite values')
    integral = bool(np.all(chw == np.round(chw)))
    if chw.min() < 0 or chw.max() > (255 if integral else 1):
        raise BadInput(
            f'"pixels" range from {chw.min():g} to {chw.max():g}: expected '
            "integers 0..255 or floats in [0, 1]"
        )
    if integral and chw.max() > 1:
        chw = chw / 255.0
    return np.ascontiguousarray(chw, dtype=np.float32)


def _short(error: Exception, limit: int = 120) -> str:
    # Parser errors may quote the whole input back: keep the message readable.
    text = str(error)
    return text if len(text) <= limit else text[:limit] + "..."


class ReliabilityUnavailable(RuntimeError):
    """GradProbe did not give a verdict in time (down, slow, or serving another model)."""


class ReliabilityLink:
    """Calls GradProbe's ``Assess`` with a deadline, on one long-lived channel.

    Requests name ``config.model``, so that a GradProbe serving several models answers for
    this one. Before trusting any verdict it checks, once per connection, that GradProbe serves
    the same classifier as this archive under that name (by sha256): verdicts about another
    model would be noise.
    """

    def __init__(self, config: HandlerConfig, classifier_sha256: str) -> None:
        self.config = config
        self.classifier_sha256 = classifier_sha256
        self.where = f"GradProbe at {config.target}" + (
            f" (model {config.model!r})" if config.model else ""
        )
        token = read_token(config)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else None
        self.channel = channel_for(
            config,
            options=[
                # Reconnect soon after GradProbe restarts (gRPC's default backoff grows to 2 min).
                ("grpc.initial_reconnect_backoff_ms", 100),
                ("grpc.min_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", 1000),
                ("grpc.enable_retries", 0),
            ],
        )
        self.stub = pb_grpc.ReliabilityStub(self.channel)
        self._verified = False
        self.channel.subscribe(self._on_state)

    def _on_state(self, state: grpc.ChannelConnectivity) -> None:
        # A new connection may reach another GradProbe (a rollout): check its model again.
        if state in (grpc.ChannelConnectivity.TRANSIENT_FAILURE, grpc.ChannelConnectivity.IDLE):
            self._verified = False

    def close(self) -> None:
        self.channel.unsubscribe(self._on_state)
        self.channel.close()

    def _deadline(self, started: float) -> float:
        left = self.config.timeout_ms / 1000 - (time.monotonic() - started)
        if left <= 0:
            raise ReliabilityUnavailable(
                f"{self.where} did not answer within {self.config.timeout_ms:g} ms"
            )
        return left

    def _check_model(self, started: float) -> None:
        request = pb.GetModelInfoRequest(model=self.config.model)
        try:
            info = self.stub.GetModelInfo(
                request, timeout=self._deadline(started), metadata=self.metadata
            )
        except grpc.RpcError as exc:
            # Serving several models and none named, or not this name: say how to choose.
            if exc.code() not in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
                raise
            raise ReliabilityUnavailable(
                f"{self.where} answered {exc.code().name}: {exc.details()}; name GradProbe's "
                "model with GRADPROBE_TS_MODEL (or `gradprobe archive --model`)"
            ) from None
        if info.classifier_sha256 != self.classifier_sha256:
            raise ReliabilityUnavailable(
                f"{self.where} serves classifier {info.classifier_sha256[:12]}…, but this "
                f"archive holds {self.classifier_sha256[:12]}…: deploy the same classifier to "
                "both"
            )
        self._verified = True

    def assess(self, images: np.ndarray) -> list[dict[str, Any]]:
        """Verdicts for float32 (n, C, H, W) images in [0, 1] (not normalized: GradProbe
        applies the model's normalization itself), or ``ReliabilityUnavailable``."""
        started = time.monotonic()
        try:
            if not self._verified:
                self._check_model(started)
            request = pb.AssessRequest(
                model=self.config.model,
                images=[
                    pb.Image(
                        raw=pb.RawPixels(
                            data=np.ascontiguousarray(image, dtype="<f4").tobytes(),
                            shape=list(image.shape),
                            dtype=pb.RawPixels.FLOAT32,
                        )
                    )
                    for image in images
                ],
            )
            response = self.stub.Assess(
                request, timeout=self._deadline(started), metadata=self.metadata
            )
        except grpc.RpcError as exc:
            raise ReliabilityUnavailable(
                f"{self.where} answered {exc.code().name}: {exc.details()}"
            ) from None
        latency_ms = (time.monotonic() - started) * 1000
        return [
            {
                "verdict": VERDICT_NAMES.get(r.verdict, "unspecified"),
                "scores": {
                    "in_distribution": round(r.scores.in_distribution, 6),
                    "ood": round(r.scores.ood, 6),
                    "corrupted": round(r.scores.corrupted, 6),
                    "adversarial": round(r.scores.adversarial, 6),
                },
                "gradprobe_prediction": r.predicted_class,
                "latency_ms": round(latency_ms, 3),
            }
            for r in response.results
        ]


class MonitorWorker:
    """Sends batches to GradProbe from a background thread, so predictions never wait.

    The queue is bounded: when GradProbe is slower than the traffic, new batches are skipped
    (and counted) rather than piling up memory.
    """

    def __init__(
        self,
        link: ReliabilityLink,
        max_pending: int,
        on_result: Callable[[list[str], list[dict[str, Any]]], None] | None = None,
    ) -> None:
        self.link = link
        self.pending: queue.Queue[tuple[list[str], np.ndarray] | None] = queue.Queue(max_pending)
        self.on_result = on_result or log_verdicts
        self.counts = {"submitted": 0, "skipped": 0, "assessed": 0, "unavailable": 0}
        self._last_warning = 0.0
        self.thread = threading.Thread(target=self._run, name="gradprobe-monitor", daemon=True)
        self.thread.start()

    def submit(self, request_ids: list[str], images: np.ndarray) -> str:
        try:
            self.pending.put_nowait((request_ids, images))
        except queue.Full:
            self.counts["skipped"] += len(request_ids)
            return "skipped"
        self.counts["submitted"] += len(request_ids)
        return "submitted"

    def close(self, wait_s: float = 5.0) -> None:
        self.pending.put(None)
        self.thread.join(wait_s)

    def _run(self) -> None:
        while (item := self.pending.get()) is not None:
            request_ids, images = item
            try:
                results = self.link.assess(images)
            except ReliabilityUnavailable as exc:
                self.counts["unavailable"] += len(request_ids)
                # One line per 10 s at most: a dead sidecar must not flood the model log.
                if time.monotonic() - self._last_warning > 10:
                    self._last_warning = time.monotonic()
                    log.warning("reliability unavailable (monitor mode): %s", exc)
                continue
            except Exception:  # the monitor thread must outlive any bug in one batch
                log.exception("monitor: assessing a batch failed")
                continue
            self.counts["assessed"] += len(request_ids)
            self.on_result(request_ids, results)


def log_verdicts(request_ids: list[str], results: list[dict[str, Any]]) -> None:
    for request_id, result in zip(request_ids, results, strict=True):
        log.info(
            "GRADPROBE_VERDICT %s",
            json.dumps({"request_id": request_id, **result}, sort_keys=True),
        )
