"""A real Prometheus scrapes the service's metrics; PromQL over them returns data."""

from __future__ import annotations

import subprocess
import time
import urllib.request

import pytest
from grpc_support import sample_images, start_server
from prometheus_support import PROMETHEUS, PROMTOOL, finite_values, running_prometheus

from service.client import ReliabilityClient

VERDICT_RATE = "sum by (verdict) (rate(gradprobe_verdicts_total[30s]))"
P99 = (
    "histogram_quantile(0.99, sum by (le) "
    '(rate(gradprobe_stage_duration_seconds_bucket{kind="assess", stage="total"}[30s])))'
)


def test_metrics_endpoint_exposes_bounded_series(assessor):
    server = start_server(assessor, metrics_port=0)
    try:
        with ReliabilityClient(server.target, timeout=60) as client:
            client.assess(sample_images(per_kind=1))
        url = f"http://127.0.0.1:{server.metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=5).read().decode()
    finally:
        server.stop(0)
    for name in (
        "gradprobe_stage_duration_seconds_bucket",
        "gradprobe_verdicts_total",
        "gradprobe_verdict_score_bucket",
        "gradprobe_batch_size_images_bucket",
        "gradprobe_queue_depth_images",
        f'gradprobe_requests_total{{code="OK",method="Assess",model="{assessor.name}"}}',
        f'gradprobe_model_info{{classifier_sha256="{assessor.classifier.manifest.sha256}"',
        f'gradprobe_dropped_requests_total{{model="{assessor.name}",reason="deadline"}}',
    ):
        assert name in text, name
    # Every series of the service names its model.
    series = [line for line in text.splitlines() if line.startswith("gradprobe_")]
    assert series and all(f'model="{assessor.name}"' in line for line in series)
    stages = {
        line.split('stage="')[1].split('"')[0] for line in text.splitlines() if 'stage="' in line
    }
    assert stages == {"decode", "queue", "forward", "gradients", "squeeze", "detector", "total"}


def _has_positive_value(result: list) -> bool:
    return any(v > 0 for v in finite_values(result))


@pytest.mark.slow
@pytest.mark.skipif(
    not PROMETHEUS.exists(), reason="/usr/bin/prometheus is absent (apt-get install prometheus)"
)
def test_prometheus_scrapes_verdict_rates_and_latency_quantiles(assessor, tmp_path):
    server = start_server(assessor, metrics_port=0)
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: gradprobe\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{server.metrics_port}']\n"
    )
    if PROMTOOL.exists():
        checked = subprocess.run(
            [str(PROMTOOL), "check", "config", str(config)], capture_output=True
        )
        assert checked.returncode == 0, checked.stdout + checked.stderr
    images = sample_images(per_kind=1)
    try:
        with (
            running_prometheus(config, tmp_path) as prometheus,
            ReliabilityClient(server.target, timeout=60) as client,
        ):
            deadline = time.monotonic() + 60
            rates = quantiles = []
            # Keep traffic flowing until two scrapes have seen counters grow.
            while time.monotonic() < deadline:
                client.assess(images[:2])
                rates, quantiles = prometheus.query(VERDICT_RATE), prometheus.query(P99)
                if _has_positive_value(rates) and _has_positive_value(quantiles):
                    break
                time.sleep(0.3)
            assert _has_positive_value(rates), prometheus.log_tail()
    finally:
        server.stop(0)
    assert _has_positive_value(quantiles), quantiles
    assert {r["metric"]["verdict"] for r in rates} <= {
        "in_distribution",
        "ood",
        "corrupted",
        "adversarial",
    }
    assert 0 < float(quantiles[0]["value"][1]) < 60
