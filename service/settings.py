"""The server's settings: one dataclass, filled from command-line flags and ``GRADPROBE_*``
environment variables (a flag wins over the environment, the environment over the default)."""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

ENV_PREFIX = "GRADPROBE_"
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def available_cpus(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """CPUs this process may use: its affinity, capped by a cgroup CPU quota if one is set.

    In a Kubernetes pod with ``limits.cpu: 2`` on a 32-core node, the affinity still lists 32
    cores; sizing thread pools by it would have the container throttled. cgroup v2 keeps the
    quota in ``cpu.max`` ("200000 100000", or "max ..."), v1 in ``cpu.cfs_quota_us`` (-1: none)
    over ``cpu.cfs_period_us``.
    """
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    cpus = affinity or os.cpu_count() or 1
    quota = _cgroup_quota(cgroup_root)
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota)))
    return cpus


def _cgroup_quota(root: Path) -> float | None:
    try:
        limit, period = (root / "cpu.max").read_text().split()[:2]
        return None if limit == "max" else int(limit) / int(period)
    except (OSError, ValueError):
        pass
    for folder in ("cpu", "cpu,cpuacct"):
        try:
            limit = int((root / folder / "cpu.cfs_quota_us").read_text())
            period = int((root / folder / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return None if limit <= 0 or period <= 0 else limit / period
    return None


class SettingsError(ValueError):
    """A setting has a value the server cannot run with; the message names it."""


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 50051  # 0: any free port
    metrics_port: int = 9464  # Prometheus /metrics; 0: any free port, -1: off
    max_batch_size: int = 32  # images per micro-batch
    # How long the oldest request of a micro-batch waits for company. Short: on CPU, requests
    # that arrive during a pass already batch up (see benchmarks/RESULTS.md).
    max_wait_ms: float = 2.0
    max_queue: int = 512  # images waiting for compute; beyond → RESOURCE_EXHAUSTED
    max_message_bytes: int = 4 * 1024 * 1024
    max_images_per_request: int = 256
    device: str = "auto"  # auto: cuda when torch sees it, else cpu
    workers: int = 64  # gRPC handler threads = concurrent RPCs in flight
    # Intra-op threads of the model pass; 0: auto, half the cores (at least 1), so that the
    # gRPC threads keep a core and the math libraries' thread pools do not oversubscribe it.
    compute_threads: int = 0
    batching: bool = True  # off: one request per compute, for comparison
    grace_s: float = 10.0  # on SIGTERM, how long in-flight requests get to finish
    # Fault tests only (service.assessor.MemoryCap): passes over more images than this fail as
    # if the accelerator ran out of memory, so the split-and-retry path runs on a CPU; 0: off.
    simulate_memory_cap: int = 0
    # Model dirs to serve (a folder of model dirs counts as all of them); none: the built-in
    # Fashion-MNIST example. GRADPROBE_MODEL_DIRS takes them comma-separated.
    model_dirs: tuple[Path, ...] = ()
    quiet: bool = False
    # Transport security (service/security.py): TLS with tls_cert and tls_key (PEM), mutual TLS
    # when tls_client_ca is set too, bearer tokens (one a line) with auth_token_file.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    # mTLS only: client certificate names (SAN or CN) allowed to call; empty: any the CA signed.
    tls_allowed_identities: tuple[str, ...] = ()
    auth_token_file: Path | None = None
    # A plaintext port serving grpc.health.v1 alone, for probes that cannot do TLS (kubelet's
    # gRPC probes); -1: off.
    health_port: int = -1

    def __post_init__(self) -> None:
        checks = [
            (0 <= self.port <= 65535, "port must be in 0..65535"),
            (-1 <= self.metrics_port <= 65535, "metrics_port must be in -1..65535"),
            (self.max_batch_size >= 1, "max_batch_size must be at least 1"),
            (self.max_wait_ms >= 0, "max_wait_ms must be >= 0"),
            (self.max_images_per_request >= 1, "max_images_per_request must be at least 1"),
            (
                self.max_queue >= self.max_images_per_request,
                "max_queue must be >= max_images_per_request (a full request must fit)",
            ),
            (self.max_message_bytes >= 1024, "max_message_bytes must be at least 1024"),
            (self.workers >= 1, "workers must be at least 1"),
            (self.compute_threads >= 0, "compute_threads must be >= 0 (0: auto)"),
            (self.device in ("auto", "cpu", "cuda"), "device must be auto, cpu or cuda"),
            (self.grace_s >= 0, "grace_s must be >= 0"),
            (self.simulate_memory_cap >= 0, "simulate_memory_cap must be >= 0 (0: off)"),
            (
                (self.tls_cert is None) == (self.tls_key is None),
                "tls_cert and tls_key go together: give both (--tls-cert, --tls-key)",
            ),
            (
                self.tls_client_ca is None or self.tls_cert is not None,
                "tls_client_ca (mutual TLS) needs TLS: give --tls-cert and --tls-key too",
            ),
            (
                not self.tls_allowed_identities or self.tls_client_ca is not None,
                "tls_allowed_identities needs client certificates: give --tls-client-ca too",
            ),
            (-1 <= self.health_port <= 65535, "health_port must be in -1..65535"),
        ]
        for ok, message in checks:
            if not ok:
                raise SettingsError(f"{message} (got {self._describe()})")

    def _describe(self) -> str:
        return ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in fields(self))

    @classmethod
    def from_sources(
        cls, args: argparse.Namespace | None = None, env: Mapping[str, str] | None = None
    ) -> Settings:
        """Flags (attributes of ``args`` that are not None) over ``GRADPROBE_<NAME>``."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            flag = getattr(args, f.name, None) if args is not None else None
            if flag is not None:
                if isinstance(flag, list) and str(f.type).startswith("tuple[str"):
                    # Repeated, or comma-separated as in the environment: both the same.
                    flag = [p.strip() for item in flag for p in item.split(",") if p.strip()]
                values[f.name] = tuple(flag) if isinstance(flag, list) else flag
            elif (raw := env.get(ENV_PREFIX + f.name.upper())) is not None:
                values[f.name] = _parse(f.name, str(f.type), raw)
        return cls(**values)

    def resolved_compute_threads(self) -> int:
        if self.compute_threads:
            return self.compute_threads
        return max(1, available_cpus() // 2)

    def resolved_device(self) -> str:
        import torch

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cuda" and not torch.cuda.is_available():
            raise SettingsError("device cuda was asked for, but torch sees no CUDA device")
        return self.device


def _parse(name: str, type_name: str, raw: str) -> Any:
    variable = ENV_PREFIX + name.upper()
    try:
        if type_name == "bool":
            if raw.strip().lower() not in _TRUE + _FALSE:
                raise ValueError(raw)
            return raw.strip().lower() in _TRUE
        if type_name == "int":
            return int(raw)
        if type_name == "float":
            return float(raw)
        if type_name.startswith("tuple[Path"):
            return tuple(Path(p.strip()) for p in raw.split(",") if p.strip())
        if type_name.startswith("tuple[str"):
            return tuple(p.strip() for p in raw.split(",") if p.strip())
        if type_name.startswith("Path"):
            return Path(raw) if raw else None
        return raw
    except ValueError:
        raise SettingsError(f"{variable}={raw!r} is not a valid {type_name}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The server flags; every default is None so unset flags fall back to the environment."""
    defaults = Settings()
    add = parser.add_argument
    add("--host", help=f"address to listen on (default {defaults.host}; $GRADPROBE_HOST)")
    add("--port", type=int, help=f"gRPC port, 0 = any free (default {defaults.port})")
    add(
        "--metrics-port",
        type=int,
        help=f"Prometheus /metrics port, 0 = any free, -1 = off (default {defaults.metrics_port})",
    )
    add(
        "--max-batch-size",
        type=int,
        help=f"images per micro-batch (default {defaults.max_batch_size})",
    )
    add(
        "--max-wait-ms",
        type=float,
        help=f"longest wait for a micro-batch to fill (default {defaults.max_wait_ms})",
    )
    add(
        "--max-queue",
        type=int,
        help=f"images waiting at most; more → RESOURCE_EXHAUSTED (default {defaults.max_queue})",
    )
    add(
        "--max-message-bytes",
        type=int,
        help=f"largest request accepted (default {defaults.max_message_bytes})",
    )
    add(
        "--max-images-per-request",
        type=int,
        help=f"default {defaults.max_images_per_request}",
    )
    add("--device", choices=("auto", "cpu", "cuda"), help="default auto: cuda when present")
    add("--workers", type=int, help=f"concurrent RPCs in flight (default {defaults.workers})")
    add(
        "--compute-threads",
        type=int,
        help="intra-op threads of the model pass (default 0: half the cores, at least 1)",
    )
    add(
        "--batching",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="micro-batch concurrent requests (default on)",
    )
    add(
        "--grace-s",
        type=float,
        help=f"on SIGTERM, time for in-flight requests (default {defaults.grace_s})",
    )
    add(
        "--simulate-memory-cap",
        type=int,
        metavar="IMAGES",
        help="fault tests only: passes over more images fail as out of accelerator memory, to "
        "exercise the split-and-retry path (default 0: off)",
    )
    add(
        "--model-dir",
        dest="model_dirs",
        type=Path,
        action="append",
        help="a model dir made by `gradprobe fit` (repeat for several models, or give a folder "
        "of model dirs); default: the built-in Fashion-MNIST example",
    )
    add("-q", "--quiet", action="store_true", default=None, help="no notes on stderr")
    add("--tls-cert", type=Path, help="PEM certificate chain of the server: turns TLS on")
    add("--tls-key", type=Path, help="the unencrypted PEM private key of --tls-cert")
    add(
        "--tls-client-ca",
        type=Path,
        help="PEM CA: mutual TLS, clients must present a certificate it signed",
    )
    add(
        "--tls-allowed-identities",
        action="append",
        help="with --tls-client-ca: client certificate names (SAN or CN) allowed to call, "
        "comma-separated or repeated; others get PERMISSION_DENIED",
    )
    add(
        "--auth-token-file",
        type=Path,
        help="accepted bearer tokens, one a line (# comments): every call but health must "
        "send `authorization: Bearer <token>`",
    )
    add(
        "--health-port",
        type=int,
        help="plaintext port serving grpc.health.v1 only, for probes that cannot do TLS "
        "(default -1: off)",
    )
