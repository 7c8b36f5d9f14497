"""Static checks of the GradProbe Dockerfiles (no Docker engine here to build them): they copy
every package the project installs, the build context keeps them, they run as the non-root
user the Kubernetes manifests expect, build the default artifacts at image build time and
start the server the way the manifests do."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "deploy" / "docker"
IMAGES = {"cpu": DOCKER / "Dockerfile.cpu", "cuda": DOCKER / "Dockerfile.cuda"}
DEPLOYMENT = ROOT / "deploy" / "k8s" / "base" / "deployment.yaml"


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instruction, _, arguments = line.partition(" ")
            pairs.append((instruction.upper(), " ".join(arguments.split())))
    return pairs


def _final_stage(path: Path) -> list[tuple[str, str]]:
    pairs = _instructions(path)
    last_from = max(i for i, (instruction, _) in enumerate(pairs) if instruction == "FROM")
    return pairs[last_from:]


def _sidecar() -> dict:
    deployment = yaml.safe_load(DEPLOYMENT.read_text())
    containers = deployment["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == "gradprobe")


@pytest.mark.parametrize("variant", sorted(IMAGES))
def test_dockerfile_copies_and_installs_the_project(variant):
    stage = _final_stage(IMAGES[variant])
    copied = {
        source.rstrip("/")
        for i, a in stage
        if i == "COPY" and not a.startswith("--")
        for source in a.split()[:-1]  # the last argument is the destination
    }
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert packages | {"pyproject.toml", project["project"]["readme"]} <= copied
    ignored = {
        line.strip().strip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert not ignored & copied, ignored & copied
    assert {".venv", ".git"} <= ignored
    runs = " && ".join(a for i, a in stage if i == "RUN")
    # The project itself, with the fit extra: the image builds the default H.
    assert re.search(r"pip install [^&]*\"\.\[fit\]\"(\s|$)", runs), runs


@pytest.mark.parametrize("variant", sorted(IMAGES))
def test_dockerfile_builds_artifacts_as_the_runtime_user(variant):
    pairs = _instructions(IMAGES[variant])
    stage = _final_stage(IMAGES[variant])
    text = " ".join(f"{i} {a}" for i, a in pairs)
    assert "dataset-fashion-mnist" in text
    assert "GRADPROBE_HOME=/opt/gradprobe" in text
    users = [a for i, a in stage if i == "USER"]
    assert users and users[-1] not in {"root", "0"}
    uid = re.search(r"useradd [^&]*--uid (\d+)[^&]* " + users[-1], text)
    assert uid, "the runtime user is created with a fixed uid"
    assert int(uid[1]) == _sidecar()["securityContext"]["runAsUser"]
    after_user = " ".join(a for i, a in stage[stage.index(("USER", users[-1])) :] if i == "RUN")
    # The default model dir (classifier and its H, by `fit`) is built into the image.
    assert "gradprobe train-model --fit" in after_user


@pytest.mark.parametrize("variant", sorted(IMAGES))
def test_dockerfile_serves_like_the_manifests(variant):
    stage = _final_stage(IMAGES[variant])
    exposed = {int(p) for i, a in stage if i == "EXPOSE" for p in a.split()}
    sidecar = _sidecar()
    assert exposed == {p["containerPort"] for p in sidecar["ports"]} == {50051, 50052, 9464}
    cmd = [a for i, a in stage if i == "CMD"]
    assert cmd and yaml.safe_load(cmd[-1]) == sidecar["command"]


def test_base_images():
    cpu = [a for i, a in _instructions(IMAGES["cpu"]) if i == "FROM"]
    cuda = _final_stage(IMAGES["cuda"])[0][1]
    assert cpu == ["python:3.11-slim-bookworm"]
    assert cuda.startswith("nvidia/cuda:") and "-runtime-" in cuda
