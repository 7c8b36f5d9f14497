"""Every query of the Grafana dashboard, every recording rule, the quantity behind every alert
and the prometheus-adapter queries return data from a real Prometheus scraping a real GradProbe
server under mixed traffic. The Kubernetes scrape config is used as written, with pod discovery
emulated by file discovery carrying the same ``__meta_kubernetes_*`` labels."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml
from grpc_support import free_port, sample_images, start_server
from prometheus_support import PROMETHEUS, Prometheus, finite_values, running_prometheus

from service.client import ReliabilityClient

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "gradprobe-dashboard.json"
RULES = ROOT / "deploy" / "prometheus" / "rules.yml"
KUBERNETES_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus-kubernetes.yml"
ADAPTER_CONFIG = ROOT / "deploy" / "k8s" / "prometheus-adapter-config.yaml"
NAMESPACE, POD = "gradprobe-test", "gradprobe-0"
RATE_INTERVAL = "30s"
# Alerts the test traffic makes true (mostly OOD, corrupted and adversarial images, a third of
# the requests malformed; TorchServe's target is a closed port). The others' quantities must
# still return data.
TRUE_UNDER_TRAFFIC = {
    "GradProbeHighOODRate",
    "GradProbeHighCorruptedRate",
    "GradProbeHighAdversarialRate",
    "GradProbeManyInvalidRequests",
    "TorchServeDown",
}
TRUE_WHEN_STOPPED = {"GradProbeDown", "GradProbeTargetDown"}
COMPARISON = re.compile(r"^(?P<quantity>.+?)\s*(==|!=|>=|<=|>|<)\s*-?[0-9.]+$", re.DOTALL)
TOP_LEVEL_AND = re.compile(r"\s+and(?:\s+(?:on|ignoring)\s*\([^)]*\))?\s+")


# ----------------------------------------------------------------------------- the queries


def _variables(dashboard: dict) -> dict[str, dict]:
    return {v["name"]: v for v in dashboard["templating"]["list"]}


def _substitute(expr: str, variables: dict[str, dict]) -> str:
    """What Grafana sends with the default selections (All for the query variables)."""
    out = expr.replace("$__rate_interval", RATE_INTERVAL)
    for name, var in sorted(variables.items(), key=lambda kv: -len(kv[0])):
        if var["type"] == "datasource":
            continue
        current = var["current"]["value"]
        current = current if isinstance(current, list) else [current]
        if current == ["$__all"]:
            if var.get("allValue"):
                value = var["allValue"]
            else:
                value = "|".join(o["value"] for o in var["options"])
        else:
            value = "|".join(current)
        out = out.replace("${" + name + "}", value).replace("$" + name, value)
    assert "$" not in out, f"unsubstituted variable in {expr!r}"
    return out


def _panels(dashboard: dict) -> list[dict]:
    panels = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))  # collapsed rows
    return panels


def dashboard_queries() -> dict[str, str]:
    dashboard = json.loads(DASHBOARD.read_text())
    variables = _variables(dashboard)
    queries = {}
    for panel in _panels(dashboard):
        for target in panel.get("targets", []):
            name = f"panel {panel['title']!r} {target['refId']}"
            queries[name] = _substitute(target["expr"], variables)
    return queries


def variable_queries() -> dict[str, tuple[str, str]]:
    """label_values(selector, label) of each query variable, as (selector, label)."""
    found = {}
    for name, var in _variables(json.loads(DASHBOARD.read_text())).items():
        if var["type"] != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query.strip())
        assert match, f"variable {name}: {query}"
        selector, label = match.groups()
        found[name] = (_substitute(selector, _variables(json.loads(DASHBOARD.read_text()))), label)
    return found


def _rules() -> list[dict]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def alert_quantities(expr: str) -> list[str]:
    """The quantities an alert compares to thresholds: `q1 > t1 and on (...) q2 > t2` gives
    [q1, q2]; `absent(q == 1)` gives [q]."""
    quantities = []
    for part in TOP_LEVEL_AND.split(expr.strip()):
        part = part.strip()
        if part.startswith("absent(") and part.endswith(")"):
            part = part[len("absent(") : -1].strip()
        match = COMPARISON.match(part)
        assert match, f"alert condition {part!r} is not <quantity> <op> <threshold>"
        quantities.append(match["quantity"].strip())
    return quantities


def adapter_queries() -> dict[str, tuple[str, str]]:
    """Each adapter rule's seriesQuery and its metricsQuery rendered for one pod."""
    config_map = yaml.safe_load(ADAPTER_CONFIG.read_text())
    found = {}
    for rule in yaml.safe_load(config_map["data"]["config.yaml"])["rules"]:
        series = rule["seriesQuery"].split("{")[0]
        rendered = (
            rule["metricsQuery"]
            .replace("<<.Series>>", series)
            .replace("<<.LabelMatchers>>", f'namespace="{NAMESPACE}",pod=~"{POD}"')
            .replace("<<.GroupBy>>", "pod")
        )
        assert "<<" not in rendered, rendered
        found[rule["name"]["as"]] = (rule["seriesQuery"], rendered)
    return found


def test_dashboard_structure():
    """Grafana's conventions: a Prometheus datasource variable every panel uses, rate windows
    of $__rate_interval, unique panel ids, the panels on-call needs."""
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["schemaVersion"] >= 36
    variables = _variables(dashboard)
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = _panels(dashboard)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            windows = re.findall(r"\[([^\]]+)\]", target["expr"])
            assert all(w == "$__rate_interval" for w in windows), (panel["title"], windows)
    titles = " / ".join(p["title"].lower() for p in panels)
    for needed in (
        "predicted class",
        "ood",
        "adversarial",
        "latency",
        "images/s",
        "requests/s",
        "batch size",
        "queue",
        "status code",
        "dropped",
        "model info",
    ):
        assert needed in titles, needed


def test_alert_quantities_parse():
    """The helper the test below relies on, and the form every alert has."""
    assert alert_quantities('a:b{x="y"} > 0.2\nand on (namespace, job) c > 0.1') == [
        'a:b{x="y"}',
        "c",
    ]
    assert alert_quantities('absent(up{job="gradprobe"} == 1)') == ['up{job="gradprobe"}']
    for rule in _rules():
        if "alert" in rule:
            assert alert_quantities(rule["expr"]), rule["alert"]


# ----------------------------------------------------------------------------- the setup


def _prometheus_config(tmp_path: Path, metrics_port: int, grpc_port: int) -> tuple[Path, str]:
    """prometheus-kubernetes.yml with 1 s intervals, our rules, and pod discovery emulated;
    returns the config and TorchServe's (closed) metrics address."""
    config = yaml.safe_load(KUBERNETES_CONFIG.read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(RULES)]
    targets = tmp_path / "pods.json"
    for job in config["scrape_configs"]:
        assert job.pop("kubernetes_sd_configs") == [{"role": "pod"}]
        job["file_sd_configs"] = [{"files": [str(targets)], "refresh_interval": "1s"}]

    def port(address: str, container: str, name: str, **meta: str) -> dict:
        labels = {
            "__meta_kubernetes_namespace": NAMESPACE,
            "__meta_kubernetes_pod_name": POD,
            "__meta_kubernetes_pod_phase": "Running",
            "__meta_kubernetes_pod_node_name": "node-a",
            "__meta_kubernetes_pod_annotation_prometheus_io_scrape": "true",
            "__meta_kubernetes_pod_annotation_prometheus_io_path": "/metrics",
            "__meta_kubernetes_pod_annotation_gradprobe_io_scrape_torchserve": "true",
            "__meta_kubernetes_pod_container_name": container,
            "__meta_kubernetes_pod_container_port_name": name,
            **meta,
        }
        return {"targets": [address], "labels": labels}

    closed = f"127.0.0.1:{free_port()}"  # TorchServe is not running here
    pods = [
        port(f"127.0.0.1:{metrics_port}", "gradprobe", "metrics"),
        port(f"127.0.0.1:{grpc_port}", "gradprobe", "grpc"),  # not a metrics port
        port(closed, "torchserve", "ts-metrics"),
        port("127.0.0.1:9", "torchserve", "http"),
        # another pod, not annotated for scraping, and one still pending
        port(
            "127.0.0.2:9464",
            "gradprobe",
            "metrics",
            __meta_kubernetes_pod_name="other-app-0",
            __meta_kubernetes_pod_annotation_prometheus_io_scrape="false",
            __meta_kubernetes_pod_annotation_gradprobe_io_scrape_torchserve="false",
        ),
        port(
            "127.0.0.3:9464",
            "gradprobe",
            "metrics",
            __meta_kubernetes_pod_name="gradprobe-1",
            __meta_kubernetes_pod_phase="Pending",
        ),
    ]
    targets.write_text(json.dumps(pods))
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path, closed


def _traffic_images(assessor) -> dict[str, np.ndarray]:
    """Images of each kind, mostly unreliable so that the share alerts become true."""
    from detectors.fit.challenge.adversarial import attack
    from detectors.fit.challenge.corruptions import corrupt
    from detectors.fit.challenge.ood import mnist_digits
    from detectors.fit.fashion_mnist import load_fashion_mnist, to_float

    per_kind = 4
    samples = sample_images(per_kind=per_kind)  # clean, MNIST digits (OOD), noisy
    test = load_fashion_mnist("test")
    clean = to_float(test.images[200:216]).astype(np.float32)
    adversarial = attack(
        assessor.classifier.module, clean, test.labels[200:216].astype(np.int64), "pgd", None, 0
    ).images
    # The OOD-rate alert needs OOD verdicts, not merely OOD images: H lets some raw MNIST
    # digits through (the fit's digit set draws them in other shades), so the traffic takes
    # digits it does flag.
    digits = mnist_digits(128, seed=1000)[:, None].astype(np.float32)
    verdicts = [a.verdict for a in assessor.assess(digits).assessments]
    flagged = [d for d, v in zip(digits, verdicts, strict=True) if v == "ood"]
    assert len(flagged) >= per_kind, f"H calls only {len(flagged)} of 128 MNIST digits ood"
    return {
        "clean": samples[:per_kind],
        "ood": np.stack(flagged[:per_kind]),
        "noisy": samples[2 * per_kind :],
        "blurred": corrupt(clean[:4], "gaussian_blur", 3, 0).astype(np.float32),
        "adversarial": adversarial[:3].astype(np.float32),
    }


def _send_round(client: ReliabilityClient, images: dict[str, np.ndarray]) -> None:
    client.assess(
        np.concatenate(
            [images["ood"], images["blurred"], images["adversarial"], images["clean"][:1]]
        )
    )
    client.assess(images["noisy"][:1])
    client.predict(images["clean"])
    # One request in three is malformed: INVALID_ARGUMENT.
    with pytest.raises(grpc.RpcError) as error:
        client.assess(np.full((1, 1, 28, 28), np.nan, dtype=np.float32))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def _missing(prometheus: Prometheus, queries: dict[str, str], finite: bool = True) -> dict:
    """The queries that return no data (no finite value when ``finite``), with what they gave."""
    missing = {}
    for name, promql in queries.items():
        result = prometheus.query(promql)
        if not result or (finite and not finite_values(result)):
            missing[name] = (promql, result)
    return missing


def _poll(check, timeout: float, interval: float = 0.5, between=None) -> dict:
    """Run ``check`` (which returns what is still missing) until it returns nothing."""
    deadline = time.monotonic() + timeout
    while True:
        if between is not None:
            between()
        missing = check()
        if not missing or time.monotonic() > deadline:
            return missing
        time.sleep(interval)


def _describe(missing: dict) -> str:
    return "\n".join(
        f"{name}: {promql}  ->  {result}" for name, (promql, result) in missing.items()
    )


# ----------------------------------------------------------------------------- the test


@pytest.mark.slow
@pytest.mark.skipif(
    not PROMETHEUS.exists(), reason="prometheus is absent (apt-get install prometheus)"
)
def test_dashboard_rules_and_adapter_queries_return_data(assessor, tmp_path):
    images = _traffic_images(assessor)
    rules = _rules()
    recording = {f"record {r['record']}": r["record"] for r in rules if "record" in r}
    recording_exprs = {f"record {r['record']} expr": r["expr"] for r in rules if "record" in r}
    alerts = {r["alert"]: r["expr"] for r in rules if "alert" in r}
    quantities = {
        f"alert {name} quantity {i}": q
        for name, expr in alerts.items()
        for i, q in enumerate(alert_quantities(expr))
    }
    adapter = adapter_queries()
    queries = {
        **dashboard_queries(),
        **recording,
        **recording_exprs,
        **quantities,
        **{f"adapter {name}": rendered for name, (_, rendered) in adapter.items()},
    }
    assert len(dashboard_queries()) >= 15

    server = start_server(assessor, metrics_port=0)
    stopped = False
    try:
        config, torchserve_address = _prometheus_config(tmp_path, server.metrics_port, server.port)
        with running_prometheus(config, tmp_path) as prometheus:
            # Discovery and relabelling keep exactly the sidecar's and TorchServe's metrics ports.
            want = [
                ("gradprobe", f"127.0.0.1:{server.metrics_port}"),
                ("torchserve", torchserve_address),
            ]

            def targets() -> dict:
                active = prometheus.get("/api/v1/targets", state="active")["activeTargets"]
                got = sorted((t["labels"]["job"], t["labels"]["instance"]) for t in active)
                return {} if got == want else {"active targets": (f"want {want}", got)}

            missing = _poll(targets, timeout=20)
            assert not missing, _describe(missing)
            active = prometheus.get("/api/v1/targets", state="active")["activeTargets"]
            for target in active:
                labels = target["labels"]
                assert (labels["namespace"], labels["pod"]) == (NAMESPACE, POD), labels
                assert labels["container"] == labels["job"], labels

            with ReliabilityClient(server.target, timeout=60) as client:
                missing = _poll(
                    lambda: _missing(prometheus, queries),
                    timeout=45,
                    between=lambda: _send_round(client, images),
                )
                assert not missing, f"no data for:\n{_describe(missing)}\n{prometheus.log_tail()}"
                firing = {f"alert {name}": alerts[name] for name in TRUE_UNDER_TRAFFIC}
                missing = _poll(
                    lambda: _missing(prometheus, firing, finite=False),
                    timeout=20,
                    between=lambda: _send_round(client, images),
                )
                assert not missing, f"alerts not true under traffic:\n{_describe(missing)}"

            # Dashboard variables: label_values(selector, label) lists our namespace and pod.
            for name, (selector, label) in variable_queries().items():
                values = prometheus.get(f"/api/v1/label/{label}/values", **{"match[]": selector})
                assert values, f"variable {name}: no {label} values for {selector}"
            for name, (series_query, _) in adapter.items():
                assert prometheus.get("/api/v1/series", **{"match[]": series_query}), name

            # Every rule evaluates without error, and the alerts the traffic made true are
            # pending (their for: has not passed yet) or firing.
            def rule_states() -> dict:
                groups = prometheus.get("/api/v1/rules")["groups"]
                loaded = [r for g in groups for r in g["rules"]]
                bad = {r["name"]: (r.get("lastError", ""), r["health"]) for r in loaded}
                bad = {k: v for k, v in bad.items() if v[1] != "ok"}
                if len(loaded) != len(rules):
                    bad["rule count"] = (len(loaded), len(rules))
                active_alerts = {
                    r["name"] for r in loaded if r["type"] == "alerting" and r.get("alerts")
                }
                for name in TRUE_UNDER_TRAFFIC - active_alerts:
                    bad[name] = ("not pending or firing", "")
                return bad

            missing = _poll(rule_states, timeout=15)
            assert not missing, missing

            # GradProbe goes away: up turns 0 and the "down" alerts become true.
            server.stop(0)
            stopped = True
            down = {f"alert {name}": alerts[name] for name in TRUE_WHEN_STOPPED}
            missing = _poll(lambda: _missing(prometheus, down, finite=False), timeout=20)
            assert not missing, f"alerts not true with GradProbe stopped:\n{_describe(missing)}"
    finally:
        if not stopped:
            server.stop(0)
