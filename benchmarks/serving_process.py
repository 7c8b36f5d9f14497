"""A real ``gradprobe serve`` process on loopback, for the soak, fault and fuzzing runs.

    with ServerProcess(["--model-dir", "my-model"]) as server:
        client = ReliabilityClient(server.target)
        server.resources()   # {"rss_bytes": ..., "threads": ..., "fds": ...} from /proc

The server listens on a free port (``--port 0``) and is ready once it prints
``gradprobe serve: ready on HOST:PORT``; the port is read from that line, so no port is picked
here and raced for. Its stderr is kept (``log``) for the reports and for failures.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
_READY = re.compile(r"ready on (\S+?):(\d+)")
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


class ServerExited(RuntimeError):
    """The server process ended (or never became ready); the message holds its log's tail."""


class ServerProcess:
    """``python -m service.cli serve ARGS`` as a child process.

    Args:
        args: extra ``serve`` flags (``--model-dir``, ``--max-queue``, ...).
        ready_timeout_s: how long loading and warming up may take.
        env: extra environment variables for the child.
    """

    def __init__(
        self,
        args: Sequence[str] = (),
        *,
        host: str = "127.0.0.1",
        ready_timeout_s: float = 300.0,
        env: dict[str, str] | None = None,
    ) -> None:
        self.args = list(args)
        self.host = host
        self.ready_timeout_s = ready_timeout_s
        self.env = env or {}
        self.process: subprocess.Popen[str] | None = None
        self.port: int | None = None
        self.log: list[str] = []
        self._ready = threading.Event()

    # -- life cycle

    def command(self) -> list[str]:
        flags = ["--host", self.host, "--port", "0", "--metrics-port", "-1", *self.args]
        return [sys.executable, "-m", "service.cli", "serve", *flags]

    def start(self) -> ServerProcess:
        self.process = subprocess.Popen(
            self.command(),
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env},
        )
        threading.Thread(target=self._read_stderr, name="serve-stderr", daemon=True).start()
        deadline = time.monotonic() + self.ready_timeout_s
        while not self._ready.wait(0.2):
            if self.process.poll() is not None:
                raise ServerExited(
                    f"gradprobe serve exited with {self.process.returncode} before it was "
                    f"ready:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                self.kill()
                raise ServerExited(
                    f"gradprobe serve was not ready after {self.ready_timeout_s:g} s:\n"
                    f"{self.log_tail()}"
                )
        return self

    def _read_stderr(self) -> None:
        assert self.process is not None and self.process.stderr is not None
        for line in self.process.stderr:
            self.log.append(line)
            if not self._ready.is_set() and (match := _READY.search(line)):
                self.port = int(match.group(2))
                self._ready.set()

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM (the server drains), then SIGKILL after ``timeout_s``; the exit status."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.process.wait()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- state

    @property
    def pid(self) -> int:
        if self.process is None:
            raise ServerExited("the server was not started")
        return self.process.pid

    @property
    def target(self) -> str:
        if self.port is None:
            raise ServerExited("the server is not ready")
        return f"{self.host}:{self.port}"

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        return "".join(self.log[-lines:])

    def resources(self) -> dict[str, int]:
        """The server's resident memory (bytes), threads and open file descriptors, from
        /proc (Linux only)."""
        proc = Path("/proc") / str(self.pid)
        rss_pages = int((proc / "statm").read_text().split()[1])
        threads = len(os.listdir(proc / "task"))
        fds = len(os.listdir(proc / "fd"))
        return {"rss_bytes": rss_pages * _PAGE, "threads": threads, "fds": fds}
