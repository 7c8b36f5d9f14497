"""Real TorchServe and GradProbe processes on loopback ports, for the deployment tests."""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from types import ModuleType

from grpc_support import free_port

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def torchserve_jar() -> Path:
    import ts

    return Path(ts.__file__).parent / "frontend" / "model-server.jar"


def torchserve_grpc_stubs(folder: Path) -> tuple[ModuleType, ModuleType]:
    """TorchServe's own inference.proto, taken from the installed jar and compiled here, so the
    client speaks exactly the protocol of the server under test."""
    from grpc_tools import protoc

    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(torchserve_jar()) as jar:
        for name in ("inference.proto", "google/rpc/status.proto"):
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(jar.read(name))
    include = Path(protoc.__file__).parent / "_proto"
    code = protoc.main(
        [
            "protoc",
            f"-I{folder}",
            f"-I{include}",
            f"--python_out={folder}",
            f"--grpc_python_out={folder}",
            str(folder / "inference.proto"),
            str(folder / "google/rpc/status.proto"),
        ]
    )
    assert code == 0, "protoc failed on TorchServe's inference.proto"
    sys.path.insert(0, str(folder))
    importlib.invalidate_caches()
    # google is a namespace package shared with protobuf: make it see the new google/rpc.
    import google

    google.__path__.append(str(folder / "google"))
    return importlib.import_module("inference_pb2"), importlib.import_module("inference_pb2_grpc")


class GradProbeProcess:
    """``gradprobe serve`` in its own process, so a test can freeze or kill it."""

    def __init__(self, folder: Path, port: int | None = None) -> None:
        self.folder = folder
        self.port = port or free_port()
        self.metrics_port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 120) -> None:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        log = (self.folder / "gradprobe.log").open("a")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "service.cli",
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--metrics-port",
                str(self.metrics_port),
            ],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout_s
        with grpc.insecure_channel(self.target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                assert self.process.poll() is None, self.log_tail()
                try:
                    status = health.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                    if status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.2)
        raise AssertionError(f"gradprobe serve did not become SERVING:\n{self.log_tail()}")

    def log_tail(self) -> str:
        return (self.folder / "gradprobe.log").read_text()[-3000:]

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)  # a frozen process must be able to die
            self.process.kill()
            self.process.wait(10)

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        return urllib.request.urlopen(url, timeout=5).read().decode()


class TorchServeProcess:
    """TorchServe 0.12 in the foreground with the given archives loaded at start, every port on
    loopback and its own temp folder (TorchServe keeps a pid file and worker sockets there)."""

    def __init__(self, folder: Path, model_store: Path, models: dict[str, str]) -> None:
        self.folder = folder
        self.model_store = model_store
        self.models = models
        self.ports = {name: free_port() for name in ("rest", "management", "metrics", "grpc")}
        self.ports["grpc_management"] = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def rest(self) -> str:
        return f"http://127.0.0.1:{self.ports['rest']}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.ports['grpc']}"

    def start(self, env: dict[str, str] | None = None, timeout_s: float = 180) -> None:
        tmp = self.folder / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        config = self.folder / "config.properties"
        config.write_text(
            "\n".join(
                [
                    f"inference_address=http://127.0.0.1:{self.ports['rest']}",
                    f"management_address=http://127.0.0.1:{self.ports['management']}",
                    f"metrics_address=http://127.0.0.1:{self.ports['metrics']}",
                    "grpc_inference_address=127.0.0.1",
                    "grpc_management_address=127.0.0.1",
                    f"grpc_inference_port={self.ports['grpc']}",
                    f"grpc_management_port={self.ports['grpc_management']}",
                    "default_workers_per_model=1",
                    "disable_system_metrics=true",
                    "metrics_mode=prometheus",
                    "install_py_dep_per_model=false",
                    f"model_store={self.model_store}",
                    "vmargs=-Xmx512m -XX:+UseSerialGC",
                ]
            )
            + "\n"
        )
        environ = {
            **os.environ,
            **(env or {}),
            "TEMP": str(tmp),
            "TMPDIR": str(tmp),
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        }
        log = (self.folder / "torchserve.out").open("a")
        self.process = subprocess.Popen(
            [
                str(BIN / "torchserve"),
                "--start",
                "--foreground",
                "--ncs",
                "--disable-token-auth",
                "--ts-config",
                str(config),
                "--models",
                *[f"{name}={archive}" for name, archive in self.models.items()],
            ],
            cwd=self.folder,
            env=environ,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log_tail()
            if all(self._ready(name) for name in self.models):
                return
            time.sleep(0.5)
        raise AssertionError(f"TorchServe did not load {list(self.models)}:\n{self.log_tail()}")

    def _ready(self, model: str) -> bool:
        url = f"http://127.0.0.1:{self.ports['management']}/models/{model}"
        try:
            described = json.loads(urllib.request.urlopen(url, timeout=2).read())
        except (OSError, urllib.error.URLError, json.JSONDecodeError):
            return False
        workers = described[0].get("workers", [])
        return bool(workers) and all(w.get("status") == "READY" for w in workers)

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.ports['metrics']}/metrics"
        return urllib.request.urlopen(url, timeout=5).read().decode()

    def model_log(self) -> str:
        path = self.folder / "logs" / "model_log.log"
        return path.read_text() if path.exists() else ""

    def log_tail(self) -> str:
        return (self.folder / "torchserve.out").read_text()[-4000:]

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)  # the Java frontend and its workers
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
