"""The deployment files agree with each other and with the code: ports, names, settings.

No Docker engine runs here, so the images are not built; what can be checked without one is.
"""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"


def _properties(path: Path) -> dict[str, str]:
    pairs = (
        line.split("=", 1)
        for line in path.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    )
    return {key.strip(): value.strip() for key, value in pairs}


def _container(name: str) -> dict:
    deployment = yaml.safe_load((DEPLOY / "k8s" / "base" / "deployment.yaml").read_text())
    containers = deployment["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == name)


def test_torchserve_config_listens_on_the_ports_the_pod_declares():
    properties = _properties(DEPLOY / "torchserve" / "config.properties")
    listened = {
        int(properties["inference_address"].rsplit(":", 1)[1]),
        int(properties["management_address"].rsplit(":", 1)[1]),
        int(properties["metrics_address"].rsplit(":", 1)[1]),
        int(properties["grpc_inference_port"]),
        int(properties["grpc_management_port"]),
    }
    declared = {port["containerPort"] for port in _container("torchserve")["ports"]}
    assert listened == declared
    assert properties["metrics_mode"] == "prometheus"


def test_torchserve_image_serves_the_archive_it_builds():
    dockerfile = (DEPLOY / "docker" / "Dockerfile.torchserve").read_text()
    built = re.search(r"gradprobe archive .*--name (\S+)", dockerfile)
    served = re.search(r'"--models", "(\w+)=(\w+)\.mar"', dockerfile)
    assert built and served, "the Dockerfile must build and serve one archive"
    assert served.group(2) == built.group(1)
    assert "torch==2.14.1" in dockerfile  # the .pt2 program needs the torch that wrote it
    assert "torch==2.14.1" in (REPO / "pyproject.toml").read_text()
    assert _container("torchserve")["image"] == "gradprobe/torchserve:0.1.0"


@pytest.mark.parametrize(
    "dockerfile", sorted((DEPLOY / "docker").glob("Dockerfile.*")), ids=lambda p: p.name
)
def test_every_copied_path_exists(dockerfile):
    for line in dockerfile.read_text().splitlines():
        if not line.startswith("COPY ") or "--from=" in line:
            continue
        sources = [word for word in line.split()[1:-1] if not word.startswith("--")]
        for source in sources:
            assert (REPO / source).exists(), f"{dockerfile.name}: COPY {source}: no such path"


def test_handler_settings_of_the_configmap_are_valid(tmp_path):
    from service.torchserve_archive import stage_handler

    configmap = yaml.safe_load((DEPLOY / "k8s" / "base" / "configmap.yaml").read_text())
    handler_env = {k: v for k, v in configmap["data"].items() if k.startswith("GRADPROBE_TS_")}
    assert handler_env, "the ConfigMap sets no GRADPROBE_TS_* handler settings"
    sys.path.insert(0, str(stage_handler(tmp_path)))
    try:
        sidecar = importlib.import_module("gradprobe_sidecar")
        names = {
            f"GRADPROBE_TS_{name.upper()}" for name in sidecar.HandlerConfig.__dataclass_fields__
        }
        assert set(handler_env) <= names, set(handler_env) - names
        config = sidecar.HandlerConfig.from_sources(None, handler_env)
    finally:
        sys.path.remove(str(tmp_path))
    # The handler in TorchServe reaches the sidecar in the same pod.
    sidecar_port = next(
        p["containerPort"] for p in _container("gradprobe")["ports"] if p["name"] == "grpc"
    )
    assert config.target == f"127.0.0.1:{sidecar_port}"
