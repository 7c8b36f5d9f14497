"""Prometheus metrics of the reliability service, on their own registry and HTTP port.

Every label takes values from a fixed set (served model names, stages, verdicts, class names,
method names, status codes, drop reasons), so the number of series is bounded whatever clients
send: a request naming a model that is not served is counted under ``model="unknown"``.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.exposition import start_http_server

from service.assessor import VERDICTS, Assessment

UNKNOWN_MODEL = "unknown"
STAGES = ("decode", "queue", "forward", "gradients", "squeeze", "detector", "total")
KINDS = ("assess", "predict")
DROP_REASONS = ("deadline", "cancelled")
# From ~0.5 ms (a decode) to 10 s (a big batch on a busy CPU).
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
SCORE_BUCKETS = (0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class ServiceMetrics:
    """The service's metrics, built against ``registry`` (a fresh one by default, so several
    servers in one process — tests, benchmarks — never share counters)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.stage_seconds = Histogram(
            "gradprobe_stage_duration_seconds",
            "Time per request in each stage (forward, gradients, squeeze, detector: its "
            "micro-batch's).",
            ["model", "kind", "stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.verdicts = Counter(
            "gradprobe_verdicts",
            "Images assessed, by verdict and by the classifier's predicted class.",
            ["model", "verdict", "predicted_class"],
            registry=r,
        )
        self.scores = Histogram(
            "gradprobe_verdict_score",
            "The detector's probability for each verdict, one observation per image and verdict.",
            ["model", "verdict"],
            buckets=SCORE_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "gradprobe_batch_size_images",
            "Images per micro-batch computed.",
            ["model", "kind"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "gradprobe_queue_depth_images", "Images waiting for compute.", ["model"], registry=r
        )
        self.requests = Counter(
            "gradprobe_requests",
            "RPCs of the Reliability service, by method and final gRPC status code.",
            ["model", "method", "code"],
            registry=r,
        )
        self.dropped = Counter(
            "gradprobe_dropped_requests",
            "Requests dropped before compute because their deadline passed or they were cancelled.",
            ["model", "reason"],
            registry=r,
        )
        self.memory_splits = Counter(
            "gradprobe_memory_splits",
            "Micro-batches split in halves and retried because the accelerator ran out of memory.",
            ["model"],
            registry=r,
        )
        self.model = Info(
            "gradprobe_model", "Classifier and detector being served.", ["model"], registry=r
        )
        self._models: dict[str, ModelMetrics] = {}
        self._http: WSGIServer | None = None
        self._http_thread: threading.Thread | None = None

    def add_model(
        self,
        name: str,
        *,
        classifier_version: str,
        classifier_sha256: str,
        detector_version: str,
        detector_sha256: str,
        device: str,
    ) -> ModelMetrics:
        """A served model's metrics (its ``model`` label), with its info series set."""
        self.model.labels(name).info(
            {
                "classifier_version": classifier_version,
                "classifier_sha256": classifier_sha256,
                "detector_version": detector_version,
                "detector_sha256": detector_sha256,
                "device": device,
            }
        )
        self._models[name] = ModelMetrics(self, name)
        return self._models[name]

    def for_model(self, name: str) -> ModelMetrics:
        return self._models[name]

    def _model_label(self, requested: str) -> str:
        """The served model a request counts under: its name, the only model when it named
        none, else ``unknown`` (never a client's arbitrary string)."""
        if requested in self._models:
            return requested
        if not requested and len(self._models) == 1:
            return next(iter(self._models))
        return UNKNOWN_MODEL

    def observe_request(self, method: str, code: grpc.StatusCode, model: str = "") -> None:
        self.requests.labels(self._model_label(model), method, code.name).inc()

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Serve /metrics over HTTP in a daemon thread; returns the bound port."""
        self._http, self._http_thread = start_http_server(port, addr=host, registry=self.registry)
        return int(self._http.server_port)

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class ModelMetrics:
    """One served model's series; also the observer of its micro-batcher. Labelled children
    are looked up once: ``labels()`` costs a lock and a dict lookup, several times a request."""

    def __init__(self, metrics: ServiceMetrics, name: str) -> None:
        self.name = name
        self._metrics = metrics
        for reason in DROP_REASONS:
            metrics.dropped.labels(name, reason)  # exported at 0 from the start, so rate() works
        self._stage_children = {
            kind: [(stage, metrics.stage_seconds.labels(name, kind, stage)) for stage in STAGES]
            for kind in KINDS
        }
        self._score_children = [(v, metrics.scores.labels(name, v)) for v in VERDICTS]
        self._verdict_children: dict[tuple[str, str], Counter] = {}
        self._queue_depth = metrics.queue_depth.labels(name)
        self._memory_splits = metrics.memory_splits.labels(name)  # exported at 0 from the start

    def observe_stages(self, kind: str, timings_ms: dict[str, float]) -> None:
        for stage, child in self._stage_children[kind]:  # kind: one of KINDS
            if stage in timings_ms:
                child.observe(timings_ms[stage] / 1000)

    def observe_assessments(
        self, assessments: Sequence[Assessment], classes: Sequence[str]
    ) -> None:
        for a in assessments:
            key = (a.verdict, classes[a.prediction])
            counter = self._verdict_children.get(key)
            if counter is None:
                counter = self._verdict_children[key] = self._metrics.verdicts.labels(
                    self.name, *key
                )
            counter.inc()
            scores = a.scores
            for verdict, child in self._score_children:
                child.observe(scores[verdict])

    def observe_batch(self, kind: str, images: int) -> None:
        self._metrics.batch_size.labels(self.name, kind).observe(images)

    def observe_drop(self, reason: str) -> None:
        self._metrics.dropped.labels(self.name, reason).inc()

    def set_queue_depth(self, images: int) -> None:
        self._queue_depth.set(images)

    def observe_memory_split(self) -> None:
        self._memory_splits.inc()
