"""Prometheus metrics of the reliability service, on their own registry and HTTP port.

Every label takes values from a fixed set (stages, verdicts, class names, method names, status
codes, drop reasons), so the number of series is bounded whatever clients send.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.exposition import start_http_server

from service.assessor import VERDICTS, Assessment

STAGES = ("decode", "queue", "forward", "gradients", "detector", "total")
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
            "Time per request in each stage (forward/gradients/detector: its micro-batch's).",
            ["kind", "stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.verdicts = Counter(
            "gradprobe_verdicts",
            "Images assessed, by verdict and by the classifier's predicted class.",
            ["verdict", "predicted_class"],
            registry=r,
        )
        self.scores = Histogram(
            "gradprobe_verdict_score",
            "The detector's probability for each verdict, one observation per image and verdict.",
            ["verdict"],
            buckets=SCORE_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "gradprobe_batch_size_images",
            "Images per micro-batch computed.",
            ["kind"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "gradprobe_queue_depth_images", "Images waiting for compute.", registry=r
        )
        self.requests = Counter(
            "gradprobe_requests",
            "RPCs of the Reliability service, by method and final gRPC status code.",
            ["method", "code"],
            registry=r,
        )
        self.dropped = Counter(
            "gradprobe_dropped_requests",
            "Requests dropped before compute because their deadline passed or they were cancelled.",
            ["reason"],
            registry=r,
        )
        self.model = Info("gradprobe_model", "Classifier and detector being served.", registry=r)
        for reason in DROP_REASONS:
            self.dropped.labels(reason)  # exported at 0 from the start, so rate() works
        # Labelled children looked up once: ``labels()`` costs a lock and a dict lookup on
        # every call, several times per request.
        self._stage_children = {
            kind: [(stage, self.stage_seconds.labels(kind, stage)) for stage in STAGES]
            for kind in KINDS
        }
        self._score_children = [(v, self.scores.labels(v)) for v in VERDICTS]
        self._verdict_children: dict[tuple[str, str], Counter] = {}
        self._http: WSGIServer | None = None
        self._http_thread: threading.Thread | None = None

    def set_model(
        self,
        *,
        classifier_version: str,
        classifier_sha256: str,
        detector_version: str,
        detector_sha256: str,
        device: str,
    ) -> None:
        self.model.info(
            {
                "classifier_version": classifier_version,
                "classifier_sha256": classifier_sha256,
                "detector_version": detector_version,
                "detector_sha256": detector_sha256,
                "device": device,
            }
        )

    def observe_request(self, method: str, code: grpc.StatusCode) -> None:
        self.requests.labels(method, code.name).inc()

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
                counter = self._verdict_children[key] = self.verdicts.labels(*key)
            counter.inc()
            scores = a.scores
            for verdict, child in self._score_children:
                child.observe(scores[verdict])

    def observe_batch(self, kind: str, images: int) -> None:
        self.batch_size.labels(kind).observe(images)

    def observe_drop(self, reason: str) -> None:
        self.dropped.labels(reason).inc()

    def set_queue_depth(self, images: int) -> None:
        self.queue_depth.set(images)

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Serve /metrics over HTTP in a daemon thread; returns the bound port."""
        self._http, self._http_thread = start_http_server(port, addr=host, registry=self.registry)
        return int(self._http.server_port)

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
