"""The gRPC service: what reliability costs over plain prediction, and what batching buys.

    python -m benchmarks.service [--json] [--seconds 4]

One server on a loopback port, in this process; the throughput clients are threads, each with
its own channel, in a separate load-generator process (as in production, where clients never
share the server's interpreter and its GIL).
Latency: sequential Assess and Predict calls of one image each, alternating (p50, p99).
Throughput: 1, 8 and 32 concurrent clients sending one image per Assess for ``--seconds`` each, with
micro-batching on and then off back to back, in ``--rounds`` rounds (medians reported). The whole
run takes about two minutes on 2 CPU cores.

The server runs the default classifier with the default detector H (trained first if absent).
H's own cost is a small part of Assess: the gradient pass dominates.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

import numpy as np

CONCURRENCY = (1, 8, 32)
THROUGHPUT_HEADER = (
    "| concurrent clients | batched req/s | mean micro-batch | unbatched req/s "
    "| batching gain (range over rounds) "
    "| server CPU ms / request, batched / unbatched | client CPU ms / request |\n"
    "|---:|---:|---:|---:|---:|---:|---:|"
)
# Enough calls that p99 is a percentile, not the one slowest call (one stall of 60 was).
LATENCY_CALLS = 500


def _assessor() -> tuple[Any, str]:
    """The default classifier with the default detector H (trained first if absent), on the
    server's default device: CUDA when torch sees it."""
    from service.server import load_assessors
    from service.settings import Settings

    (assessor,) = load_assessors(Settings(quiet=True))
    return assessor, f"default H ({assessor.detector.version})"


def _start(assessor: Any, batching: bool, max_wait_ms: float, compute_threads: int = 0) -> Any:
    from service.server import ReliabilityServer
    from service.settings import Settings

    server = ReliabilityServer(
        Settings(
            port=0,
            metrics_port=-1,
            max_batch_size=32,
            max_wait_ms=max_wait_ms,
            max_queue=1024,
            workers=64,
            batching=batching,
            compute_threads=compute_threads,
        )
    )
    server.start()
    server.load(assessor)
    return server


def _percentiles(samples_ms: list[float]) -> tuple[float, float]:
    return float(np.percentile(samples_ms, 50)), float(np.percentile(samples_ms, 99))


def _latencies(target: str, image: np.ndarray) -> tuple[list[float], list[float]]:
    """Sequential one-image Assess and Predict calls, alternating, so that both see the same
    machine state (their ratio is what matters; this machine's speed drifts over seconds)."""
    from service.client import ReliabilityClient

    assess: list[float] = []
    predict: list[float] = []
    with ReliabilityClient(target, timeout=60) as client:
        for _ in range(5):
            client.assess(image)
            client.predict(image)
        for _ in range(LATENCY_CALLS):
            for call, samples in ((client.assess, assess), (client.predict, predict)):
                start = time.perf_counter()
                call(image)
                samples.append((time.perf_counter() - start) * 1000)
    return assess, predict


def _throughput(target: str, image: np.ndarray, clients: int, seconds: float) -> dict[str, float]:
    """``clients`` threads, each with its own channel, calling Assess back to back.

    The load generator shares the cores with the server, so it is kept light: the request is
    serialized once, and only the batch size is read from each response (a full client
    would build and parse every message; that costs both modes alike, and is not what is
    measured here).
    """
    import resource

    import grpc

    from service._proto.gradprobe.v1 import reliability_pb2 as pb
    from service.client import image_messages

    request = pb.AssessRequest(images=image_messages(image)).SerializeToString()
    done = [0] * clients
    batch_sizes: list[list[int]] = [[] for _ in range(clients)]
    barrier = threading.Barrier(clients + 1)
    stop_at = [0.0]

    def run(i: int) -> None:
        with grpc.insecure_channel(target) as channel:
            # Bytes in, bytes out: no per-call message building in the load generator.
            assess = channel.unary_unary("/gradprobe.v1.Reliability/Assess")
            parse = pb.AssessResponse.FromString
            assess(request, timeout=60, wait_for_ready=True)  # connect before the clock starts
            barrier.wait()
            sizes = batch_sizes[i]
            while time.perf_counter() < stop_at[0]:
                sizes.append(parse(assess(request, timeout=60)).results[0].timings.batch_size)
                done[i] += 1

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    stop_at[0] = time.perf_counter() + seconds + 10  # provisional, until all are connected
    barrier.wait()
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    stop_at[0] = start + seconds
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu_s = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    sizes = [size for per_client in batch_sizes for size in per_client]
    return {
        "rps": sum(done) / elapsed,
        "requests": sum(done),
        "mean_batch": statistics.fmean(sizes) if sizes else 0.0,
        "client_cpu_ms_per_request": 1000 * cpu_s / max(1, sum(done)),
    }


def _throughput_in_process(target: str, clients: int, seconds: float) -> dict[str, float]:
    """The load comes from another process, as it would in production: client threads in
    the server's own process would compete with it for the GIL and measure that instead."""
    import resource

    cmd = [sys.executable, "-m", "benchmarks.service", "--load", target, str(clients), str(seconds)]
    before = resource.getrusage(resource.RUSAGE_SELF)
    result = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=300)
    after = resource.getrusage(resource.RUSAGE_SELF)
    if result.returncode != 0:
        raise RuntimeError(f"load generator failed:\n{result.stderr[-2000:]}")
    point = json.loads(result.stdout.strip().splitlines()[-1])
    # The server's CPU over the whole point (the load generator's start-up adds a little):
    # with the clients it is what the cores must supply per request.
    cpu_s = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    point["server_cpu_ms_per_request"] = 1000 * cpu_s / max(1, point["requests"])
    return point


def _first_test_image() -> np.ndarray:
    from detectors.fit.fashion_mnist import load_fashion_mnist, to_float

    return to_float(load_fashion_mnist("test").images[:1])


def _throughput_point(
    assessor: Any, batching: bool, clients: int, seconds: float, max_wait_ms: float, threads: int
) -> dict[str, float]:
    """One throughput point on a fresh server (batching on or off)."""
    server = _start(assessor, batching=batching, max_wait_ms=max_wait_ms, compute_threads=threads)
    try:
        return _throughput_in_process(server.target, clients, seconds)
    finally:
        server.stop(0)


def run(
    seconds: float, max_wait_ms: float, compute_threads: int = 0, rounds: int = 3
) -> dict[str, Any]:
    """Latency, then ``rounds`` rounds of throughput points. Within a round, each concurrency
    is measured with batching on and then off, back to back: this machine's speed drifts over
    tens of seconds, and a ratio of two points taken far apart measures that drift too. The
    reported gain is the median of the per-round ratios; rates are medians over rounds."""
    started = time.perf_counter()
    image = _first_test_image()
    assessor, detector = _assessor()
    result: dict[str, Any] = {"detector": detector, "device": assessor.device}
    server = _start(
        assessor, batching=True, max_wait_ms=max_wait_ms, compute_threads=compute_threads
    )
    try:
        assess, predict = _latencies(server.target, image)
        result["assess_p50_ms"], result["assess_p99_ms"] = _percentiles(assess)
        result["predict_p50_ms"], result["predict_p99_ms"] = _percentiles(predict)
        result["overhead_ratio"] = result["assess_p50_ms"] / result["predict_p50_ms"]
        result["compute_threads"] = server.settings.resolved_compute_threads()
    finally:
        server.stop(0)
    points: dict[tuple[str, int], list[dict[str, float]]] = {}
    for _ in range(rounds):
        for clients in CONCURRENCY:
            for mode in ("batched", "unbatched"):
                point = _throughput_point(
                    assessor, mode == "batched", clients, seconds, max_wait_ms, compute_threads
                )
                points.setdefault((mode, clients), []).append(point)
    for clients in CONCURRENCY:
        batched, unbatched = points["batched", clients], points["unbatched", clients]
        gains = [b["rps"] / u["rps"] for b, u in zip(batched, unbatched, strict=True)]
        result[f"batched_rps_{clients}"] = _median(batched, "rps")
        result[f"batched_mean_batch_{clients}"] = _median(batched, "mean_batch")
        result[f"batched_server_cpu_ms_{clients}"] = _median(batched, "server_cpu_ms_per_request")
        result[f"batched_client_cpu_ms_{clients}"] = _median(batched, "client_cpu_ms_per_request")
        result[f"unbatched_rps_{clients}"] = _median(unbatched, "rps")
        result[f"unbatched_server_cpu_ms_{clients}"] = _median(
            unbatched, "server_cpu_ms_per_request"
        )
        result[f"batching_gain_{clients}"] = statistics.median(gains)
        result[f"batching_gains_{clients}"] = gains
    result["rounds"] = rounds
    result["seconds_per_point"] = seconds
    result["max_wait_ms"] = max_wait_ms
    result["wall_s"] = time.perf_counter() - started
    return result


def _median(points: list[dict[str, float]], key: str) -> float:
    return float(statistics.median(p[key] for p in points))


def markdown(r: dict[str, Any]) -> str:
    from benchmarks.results import environment

    rows = "\n".join(
        f"| {c} | {r[f'batched_rps_{c}']:.1f} | {r[f'batched_mean_batch_{c}']:.1f} | "
        f"{r[f'unbatched_rps_{c}']:.1f} | {r[f'batching_gain_{c}']:.2f}× "
        f"({min(r[f'batching_gains_{c}']):.2f}–{max(r[f'batching_gains_{c}']):.2f}) | "
        f"{r[f'batched_server_cpu_ms_{c}']:.2f} / {r[f'unbatched_server_cpu_ms_{c}']:.2f} | "
        f"{r[f'batched_client_cpu_ms_{c}']:.2f} |"
        for c in CONCURRENCY
    )
    return f"""## gRPC service (`python -m benchmarks.service`)

{environment()}; device {r["device"]}; detector: {r["detector"]}. Server in one process,
throughput clients in another, on loopback, sharing the same cores; one image per request.

| one image, sequential ({LATENCY_CALLS} calls each, alternating) | p50 ms | p99 ms |
|---|---:|---:|
| Predict (classifier only) | {r["predict_p50_ms"]:.1f} | {r["predict_p99_ms"]:.1f} |
| Assess (prediction + gradients + H) | {r["assess_p50_ms"]:.1f} | {r["assess_p99_ms"]:.1f} |

Assess / Predict at p50: **{r["overhead_ratio"]:.1f}×**.

{THROUGHPUT_HEADER}
{rows}

CPU per request is what the cores supply for one answer: the server's (its gRPC threads and the
pass) and the load generator's, which shares the same cores here.

Micro-batching: up to 32 images, at most {r["max_wait_ms"]:g} ms wait (only after a batch of
several requests: a lone client never waits); compute threads for batches of 8 or more:
{r["compute_threads"]}; {r["seconds_per_point"]:g} s per point. Rates and gains are medians of
{r["rounds"]} rounds; in each round every concurrency runs batched, then unbatched, back to back.

Targets:
- Assess p50 ≤ 3× Predict p50: {r["overhead_ratio"]:.2f}×: {_met(r["overhead_ratio"] <= 3)}
- batching gain at 32 clients ≥ 3×: {r["batching_gain_32"]:.2f}×: {_met(r["batching_gain_32"] >= 3)}
"""


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.service",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    parser.add_argument(
        "--seconds", type=float, default=4.0, help="duration of each throughput point"
    )
    parser.add_argument(
        "--no-write", action="store_true", help="do not update benchmarks/RESULTS.md"
    )
    parser.add_argument(
        "--max-wait-ms",
        type=float,
        default=None,
        help="micro-batch wait (default: the server's default)",
    )
    parser.add_argument(
        "--compute-threads",
        type=int,
        default=0,
        help="torch threads for micro-batches (default 0: the server's own choice)",
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="rounds of throughput points (medians are reported)"
    )
    parser.add_argument("--load", nargs=3, help=argparse.SUPPRESS)  # target clients seconds
    args = parser.parse_args(argv)
    if args.load:
        target, clients, seconds = args.load
        print(json.dumps(_throughput(target, _first_test_image(), int(clients), float(seconds))))
        return 0
    if args.max_wait_ms is None:
        from service.settings import Settings

        args.max_wait_ms = Settings().max_wait_ms
    result = run(args.seconds, args.max_wait_ms, args.compute_threads, args.rounds)
    if not args.no_write:
        from benchmarks.results import write_section

        write_section("service", markdown(result))
    if args.json:
        print(json.dumps(result))
    else:
        print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
