"""Helpers to run a real Prometheus (and promtool) in the tests."""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from grpc_support import free_port

PROMETHEUS = Path(shutil.which("prometheus") or "/usr/bin/prometheus")
PROMTOOL = Path(shutil.which("promtool") or "/usr/bin/promtool")


class Prometheus:
    """A Prometheus server on loopback; ``get`` and ``query`` talk to its HTTP API."""

    def __init__(self, port: int, log: Path) -> None:
        self.port = port
        self.log = log

    def get(self, path: str, **params: str | list[str]) -> dict:
        url = f"http://127.0.0.1:{self.port}{path}?" + urllib.parse.urlencode(params, doseq=True)
        body = json.loads(urllib.request.urlopen(url, timeout=10).read())
        if body.get("status") != "success":
            raise AssertionError(f"{path} {params}: {body}")
        return body["data"]

    def query(self, promql: str) -> list[dict]:
        """An instant query's result (a list of series), or an AssertionError naming it."""
        try:
            return self.get("/api/v1/query", query=promql)["result"]
        except urllib.error.HTTPError as exc:  # 400: the expression does not parse
            raise AssertionError(f"{promql}: {exc.read().decode()}") from None

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text()[-chars:] if self.log.exists() else ""


@contextlib.contextmanager
def running_prometheus(config: Path, workdir: Path, timeout: float = 30.0) -> Iterator[Prometheus]:
    """Start Prometheus on ``config``, wait until it is ready, stop it afterwards."""
    port = free_port()
    log_path = workdir / "prometheus.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [
                str(PROMETHEUS),
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        server = Prometheus(port, log_path)
        try:
            deadline = time.monotonic() + timeout
            while not server.ready():
                if process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"Prometheus did not start:\n{server.log_tail()}")
                time.sleep(0.2)
            yield server
        finally:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def finite_values(result: list[dict]) -> list[float]:
    """The finite sample values of an instant query's result."""
    values = [float(series["value"][1]) for series in result]
    return [v for v in values if math.isfinite(v)]
