"""The Kubernetes manifests validate against a fixed Kubernetes version's schemas (offline), and
hold together: both containers, gRPC probes, resources, GPU variant, HPA metrics the adapter
serves, settings the server knows, ports the Service and Prometheus use, the TLS and token
secrets mounted where the settings point, and a NetworkPolicy that admits what it should."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import fields
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from service.settings import ENV_PREFIX, Settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
BASE, GPU = K8S / "base", K8S / "gpu"
ADAPTER_CONFIG = K8S / "prometheus-adapter-config.yaml"
KUBERNETES_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus-kubernetes.yml"
KUBERNETES_VERSION = "1.31.0"
TORCHSERVE_PORTS = {8080, 8081, 8082, 7070, 7071}
TS_SETTINGS = {
    "GRADPROBE_TS_MODE": {"monitor", "gate"},
    "GRADPROBE_TS_TARGET": None,
    "GRADPROBE_TS_TIMEOUT_MS": None,
    "GRADPROBE_TS_ON_UNRELIABLE": {"flag", "refuse"},
    "GRADPROBE_TS_ON_UNAVAILABLE": {"mark", "refuse"},
}
KUBECTL = shutil.which("kubectl")


def _documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _render(overlay: Path) -> list[dict]:
    if KUBECTL is None:
        pytest.skip("kubectl is absent: cannot render the kustomizations")
    result = subprocess.run([KUBECTL, "kustomize", str(overlay)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def _manifest_files() -> list[Path]:
    files = [*sorted(BASE.glob("*.yaml")), ADAPTER_CONFIG]
    return [f for f in files if f.name != "kustomization.yaml"]


def _validate(document: dict, where: str) -> None:
    try:
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        name = f"{document.get('kind')}/{document.get('metadata', {}).get('name')}"
        raise AssertionError(f"{where}: {name}: {exc.message} at {exc.path}") from None


def _one(documents: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in documents if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _containers(deployment: dict) -> dict[str, dict]:
    return {c["name"]: c for c in deployment["spec"]["template"]["spec"]["containers"]}


def _port_number(container: dict, port: int | str) -> int:
    if isinstance(port, int):
        return port
    numbers = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert port in numbers, f"{container['name']} has no port named {port}"
    return numbers[port]


@pytest.mark.parametrize("path", _manifest_files(), ids=lambda p: str(p.relative_to(K8S)))
def test_manifest_file_validates(path):
    documents = _documents(path)
    assert documents
    for document in documents:
        _validate(document, str(path.relative_to(ROOT)))


def test_validation_catches_a_typo():
    """The check is strict: an unknown field fails (so the tests above mean something)."""
    deployment = _one(_documents(BASE / "deployment.yaml"), "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["imagePulPolicy"] = container.pop("imagePullPolicy")
    with pytest.raises(AssertionError, match="imagePulPolicy"):
        _validate(deployment, "typo")


@pytest.mark.parametrize("overlay", [BASE, GPU], ids=["base", "gpu"])
def test_kustomization_renders_valid_manifests(overlay):
    documents = _render(overlay)
    kinds = sorted(d["kind"] for d in documents)
    assert kinds == sorted(
        [
            "ConfigMap",
            "Deployment",
            "HorizontalPodAutoscaler",
            "NetworkPolicy",
            "PodDisruptionBudget",
            "Service",
            "Service",
        ]
    )
    for document in documents:
        _validate(document, f"kubectl kustomize {overlay.relative_to(ROOT)}")


@pytest.fixture(scope="module")
def base() -> list[dict]:
    return [d for f in _manifest_files() if f != ADAPTER_CONFIG for d in _documents(f)]


def test_pod_runs_torchserve_beside_gradprobe(base):
    deployment = _one(base, "Deployment", "gradprobe")
    containers = _containers(deployment)
    assert set(containers) == {"torchserve", "gradprobe"}

    torchserve = containers["torchserve"]
    assert torchserve["image"] == "gradprobe/torchserve:0.1.0"
    assert {p["containerPort"] for p in torchserve["ports"]} == TORCHSERVE_PORTS
    ping = torchserve["readinessProbe"]["httpGet"]
    assert ping["path"] == "/ping"
    assert _port_number(torchserve, ping["port"]) == 8080

    gradprobe = containers["gradprobe"]
    assert gradprobe["image"] == "gradprobe/gradprobe:0.1.0-cpu"
    assert gradprobe["command"] == [
        "gradprobe", "serve", "--host", "0.0.0.0", "--port", "50051", "--metrics-port", "9464",
        "--health-port", "50052",
    ]  # fmt: skip
    assert {p["containerPort"] for p in gradprobe["ports"]} == {50051, 50052, 9464}
    # The kubelet's gRPC probes cannot do TLS: they ask the plaintext health-only port.
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert gradprobe[probe]["grpc"] == {"port": 50052}, probe
    startup = gradprobe["startupProbe"]
    # H may be rebuilt on a first start: minutes, not seconds.
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600
    assert gradprobe["securityContext"]["runAsNonRoot"] is True
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > Settings.from_sources(env=_config_map(base)["data"]).grace_s


def test_every_container_has_requests_and_limits(base):
    for overlay in (base, _render(GPU) if KUBECTL else base):
        for name, container in _containers(_one(overlay, "Deployment")).items():
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][bound]), (name, bound)


def test_gpu_variant_requests_a_gpu():
    rendered = _render(GPU)
    spec = _one(rendered, "Deployment")["spec"]["template"]["spec"]
    containers = _containers(_one(rendered, "Deployment"))
    gradprobe = containers["gradprobe"]
    assert gradprobe["image"] == "gradprobe/gradprobe:0.1.0-cuda"
    assert int(gradprobe["resources"]["limits"]["nvidia.com/gpu"]) == 1
    assert {"name": "GRADPROBE_DEVICE", "value": "cuda"} in gradprobe["env"]
    assert spec["nodeSelector"]
    assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
    # The patch merged into the base container rather than replacing it.
    assert gradprobe["startupProbe"]["grpc"] == {"port": 50052}
    assert any(e["name"] == "GRADPROBE_TLS_CERT" for e in gradprobe["env"])
    assert "nvidia.com/gpu" not in containers["torchserve"]["resources"]["limits"]
    known = {ENV_PREFIX + f.name.upper() for f in fields(Settings)}
    for variable in gradprobe["env"]:
        if variable["name"].startswith(ENV_PREFIX):
            assert variable["name"] in known, variable
    Settings.from_sources(env={e["name"]: e["value"] for e in gradprobe["env"]})


def _config_map(documents: list[dict]) -> dict:
    return _one(documents, "ConfigMap", "gradprobe-config")


def test_config_map_holds_real_settings(base):
    data = _config_map(base)["data"]
    known = {ENV_PREFIX + f.name.upper() for f in fields(Settings)}
    for key in data:
        assert key.startswith(ENV_PREFIX), key
        if key.startswith("GRADPROBE_TS_"):
            assert key in TS_SETTINGS, f"{key}: not a TorchServe handler setting"
        else:
            assert key in known, f"{key} is not a field of service/settings.py's Settings"
    assert set(TS_SETTINGS) <= set(data)
    for key, allowed in TS_SETTINGS.items():
        assert allowed is None or data[key] in allowed, (key, data[key])
    assert float(data["GRADPROBE_TS_TIMEOUT_MS"]) > 0
    gradprobe_port = data["GRADPROBE_TS_TARGET"].rsplit(":", 1)[1]
    assert gradprobe_port == "50051"
    # The values parse and make a valid server configuration.
    Settings.from_sources(env=data)
    for name, container in _containers(_one(base, "Deployment")).items():
        sources = [s["configMapRef"]["name"] for s in container.get("envFrom", [])]
        assert sources == ["gradprobe-config"], name


def test_services_reach_the_pod(base):
    deployment = _one(base, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    ports = {
        port["name"]: (container, port["containerPort"])
        for container in _containers(deployment).values()
        for port in container["ports"]
    }
    services = {s["metadata"]["name"]: s for s in base if s["kind"] == "Service"}
    assert services["gradprobe-headless"]["spec"]["clusterIP"] == "None"
    for service in services.values():
        selector = service["spec"]["selector"]
        assert selector.items() <= labels.items(), service["metadata"]["name"]
        for port in service["spec"]["ports"]:
            target = port["targetPort"]
            assert target in ports, f"{service['metadata']['name']}: no container port {target}"
    exposed = {port["port"] for port in services["gradprobe"]["spec"]["ports"]}
    assert {8080, 7070, 50051, 9464} <= exposed
    assert _one(base, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= (
        labels.items()
    )


def test_prometheus_discovers_both_containers(base):
    """The pod annotations and port names are what prometheus-kubernetes.yml keeps."""
    template = _one(base, "Deployment")["spec"]["template"]
    annotations = template["metadata"]["annotations"]
    containers = _containers(_one(base, "Deployment"))
    config = yaml.safe_load(KUBERNETES_CONFIG.read_text())
    expected = {"gradprobe": ("gradprobe", 9464), "torchserve": ("torchserve", 8082)}
    for job in config["scrape_configs"]:
        container, port = expected[job["job_name"]]
        keep = {
            r["source_labels"][0]: r["regex"]
            for r in job["relabel_configs"]
            if r.get("action") == "keep"
        }
        annotation_meta = next(k for k in keep if "_pod_annotation_" in k)
        # Prometheus turns every character of an annotation name outside [a-zA-Z0-9_] into _.
        annotation = next(
            a for a in annotations if annotation_meta.endswith("_" + re.sub(r"\W", "_", a))
        )
        assert annotations[annotation] == keep[annotation_meta]
        port_name = keep["__meta_kubernetes_pod_container_port_name"]
        assert _port_number(containers[container], port_name) == port
    assert annotations["prometheus.io/port"] == "9464"


def _adapter_rules() -> list[dict]:
    config_map = _one(_documents(ADAPTER_CONFIG), "ConfigMap")
    return yaml.safe_load(config_map["data"]["config.yaml"])["rules"]


def test_hpa_scales_on_metrics_the_adapter_serves(base):
    hpa = _one(base, "HorizontalPodAutoscaler")
    deployment = _one(base, "Deployment")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    served = {rule["name"]["as"] for rule in _adapter_rules()}
    metrics = hpa["spec"]["metrics"]
    assert metrics and all(m["type"] == "Pods" for m in metrics)
    for metric in metrics:
        assert metric["pods"]["metric"]["name"] in served
    if KUBECTL:
        for metric in _one(_render(GPU), "HorizontalPodAutoscaler")["spec"]["metrics"]:
            assert metric["pods"]["metric"]["name"] in served


def test_adapter_rules_read_series_the_service_exports():
    from prometheus_client import generate_latest

    from service.metrics import ServiceMetrics

    metrics = ServiceMetrics()
    model = metrics.add_model(
        "signs", classifier_version="v", classifier_sha256="c", detector_version="d",
        detector_sha256="h", device="cpu",
    )  # fmt: skip
    metrics.verdicts.labels("signs", "ood", "Bag").inc()
    model.set_queue_depth(0)
    exported = {
        line.split("{")[0].split(" ")[0]
        for line in generate_latest(metrics.registry).decode().splitlines()
        if line and not line.startswith("#")
    }
    for rule in _adapter_rules():
        series = rule["seriesQuery"].split("{")[0].strip("'\"")
        assert series in exported, series
        assert rule["resources"]["overrides"] == {
            "namespace": {"resource": "namespace"},
            "pod": {"resource": "pod"},
        }
        for placeholder in ("<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>"):
            assert placeholder in rule["metricsQuery"], (series, placeholder)


# ----------------------------------------------------------------------------- security

SECRET_KEYS = {"gradprobe-tls": {"tls.crt", "tls.key", "ca.crt"}, "gradprobe-auth": {"tokens"}}


def _secret_file(deployment: dict, container: dict, path: str) -> tuple[str, str]:
    """The (secret, key) a container path reads, through its volume mounts."""
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    for mount in container.get("volumeMounts", []):
        folder = mount["mountPath"].rstrip("/") + "/"
        if path.startswith(folder):
            assert mount.get("readOnly") is True, mount
            secret = volumes[mount["name"]]["secret"]["secretName"]
            return secret, path.removeprefix(folder)
    raise AssertionError(f"{container['name']}: {path} is on no volume mount")


def test_tls_and_token_secrets_are_mounted_where_the_settings_point(base):
    deployment = _one(base, "Deployment")
    containers = _containers(deployment)
    gradprobe = containers["gradprobe"]
    env = {**_config_map(base)["data"], **{e["name"]: e["value"] for e in gradprobe["env"]}}
    settings = Settings.from_sources(env=env)
    files = {
        "tls_cert": ("gradprobe-tls", "tls.crt"),
        "tls_key": ("gradprobe-tls", "tls.key"),
        "tls_client_ca": ("gradprobe-tls", "ca.crt"),
        "auth_token_file": ("gradprobe-auth", "tokens"),
    }
    for name, secret_file in files.items():
        path = getattr(settings, name)
        assert path is not None, f"{name} is not set: the gRPC port would run without it"
        assert _secret_file(deployment, gradprobe, str(path)) == secret_file, name
    # The handler beside it reaches the sidecar with the same CA, a certificate and a token.
    torchserve = containers["torchserve"]
    handler = {e["name"]: e["value"] for e in torchserve["env"]}
    for variable in ("TLS_CA", "TLS_CERT", "TLS_KEY", "TOKEN_FILE"):
        secret, key = _secret_file(deployment, torchserve, handler[f"GRADPROBE_TS_{variable}"])
        assert key in SECRET_KEYS[secret], (variable, secret, key)
    # The certificate names localhost (the handler dials 127.0.0.1): see the README.
    assert handler["GRADPROBE_TS_TLS_SERVER_NAME"] == "localhost"


def _admitted(policy: dict, container_ports: dict[str, int]) -> dict[int, list[list[dict]]]:
    """For each port number: the `from` lists of the rules that admit it ([] = anyone)."""
    admitted: dict[int, list[list[dict]]] = {}
    for rule in policy["spec"]["ingress"]:
        for port in rule["ports"]:
            number = container_ports.get(port["port"], port["port"])
            assert isinstance(number, int), f"no container port named {port['port']}"
            admitted.setdefault(number, []).append(rule.get("from", []))
    return admitted


def test_network_policy_admits_clients_prometheus_and_inference_only(base):
    deployment = _one(base, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    policy = _one(base, "NetworkPolicy", "gradprobe")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    ports = {
        p["name"]: p["containerPort"] for c in _containers(deployment).values() for p in c["ports"]
    }
    admitted = _admitted(policy, ports)

    # gRPC: only from client pods, never from anyone.
    (grpc_sources,) = admitted[ports["grpc"]]
    assert grpc_sources == [{"podSelector": {"matchLabels": {"gradprobe-client": "true"}}}]
    # Metrics: only Prometheus pods of the namespace prometheus-adapter reads from.
    adapter_namespace = _one(_documents(ADAPTER_CONFIG), "ConfigMap")["metadata"]["namespace"]
    prometheus = [
        {
            "namespaceSelector": {
                "matchLabels": {"kubernetes.io/metadata.name": adapter_namespace}
            },
            "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
        }
    ]
    for name in ("metrics", "ts-metrics"):
        assert admitted[ports[name]] == [prometheus], name
    # TorchServe's inference APIs stay open; management and the health port do not.
    for name in ("http", "grpc-inference"):
        assert admitted[ports[name]] == [[]], name
    for name in ("management", "grpc-mgmt", "grpc-health"):
        assert ports[name] not in admitted, name
    # Every port a Service exposes is admitted by some rule (else the Service is dead).
    for service in (d for d in base if d["kind"] == "Service"):
        for port in service["spec"]["ports"]:
            assert ports[port["targetPort"]] in admitted, (service["metadata"]["name"], port)


def test_network_policy_validation_is_strict():
    """A podSelector under `ports` is a schema error: the validation above means something."""
    policy = _one(_documents(BASE / "networkpolicy.yaml"), "NetworkPolicy")
    policy["spec"]["ingress"][0]["ports"][0]["podSelector"] = {}
    with pytest.raises(AssertionError, match="podSelector"):
        _validate(policy, "typo")
