"""Faults injected into a real ``gradprobe serve`` process, and what the server does.

    python -m benchmarks.faults [--model-dir DIR] [--no-write]

Each scenario starts real server processes (``benchmarks.serving_process.ServerProcess``) on
loopback, injects one fault and returns an observation: ``fault``, ``done`` (what was done),
``observed`` (what the server did, in words), ``passed`` and the raw measurements under
``data``. ``tests/service/test_faults.py`` runs the same functions and asserts on ``data``; this
module writes them as the "faults" table of RELIABILITY.md.

- SIGTERM mid-batch: in-flight requests are answered, new calls refused UNAVAILABLE, exit 0.
- SIGKILL and restart on the same port: a channel kept open reconnects, health turns SERVING
  on the new process, and the same images get the same verdicts.
- A tampered classifier or detector file: the start is refused with one line naming the file
  and both hashes.
- A full queue: RESOURCE_EXHAUSTED, and the server's memory does not grow with refusals.
- Clients killed mid-stream: their handlers and reader threads end; the worker pool is whole.
- A port taken (gRPC or metrics): the start fails with one line naming the port and the flag.
- Out of accelerator memory (simulated with ``--simulate-memory-cap``): a big batch is split
  in halves and retried, answered as if uncapped.

Scenarios that do not kill their server can share one (``shared_server``), as the tests do.
"""

from __future__ import annotations

import argparse
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from benchmarks.serving_process import REPO, ServerExited, ServerProcess

Observation = dict[str, Any]

# A client channel that retries a lost server often (gRPC's default backoff grows to minutes).
FAST_RECONNECT = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
]
MAX_DRAIN_REQUESTS = 128
SHARED_FLAGS = (
    "--metrics-port", "0", "--max-images-per-request", "64", "--max-queue", "64",
    "--max-batch-size", "32", "--workers", "8",
)  # fmt: skip
STREAM_CLIENT = """
import sys, threading
import grpc, numpy as np
from service._proto.gradprobe.v1 import reliability_pb2 as pb
from service._proto.gradprobe.v1 import reliability_pb2_grpc as pb_grpc
from service.client import image_messages

target, streams = sys.argv[1], int(sys.argv[2])
shape = tuple(int(v) for v in sys.argv[3].split(","))
stub = pb_grpc.ReliabilityStub(grpc.insecure_channel(target))
images = image_messages(np.full((1, *shape), 0.5, np.float32))
hold = threading.Event()

def requests():
    yield pb.AssessRequest(images=images, request_id="0")
    hold.wait()  # the stream stays open, neither more requests nor a half-close

calls = [stub.AssessStream(requests(), wait_for_ready=True, timeout=600) for _ in range(streams)]
for call in calls:
    next(call)
print("streaming", flush=True)
hold.wait()
"""


# ----------------------------------------------------------------------------- helpers


def model_shape(model_dir: Path) -> tuple[int, int, int]:
    from detectors.spec import Manifest

    return tuple(Manifest.read(Path(model_dir)).spec.input_shape)  # type: ignore[return-value]


def probe_images(shape: tuple[int, ...], count: int, seed: int = 0) -> np.ndarray:
    """Deterministic images in [0, 1]: noise at several contrasts, smooth ramps, flat ones."""
    rng = np.random.default_rng(seed)
    images = rng.random((count, *shape), dtype=np.float32)
    contrast = rng.uniform(0.05, 1.0, (count, 1, 1, 1)).astype(np.float32)
    ramp = np.linspace(0, 1, shape[-1], dtype=np.float32)
    images = 0.5 + (images - 0.5) * contrast
    images[::3] = ramp * rng.uniform(0.2, 1.0)
    images[1::5] = rng.uniform(0, 1)
    return np.clip(images, 0, 1).astype(np.float32)


def assess_request(images: np.ndarray) -> Any:
    from service._proto.gradprobe.v1 import reliability_pb2 as pb
    from service.client import image_messages

    return pb.AssessRequest(images=image_messages(images))


def answers(response: Any) -> list[dict[str, Any]]:
    from service.client import assessment_dict

    return [assessment_dict(m, i) for i, m in enumerate(response.results)]


@contextmanager
def open_stub(target: str, options: list[tuple[str, Any]] | None = None) -> Iterator[Any]:
    from service._proto.gradprobe.v1 import reliability_pb2_grpc as pb_grpc

    with grpc.insecure_channel(target, options=options or []) as channel:
        yield pb_grpc.ReliabilityStub(channel), channel


def same_answers(first: list[dict[str, Any]], second: list[dict[str, Any]]) -> dict[str, Any]:
    """Verdicts and predictions equal, and the largest score difference."""
    worst = max(
        (
            abs(a["scores"][k] - b["scores"][k])
            for a, b in zip(first, second, strict=True)
            for k in a["scores"]
        ),
        default=0.0,
    )
    return {
        "same_verdicts": [a["verdict"] for a in first] == [b["verdict"] for b in second],
        "same_predictions": [a["prediction"] for a in first] == [b["prediction"] for b in second],
        "max_score_difference": worst,
    }


def metrics_port(server: ServerProcess) -> int:
    """The metrics port from the ready line (``--metrics-port 0`` picks a free one)."""
    for line in server.log:
        if match := re.search(r"metrics on \S+?:(\d+)", line):
            return int(match.group(1))
    raise ServerExited("the server serves no metrics: start it with --metrics-port 0")


def metric(server: ServerProcess, name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include ``labels``."""
    from prometheus_client.parser import text_string_to_metric_families

    url = f"http://{server.host}:{metrics_port(server)}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


def wait_until(condition: Callable[[], bool], timeout_s: float = 60.0) -> bool:
    """Poll ``condition`` until it holds (True) or ``timeout_s`` passes (False): a bound on
    how long a broken server is waited for, not a measurement."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _served(model_dir: Path, *flags: str) -> ServerProcess:
    return ServerProcess(["--model-dir", str(model_dir), *flags])


def _start_failure(model_dir: Path, *flags: str) -> dict[str, Any]:
    """Start a server that should refuse to start: its exit status and stderr."""
    server = _served(model_dir, *flags)
    try:
        server.start()
    except ServerExited:
        pass
    else:
        server.stop()
        return {
            "started": True,
            "exit_code": None,
            "error_line": "",
            "traceback": False,
            "before": [],
        }
    assert server.process is not None
    lines = [line.rstrip() for line in server.log if line.strip()]
    return {
        "started": False,
        "exit_code": server.process.returncode,
        "error_line": lines[-1] if lines else "",
        "traceback": any("Traceback" in line for line in lines),
        "before": lines[:-1],  # what stderr held before the error line (gRPC's own log)
    }


# ----------------------------------------------------------------------------- scenarios


def sigterm_mid_batch(
    model_dir: Path, requests: int | None = None, images: int = 64, *, queued_s: float = 2.0
) -> Observation:
    """SIGTERM while requests are queued and computing: they are all answered, a new call
    during the drain is refused (on the open channel and on a new one), exit status 0.

    Without ``requests``, as many as take about ``queued_s`` to compute here (timed on one
    first), so the drain is still on when the new calls come, on a slow CPU or a fast GPU
    alike (the server notices SIGTERM within half a second).
    """
    batch = probe_images(model_shape(model_dir), images)
    request = assess_request(batch)
    most = requests or MAX_DRAIN_REQUESTS
    # Each request computes alone (batches of at most 4 images), one after another; every
    # one is queued and has a handler thread.
    flags = ("--max-batch-size", "4", "--max-queue", str(most * images), "--grace-s", "120")
    server = _served(model_dir, *flags, "--workers", str(most + 8)).start()
    try:
        if requests is None:
            with open_stub(server.target) as (stub, _):
                started = time.perf_counter()
                stub.Assess(request, timeout=300)
                each_s = time.perf_counter() - started
            requests = min(MAX_DRAIN_REQUESTS, max(8, int(queued_s / each_s) + 2))
        with (
            open_stub(server.target) as (stub, _),
            ThreadPoolExecutor(requests) as pool,
        ):
            calls = [pool.submit(stub.Assess, request, timeout=300) for _ in range(requests)]
            wait_futures(calls, return_when=FIRST_COMPLETED)
            assert server.process is not None
            server.process.send_signal(signal.SIGTERM)
            draining = wait_until(lambda: any("draining" in line for line in server.log))
            refused = {}
            for name, new_channel in (("open channel", False), ("new channel", True)):
                try:
                    if new_channel:
                        with open_stub(server.target) as (fresh, _):
                            fresh.Assess(assess_request(batch[:1]), timeout=30)
                    else:
                        stub.Assess(assess_request(batch[:1]), timeout=30)
                    refused[name] = "OK"
                except grpc.RpcError as exc:
                    refused[name] = exc.code().name
            unfinished_at_refusal = sum(not c.done() for c in calls)
            outcomes = []
            for call in calls:
                try:
                    outcomes.append(len(call.result().results))
                except grpc.RpcError as exc:
                    outcomes.append(exc.code().name)
        exit_code = server.process.wait(120)
    finally:
        server.kill()
    answered = sum(o == images for o in outcomes)
    data = {
        "requests": requests,
        "answered": answered,
        "outcomes": outcomes,
        "draining_logged": draining,
        "unfinished_at_refusal": unfinished_at_refusal,
        "new_calls": refused,
        "exit_code": exit_code,
    }
    passed = (
        answered == requests
        and unfinished_at_refusal > 0
        and set(refused.values()) == {"UNAVAILABLE"}
        and exit_code == 0
    )
    return {
        "fault": "SIGTERM mid-batch",
        "done": f"{requests} Assess calls of {images} images in flight (computed one at a time); "
        "SIGTERM after the first answer; during the drain a new call on the open channel and "
        "one on a new channel",
        "observed": f"{answered}/{requests} in-flight answered (still {unfinished_at_refusal} "
        f"unfinished when the new calls came); new calls: "
        f"{', '.join(f'{k} {v}' for k, v in refused.items())}; exit status {exit_code}",
        "passed": passed,
        "data": data,
    }


def sigkill_and_restart(model_dir: Path, images: int = 8) -> Observation:
    """SIGKILL, then a new process on the same port: a channel kept open reconnects, health
    turns SERVING on the new process, and the same images get the same verdicts."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    batch = probe_images(model_shape(model_dir), images, seed=1)
    request = assess_request(batch)
    first = _served(model_dir).start()
    restarted: ServerProcess | None = None
    statuses: list[str] = []  # what the health Watch said, or how it broke
    serving_again = threading.Event()
    stop_watching = threading.Event()
    try:
        with open_stub(first.target, FAST_RECONNECT) as (stub, channel):
            before = answers(stub.Assess(request, timeout=120, wait_for_ready=True))
            health = health_pb2_grpc.HealthStub(channel)
            check = health_pb2.HealthCheckRequest(service="gradprobe.v1.Reliability")

            def watch() -> None:
                # Health Watch over the same channel; a broken watch is started again. Once
                # the first process is gone, a status can only come from the new one.
                broken = False
                while not stop_watching.is_set():
                    try:
                        for update in health.Watch(check, wait_for_ready=True, timeout=300):
                            name = health_pb2.HealthCheckResponse.ServingStatus.Name(update.status)
                            statuses.append(name)
                            if broken and name == "SERVING":
                                serving_again.set()
                                return
                    except grpc.RpcError as exc:
                        statuses.append(exc.code().name)
                        broken = True
                        time.sleep(0.05)

            watcher = threading.Thread(target=watch, name="health-watch", daemon=True)
            watcher.start()
            wait_until(lambda: bool(statuses))
            assert first.process is not None
            first.process.kill()
            killed_exit = first.process.wait()
            try:
                stub.Assess(request, timeout=10)
                while_down = "OK"
            except grpc.RpcError as exc:
                while_down = exc.code().name
            restarted = _served(model_dir, "--port", str(first.port)).start()
            after = answers(stub.Assess(request, timeout=120, wait_for_ready=True))
            serving = serving_again.wait(60)
            stop_watching.set()
    finally:
        stop_watching.set()
        first.kill()
        if restarted is not None:
            restarted.stop()
    # Consecutive repeats collapsed: the sequence of states the watch went through.
    sequence = [s for i, s in enumerate(statuses) if i == 0 or s != statuses[i - 1]]
    comparison = same_answers(before, after)
    data = {
        "killed_exit_code": killed_exit,
        "while_down": while_down,
        "health_sequence": sequence,
        "serving_on_new_process": serving,
        **comparison,
    }
    passed = (
        serving
        and sequence[:2] == ["SERVING", "UNAVAILABLE"]
        and while_down == "UNAVAILABLE"
        and comparison["same_verdicts"]
        and comparison["same_predictions"]
    )
    shown = " → ".join(sequence)
    return {
        "fault": "SIGKILL and restart",
        "done": f"Assess of {images} images; SIGKILL; a call while down; a new process on the "
        "same port; Assess again over the channel kept open (wait_for_ready); health Watch "
        "throughout",
        "observed": f"killed (exit {killed_exit}); a call while down: {while_down}; health Watch: "
        f"{shown}; "
        f"after the restart the same verdicts: {comparison['same_verdicts']} "
        f"(max score difference {comparison['max_score_difference']:.1e})",
        "passed": passed,
        "data": data,
    }


def _flip_middle_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def tampered_file(model_dir: Path, which: str, workdir: Path | None = None) -> Observation:
    """A byte changed in a copy of the model dir's classifier file (``which="classifier"``) or
    its detector's ONNX (``"detector"``): the server must refuse to start, in one line naming
    the file and both hashes."""
    from detectors.detector import MANIFEST_FILE as DETECTOR_MANIFEST
    from detectors.detector import ONNX_FILE
    from detectors.model_dir import DETECTOR_DIR, sha256_file
    from detectors.spec import Manifest

    if which not in ("classifier", "detector"):
        raise ValueError(f"which is 'classifier' or 'detector', not {which!r}")
    with tempfile.TemporaryDirectory(prefix="gradprobe-faults-", dir=workdir) as tmp:
        copy = Path(tmp) / "model"
        shutil.copytree(model_dir, copy)
        if which == "classifier":
            manifest = Manifest.read(copy)
            target, expected = copy / manifest.file, manifest.sha256
        else:
            import json

            detector_manifest = json.loads((copy / DETECTOR_DIR / DETECTOR_MANIFEST).read_text())
            target = copy / DETECTOR_DIR / ONNX_FILE
            expected = detector_manifest["onnx_sha256"]
        _flip_middle_byte(target)
        actual = sha256_file(target)
        result = _start_failure(copy)
    line = result["error_line"]
    names = {
        "file": str(target.resolve()) in line or str(target) in line,
        "expected_sha256": expected in line,
        "actual_sha256": actual in line,
    }
    data = {**result, "file": str(target), "expected": expected, "actual": actual, **names}
    passed = (
        not result["started"]
        and result["exit_code"] not in (0, None)
        and not result["traceback"]
        and all(names.values())
    )
    shown = re.sub(r"[0-9a-f]{64}", lambda m: m.group(0)[:12] + "…", line)
    shown = shown.replace(str(Path(tmp)), "<copy>")
    return {
        "fault": f"tampered {which} file",
        "done": f"one byte flipped in a copy of the model dir's {target.name}; `gradprobe "
        "serve --model-dir <copy>`",
        "observed": f"exit status {result['exit_code']}, "
        f"{'a traceback' if result['traceback'] else 'no traceback'}; stderr: {_quoted(shown)}",
        "passed": passed,
        "data": data,
    }


def full_queue(
    model_dir: Path,
    server: ServerProcess | None = None,
    *,
    warmup_refusals: int = 300,
    refusals: int = 2000,
    clients: int = 8,
) -> Observation:
    """Clients send 64-image requests as fast as they are answered or refused, against a
    queue that holds one such request: RESOURCE_EXHAUSTED, and the server's resident memory
    after ``refusals`` refusals stays within a tenth of the bytes refused of what it was
    after the warm-up (a leak of each refused request would be ten times that)."""
    own = server is None
    server = server or _served(model_dir, *SHARED_FLAGS).start()
    try:
        batch = probe_images(model_shape(model_dir), 64, seed=2)
        request = assess_request(batch)
        request_bytes = request.ByteSize()
        with open_stub(server.target) as (stub, _):

            def load(target_refusals: int) -> dict[str, Any]:
                lock = threading.Lock()
                counts = {"refused": 0, "answered": 0, "other": 0}
                messages: set[str] = set()

                def client() -> None:
                    while True:
                        with lock:
                            if counts["refused"] >= target_refusals:
                                return
                        try:
                            stub.Assess(request, timeout=120, wait_for_ready=True)
                            outcome = "answered"
                        except grpc.RpcError as exc:
                            refused = exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                            outcome = "refused" if refused else "other"
                            if refused:
                                messages.add(exc.details())
                        with lock:
                            counts[outcome] += 1

                with ThreadPoolExecutor(clients) as pool:
                    for future in [pool.submit(client) for _ in range(clients)]:
                        future.result()
                return {**counts, "messages": sorted(messages)}

            load(warmup_refusals)
            codes_before = metric(server, "gradprobe_requests_total", code="RESOURCE_EXHAUSTED")
            before = server.resources()
            measured = load(refusals)
            after = server.resources()
            still_answers = len(stub.Assess(assess_request(batch[:2]), timeout=120).results)
            counted = (
                metric(server, "gradprobe_requests_total", code="RESOURCE_EXHAUSTED") - codes_before
            )
    finally:
        if own:
            server.stop()
    refused_bytes = measured["refused"] * request_bytes
    growth = after["rss_bytes"] - before["rss_bytes"]
    bound = refused_bytes // 10
    data = {
        "request_bytes": request_bytes,
        **{k: measured[k] for k in ("refused", "answered", "other", "messages")},
        "refused_counted_by_server": counted,
        "rss_before": before["rss_bytes"],
        "rss_after": after["rss_bytes"],
        "rss_growth": growth,
        "rss_bound": bound,
        "threads_before": before["threads"],
        "threads_after": after["threads"],
        "still_answers": still_answers,
    }
    passed = (
        measured["refused"] >= refusals
        and measured["other"] == 0
        and growth <= bound
        and still_answers == 2
    )
    mib = 1024 * 1024
    return {
        "fault": "full queue",
        "done": f"{clients} clients sending {request_bytes // 1024} KiB Assess calls (64 images) "
        f"at a queue of 64 images until {measured['refused']} refusals, after "
        f"{warmup_refusals} for warm-up",
        "observed": f"{measured['refused']} RESOURCE_EXHAUSTED ('queue is full'), "
        f"{measured['answered']} answered, {measured['other']} other; server RSS "
        f"{before['rss_bytes'] / mib:.0f} → {after['rss_bytes'] / mib:.0f} MiB "
        f"({growth / mib:+.1f} MiB for {refused_bytes / mib:.0f} MiB refused; bound "
        f"{bound / mib:.0f} MiB)",
        "passed": passed,
        "data": data,
    }


def stream_disconnect(
    model_dir: Path, server: ServerProcess | None = None, *, workers: int = 8
) -> Observation:
    """A client process holds ``workers`` streams open mid-stream (as many as the server has
    handler threads) and is SIGKILLed: the server's threads go back to their count before,
    and ``workers`` new streams are all answered (a leaked handler would hold a worker)."""
    own = server is None
    server = server or _served(model_dir, *SHARED_FLAGS).start()
    shape = model_shape(model_dir)
    batch = probe_images(shape, 1, seed=3)
    try:
        with open_stub(server.target) as (stub, _):

            def one_stream(_: int) -> int:
                responses = stub.AssessStream(iter([assess_request(batch)]), timeout=120)
                return sum(len(r.results) for r in responses)

            # Warm-up: as many streams as workers, so the pool has all its threads.
            with ThreadPoolExecutor(workers) as pool:
                list(pool.map(one_stream, range(workers)))
            baseline = server.resources()["threads"]
            command = [sys.executable, "-c", STREAM_CLIENT, server.target, str(workers)]
            client = subprocess.Popen(
                [*command, ",".join(map(str, shape))],
                cwd=REPO,
                stdout=subprocess.PIPE,
                text=True,
            )
            try:
                assert client.stdout is not None
                streaming = client.stdout.readline().strip() == "streaming"
                during = server.resources()["threads"]
            finally:
                client.kill()
                client.wait()
            returned = wait_until(lambda: server.resources()["threads"] <= baseline)
            after = server.resources()["threads"]
            with ThreadPoolExecutor(workers) as pool:
                try:
                    served = sum(pool.map(one_stream, range(workers)))
                except grpc.RpcError as exc:
                    served = -1
                    failure = exc.code().name
                else:
                    failure = ""
    finally:
        if own:
            server.stop()
    data = {
        "streams": workers,
        "client_was_streaming": streaming,
        "threads_baseline": baseline,
        "threads_during": during,
        "threads_after": after,
        "threads_returned": returned,
        "new_streams_answered": served,
        "new_streams_failure": failure,
    }
    passed = streaming and during > baseline and returned and served == workers
    return {
        "fault": "client killed mid-stream",
        "done": f"a client process opens {workers} AssessStream calls (the server's "
        "--workers), gets one answer on each, keeps them open and is SIGKILLed; then "
        f"{workers} new streams",
        "observed": f"server threads {baseline} → {during} while streaming → {after} after the "
        f"kill; new streams answered: {served}/{workers}" + (f" ({failure})" if failure else ""),
        "passed": passed,
        "data": data,
    }


@contextmanager
def _taken_port() -> Iterator[int]:
    import socket

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        yield held.getsockname()[1]


def port_taken(model_dir: Path, flag: str) -> Observation:
    """``gradprobe serve FLAG <a port another socket listens on>``: the start fails with one
    line naming the port and the flag to change."""
    if flag not in ("--port", "--metrics-port"):
        raise ValueError(f"flag is --port or --metrics-port, not {flag!r}")
    with _taken_port() as port:
        result = _start_failure(model_dir, flag, str(port))
    line = result["error_line"]
    data = {**result, "port": port, "names_port": str(port) in line, "names_flag": flag in line}
    passed = (
        not result["started"]
        and result["exit_code"] not in (0, None)
        and not result["traceback"]
        and data["names_port"]
        and data["names_flag"]
    )
    return {
        "fault": f"{'gRPC' if flag == '--port' else 'metrics'} port taken",
        "done": f"`gradprobe serve {flag} <port another socket listens on>`",
        "observed": f"exit status {result['exit_code']}, "
        f"{'a traceback' if result['traceback'] else 'no traceback'}; stderr: "
        f"{_quoted(line.replace(str(port), '<port>'))}"
        + (
            f" (after {len(result['before'])} line(s) of gRPC's own log)"
            if result["before"]
            else ""
        ),
        "passed": passed,
        "data": data,
    }


def out_of_memory(
    model_dir: Path, reference: ServerProcess | None = None, *, cap: int = 4, images: int = 32
) -> Observation:
    """A server whose passes fail as out of accelerator memory above ``cap`` images gets one
    request of ``images``: answered, equal to an uncapped server's answers, and the splits
    counted (a batch of n > cap splits into halves until each part fits)."""
    batch = probe_images(model_shape(model_dir), images, seed=4)
    request = assess_request(batch)
    own = reference is None
    reference = reference or _served(model_dir).start()
    try:
        with open_stub(reference.target) as (stub, _):
            expected = answers(stub.Assess(request, timeout=300, wait_for_ready=True))
    finally:
        if own:
            reference.stop()
    flags = ("--simulate-memory-cap", str(cap), "--metrics-port", "0")
    with _served(model_dir, *flags) as capped, open_stub(capped.target) as (stub, _):
        splits_before = metric(capped, "gradprobe_memory_splits_total")
        try:
            got = answers(stub.Assess(request, timeout=300, wait_for_ready=True))
            failure = ""
        except grpc.RpcError as exc:
            got, failure = [], f"{exc.code().name}: {exc.details()}"
        splits = metric(capped, "gradprobe_memory_splits_total") - splits_before
        alive = capped.alive()
    # Halving n images until the parts hold at most `cap`: one split per part above the cap.
    expected_splits, parts = 0, [images]
    while parts:
        size = parts.pop()
        if size > cap:
            expected_splits += 1
            parts += [(size + 1) // 2, size // 2]
    comparison = (
        same_answers(expected, got)
        if len(got) == len(expected)
        else {"same_verdicts": False, "same_predictions": False, "max_score_difference": None}
    )
    data = {
        "answered": len(got),
        "failure": failure,
        "splits": splits,
        "expected_splits": expected_splits,
        "server_alive": alive,
        **comparison,
    }
    passed = (
        len(got) == images
        and comparison["same_verdicts"]
        and comparison["same_predictions"]
        and splits == expected_splits
        and alive
    )
    difference = comparison["max_score_difference"]
    return {
        "fault": "accelerator out of memory",
        "done": f"`--simulate-memory-cap {cap}` (passes over {cap} images raise "
        f"torch.cuda.OutOfMemoryError); one Assess of {images} images",
        "observed": f"{len(got)}/{images} answered"
        + (f" ({failure})" if failure else "")
        + f", verdicts equal to an uncapped server's: {comparison['same_verdicts']}"
        + (f" (max score difference {difference:.1e})" if difference is not None else "")
        + f"; gradprobe_memory_splits_total +{splits:g} (halving {images} down to {cap})",
        "passed": passed,
        "data": data,
    }


# ----------------------------------------------------------------------------- report


@contextmanager
def shared_server(model_dir: Path) -> Iterator[ServerProcess]:
    """One server for the scenarios that leave it running (queue, streams, reference)."""
    with _served(model_dir, *SHARED_FLAGS) as server:
        yield server


def run_all(model_dir: Path, progress: bool = True) -> list[Observation]:
    def note(observation: Observation) -> Observation:
        if progress:
            mark = "pass" if observation["passed"] else "FAIL"
            print(f"{mark}  {observation['fault']}: {observation['observed']}", file=sys.stderr)
        return observation

    observations = [
        note(sigterm_mid_batch(model_dir)),
        note(sigkill_and_restart(model_dir)),
        note(tampered_file(model_dir, "classifier")),
        note(tampered_file(model_dir, "detector")),
        note(port_taken(model_dir, "--port")),
        note(port_taken(model_dir, "--metrics-port")),
    ]
    with shared_server(model_dir) as server:
        observations += [
            note(full_queue(model_dir, server)),
            note(stream_disconnect(model_dir, server)),
            note(out_of_memory(model_dir, reference=server)),
        ]
    return observations


def _quoted(line: str) -> str:
    """A line as Markdown code; the double backticks let it hold single ones."""
    return f"`` {line} ``"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def report(observations: list[Observation], model_dir: Path) -> str:
    from benchmarks.results import environment

    rows = "\n".join(
        f"| {_cell(o['fault'])} | {_cell(o['done'])} | {_cell(o['observed'])} | "
        f"{'pass' if o['passed'] else '**FAIL**'} |"
        for o in observations
    )
    return (
        "## Faults\n\n"
        "`python -m benchmarks.faults`: each fault injected into real `gradprobe serve` "
        f"processes on loopback (model dir `{Path(model_dir).name}`); "
        "`tests/service/test_faults.py` runs the same scenarios and asserts on them.\n\n"
        "| fault | what was done | observed | result |\n|---|---|---|---|\n"
        f"{rows}\n\n"
        "- Health: `gradprobe serve` loads the model before it binds the port, so a restarted "
        "process says NOT_SERVING only while it warms up; the Watch sees that when the channel "
        "reconnects in time, else SERVING first (both are accepted).\n"
        "- Out of memory is simulated (`--simulate-memory-cap` raises the "
        "`torch.cuda.OutOfMemoryError` a CUDA device raises) on whatever device the server "
        "uses, here as below; the split path is the same for a real one.\n"
        "- Memory bound: a tenth of the bytes refused, measured after a warm-up of the same "
        "load: keeping more than a tenth of each refused request would fail the check.\n\n"
        f"{environment()}; {time.strftime('%Y-%m-%d')}.\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model-dir", type=Path, default=None, help="default: the built-in example"
    )
    parser.add_argument(
        "--no-write", action="store_true", help="print the table; leave RELIABILITY.md alone"
    )
    args = parser.parse_args(argv)
    if args.model_dir is None:
        from service.artifacts import ensure_default_model

        args.model_dir = ensure_default_model(quiet=True)
    observations = run_all(args.model_dir)
    text = report(observations, args.model_dir)
    print(text)
    if not args.no_write:
        from benchmarks.results import RELIABILITY, write_section

        write_section("faults", text, RELIABILITY)
    return 0 if all(o["passed"] for o in observations) else 1


if __name__ == "__main__":
    sys.exit(main())
