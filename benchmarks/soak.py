"""Soak: minutes of mixed load on a real ``gradprobe serve``; nothing lost, nothing leaks.

    python -m benchmarks.soak [--duration 300] [--clients 32] [--max-requests N]
                              [--model-dir DIR ...] [--interval 60] [--no-write]

A ``gradprobe serve`` process on loopback serves the built-in model (and each ``--model-dir``
beside it); ``--clients`` threads, each with its own channel, send a mix of unary Assess
calls with clean and challenge images (MNIST digits, noisy images), AssessStream calls that
mix good and malformed requests, malformed requests (INVALID_ARGUMENT), unknown model names
(NOT_FOUND), calls with deadlines of a few milliseconds (DEADLINE_EXCEEDED unless answered in
time) and calls and streams the client cancels (CANCELLED unless answered first). Every request
has its own request id, which its answer must echo.

Recorded: every request id sent and every answer or status it got (lost: sent, and neither an
answer nor a status came back; duplicated: two answers for one id); statuses by kind of
request, and answers whose status is not one its kind allows; the p50/p99 latency of unary
Assess per interval (a minute by default); the server's RSS, threads and open file descriptors
(from /proc) every few seconds; the verdicts of a fixed probe set, assessed at the start and
every ``--probe-every`` seconds under the load, which must not change. The "soak" section of
RELIABILITY.md says whether the run passed, with a plot of latency and memory over time
(benchmarks/reliability/soak.png).
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import sys
import threading
import time
import traceback
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from benchmarks.probes import Model, fashion_probes, pixels, probe_verdicts
from service._proto.gradprobe.v1 import reliability_pb2 as pb
from service._proto.gradprobe.v1 import reliability_pb2_grpc as pb_grpc

PLOT = Path(__file__).resolve().parent / "reliability" / "soak.png"
# What a client does, and how often (weights).
ACTIONS = {
    "assess": 40,  # unary Assess, 1-4 clean or challenge images
    "stream": 20,  # AssessStream of 2-8 requests, about one in five malformed
    "invalid": 10,  # unary Assess with a malformed image
    "unknown_model": 5,
    "deadline": 10,  # unary Assess with a 1-20 ms deadline
    "cancel": 8,  # unary Assess the client cancels after 0-20 ms
    "stream_cancel": 7,  # AssessStream the client cancels after its first answer
}
OK = frozenset({"OK"})
INVALID = frozenset({"INVALID_ARGUMENT"})
# Growth allowed between the baseline interval (the second: start-up is over) and the last
# one before it counts as a leak: the allocator's arenas and gRPC's lazily grown thread pool
# settle within a few percent and a few threads.
RSS_NOISE = 0.10
RSS_NOISE_MIB = 16
THREADS_NOISE = 4
FDS_NOISE = 4
P99_DRIFT = 1.5


# ----------------------------------------------------------------------------- images


@dataclass
class Pool:
    """Images of one served model, as request messages: good ones (raw float32, raw uint8
    and PNG, clean and challenge) and malformed ones."""

    model: Model
    good: list[pb.Image]
    bad: list[pb.Image]


def _png(hwc: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(hwc[..., 0] if hwc.shape[-1] == 1 else hwc).save(buffer, format="PNG")
    return buffer.getvalue()


def make_pool(model: Model, seed: int = 1) -> Pool:
    c, h, w = model.shape
    if model.shape == (1, 28, 28) and model.classes == 10:
        floats = fashion_probes(32, seed)  # clean, MNIST digits, noisy
    else:
        rng = np.random.default_rng(seed)
        smooth = np.stack([pixels(model, seed + i).reshape(h, w, c) for i in range(32)])
        smooth = smooth.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255)
        noisy = np.clip(smooth + rng.normal(0, 0.3, smooth.shape), 0, 1).astype(np.float32)
        floats = np.concatenate([smooth, noisy])
    good = []
    for index, image in enumerate(floats):
        eight = np.round(image * 255).astype(np.uint8)
        form = index % 3
        if form == 0:
            raw = pb.RawPixels(data=image.tobytes(), shape=[c, h, w], dtype=pb.RawPixels.FLOAT32)
            good.append(pb.Image(raw=raw))
        elif form == 1:
            raw = pb.RawPixels(data=eight.tobytes(), shape=[c, h, w], dtype=pb.RawPixels.UINT8)
            good.append(pb.Image(raw=raw))
        else:
            good.append(pb.Image(encoded=_png(eight.transpose(1, 2, 0))))
    nan = floats[0].copy()
    nan[0, 0, 0] = np.nan
    bad = [
        pb.Image(raw=pb.RawPixels(data=nan.tobytes(), shape=[c, h, w], dtype=2)),
        pb.Image(raw=pb.RawPixels(data=bytes(c * (h + 1) * w), shape=[c, h + 1, w], dtype=1)),
        pb.Image(raw=pb.RawPixels(data=bytes(c * h * w), shape=[c, h, w], dtype=9)),
        pb.Image(raw=pb.RawPixels(data=bytes(7), shape=[c, h, w], dtype=1)),
        pb.Image(encoded=b"GIF89a" + bytes(32)),
        pb.Image(encoded=_png(np.zeros((h, w + 3, c), np.uint8))),
        pb.Image(),
    ]
    return Pool(model, good, bad)


# ----------------------------------------------------------------------------- ledger


@dataclass
class Record:
    action: str
    expect: frozenset[str]
    codes: list[str] = field(default_factory=list)


class Ledger:
    """Every request id sent, and every answer or status it got, from all clients."""

    def __init__(self, started: float) -> None:
        self.started = started
        self.lock = threading.Lock()
        self.records: dict[str, Record] = {}
        self.strays: list[str] = []  # answers naming an id never sent (or another's)
        self.latencies: list[tuple[float, float]] = []  # (seconds since start, ms)
        self.mismatches: list[str] = []  # answers that do not fit their request
        self.out_of_order = 0
        self.client_errors: list[str] = []

    def sent(self, request_id: str, action: str, expect: frozenset[str]) -> None:
        with self.lock:
            if request_id in self.records:
                raise RuntimeError(f"request id {request_id} sent twice")
            self.records[request_id] = Record(action, expect)

    def answered(self, request_id: str, code: str, latency_ms: float | None = None) -> None:
        with self.lock:
            record = self.records.get(request_id)
            if record is None:
                self.strays.append(f"{code} for unknown request id {request_id!r}")
                return
            record.codes.append(code)
            if latency_ms is not None:
                self.latencies.append((time.monotonic() - self.started, latency_ms))

    def mismatch(self, text: str) -> None:
        with self.lock:
            self.mismatches.append(text)

    def totals(self) -> dict[str, Any]:
        with self.lock:
            records = list(self.records.values())
        codes = Counter(code for r in records for code in r.codes)
        by_action: dict[str, Counter[str]] = {}
        for r in records:
            counts = by_action.setdefault(r.action, Counter())
            counts["sent"] += 1
            counts.update(r.codes)
        unexpected = Counter(
            f"{r.action}: {code}" for r in records for code in r.codes if code not in r.expect
        )
        return {
            "sent": len(records),
            "answered": sum(1 for r in records if r.codes),
            "lost": sum(1 for r in records if not r.codes),
            "duplicated": sum(1 for r in records if len(r.codes) > 1),
            "codes": dict(codes),
            "by_action": {a: dict(c) for a, c in by_action.items()},
            "unexpected": dict(unexpected),
            "strays": len(self.strays),
            "mismatches": len(self.mismatches),
            "out_of_order": self.out_of_order,
            "client_errors": len(self.client_errors),
            "examples": (self.strays + self.mismatches + self.client_errors)[:5],
        }


# ----------------------------------------------------------------------------- clients


class Budget:
    """At most ``limit`` requests in all (None: no limit)."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.counter = itertools.count()
        self.lock = threading.Lock()

    def take(self) -> bool:
        if self.limit is None:
            return True
        with self.lock:
            return next(self.counter) < self.limit


class Client:
    """One load-generating client: its own channel, its own seeded choices."""

    def __init__(
        self,
        index: int,
        target: str,
        pools: Sequence[Pool],
        ledger: Ledger,
        budget: Budget,
        stop: threading.Event,
        seed: int,
    ) -> None:
        self.index = index
        self.pools = pools
        self.ledger = ledger
        self.budget = budget
        self.stop = stop
        self.rng = random.Random(seed * 7919 + index)
        self.ids = itertools.count()
        self.channel = grpc.insecure_channel(target)
        self.stub = pb_grpc.ReliabilityStub(self.channel)

    def run(self) -> None:
        names, weights = list(ACTIONS), list(ACTIONS.values())
        try:
            while not self.stop.is_set():
                action = self.rng.choices(names, weights)[0]
                try:
                    if not getattr(self, action)():
                        return  # the request budget is spent
                except Exception:
                    self.ledger.client_errors.append(traceback.format_exc(limit=4))
        finally:
            self.channel.close()

    # -- requests

    def _id(self) -> str:
        return f"c{self.index}-{next(self.ids)}"

    def _request(self, bad: bool = False) -> tuple[pb.AssessRequest, Pool]:
        pool = self.rng.choice(self.pools)
        if bad:
            images = [self.rng.choice(pool.bad)]
        else:
            images = self.rng.choices(pool.good, k=self.rng.randint(1, 4))
        return pb.AssessRequest(images=images, model=pool.model.name), pool

    def _unary(
        self, action: str, request: pb.AssessRequest, expect: frozenset[str], **call: Any
    ) -> bool:
        if not self.budget.take():
            return False
        request.request_id = self._id()
        self.ledger.sent(request.request_id, action, expect)
        start = time.perf_counter()
        try:
            response = self.stub.Assess(request, **call)
        except grpc.RpcError as exc:
            self.ledger.answered(request.request_id, exc.code().name)
            return True
        latency = (time.perf_counter() - start) * 1000 if action == "assess" else None
        self._answered(request, response, latency)
        return True

    def _answered(
        self, request: pb.AssessRequest, response: pb.AssessResponse, latency: float | None
    ) -> None:
        if response.request_id != request.request_id:
            self.ledger.mismatch(f"{response.request_id!r} answered {request.request_id!r}")
        if len(response.results) != len(request.images):
            self.ledger.mismatch(
                f"{request.request_id}: {len(response.results)} results for "
                f"{len(request.images)} images"
            )
        self.ledger.answered(response.request_id, "OK", latency)

    def assess(self) -> bool:
        return self._unary("assess", self._request()[0], OK, timeout=60)

    def invalid(self) -> bool:
        return self._unary("invalid", self._request(bad=True)[0], INVALID, timeout=60)

    def unknown_model(self) -> bool:
        request = self._request()[0]
        request.model = f"no-such-model-{self.rng.randint(0, 999)}"
        return self._unary("unknown_model", request, frozenset({"NOT_FOUND"}), timeout=60)

    def deadline(self) -> bool:
        expect = frozenset({"DEADLINE_EXCEEDED", "OK"})
        timeout = self.rng.uniform(0.001, 0.02)
        return self._unary("deadline", self._request()[0], expect, timeout=timeout)

    def cancel(self) -> bool:
        if not self.budget.take():
            return False
        request = self._request()[0]
        request.request_id = self._id()
        self.ledger.sent(request.request_id, "cancel", frozenset({"CANCELLED", "OK"}))
        future = self.stub.Assess.future(request, timeout=60)
        time.sleep(self.rng.uniform(0, 0.02))
        future.cancel()
        try:
            response = future.result()
        except grpc.FutureCancelledError:
            self.ledger.answered(request.request_id, "CANCELLED")
        except grpc.RpcError as exc:
            self.ledger.answered(request.request_id, exc.code().name)
        else:
            self._answered(request, response, None)
        return True

    def stream(self, cancel: bool = False) -> bool:
        action = "stream_cancel" if cancel else "stream"
        planned = []
        for _ in range(self.rng.randint(2, 8)):
            if not self.budget.take():
                break
            bad = self.rng.random() < 0.2
            expect = INVALID if bad else OK
            if cancel:
                expect = expect | {"CANCELLED"}
            planned.append((self._request(bad)[0], expect))
        if not planned:
            return False
        lock = threading.Lock()
        sent: list[str] = []
        ended = [False]

        def requests() -> Iterator[pb.AssessRequest]:
            for request, expect in planned:
                with lock:  # nothing is recorded as sent once the stream is given up
                    if ended[0]:
                        return
                    request.request_id = self._id()
                    self.ledger.sent(request.request_id, action, expect)
                    sent.append(request.request_id)
                yield request

        call = self.stub.AssessStream(requests(), timeout=60)
        answered: list[str] = []
        try:
            for response in call:
                code = "OK"
                if response.HasField("error"):
                    code = _CODE_NAMES.get(response.error.code, f"code {response.error.code}")
                self.ledger.answered(response.request_id, code)
                answered.append(response.request_id)
                if cancel:
                    call.cancel()
                    break
        except grpc.RpcError as exc:
            status = exc.code().name
        else:
            status = "CANCELLED" if cancel else None
        with lock:
            ended[0] = True
            done = set(answered)
            unanswered = [rid for rid in sent if rid not in done]
        if answered != sent[: len(answered)]:
            with self.ledger.lock:
                self.ledger.out_of_order += 1
        if status is not None:  # the stream ended with a status: the rest of it got it
            for rid in unanswered:
                self.ledger.answered(rid, status)
        return True

    def stream_cancel(self) -> bool:
        return self.stream(cancel=True)


_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


# ----------------------------------------------------------------------------- run


def _served_models(target: str) -> list[Model]:
    with grpc.insecure_channel(target) as channel:
        infos = pb_grpc.ReliabilityStub(channel).ListModels(pb.ListModelsRequest(), timeout=60)
    return [
        Model(m.name, tuple(m.input_shape), len(m.classes), m.resizes_encoded) for m in infos.models
    ]


def _percentile(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def run(
    duration_s: float = 300.0,
    clients: int = 32,
    max_requests: int | None = None,
    model_dirs: Sequence[str | Path] = (),
    interval_s: float = 60.0,
    probe_every_s: float = 30.0,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """The soak; returns what the report shows (JSON-serializable)."""
    from benchmarks.serving_process import ServerProcess

    flags = ["-q", "--max-queue", "4096", "--workers", "64"]
    if model_dirs:
        from service.artifacts import ensure_default_model

        for model_dir in [ensure_default_model(quiet=True), *model_dirs]:
            flags += ["--model-dir", str(model_dir)]
    sample_s = min(5.0, interval_s / 4)
    with ServerProcess(flags) as server:
        models = _served_models(server.target)
        pools = [make_pool(m) for m in models]
        probes_at_start = probe_verdicts(server.target, models)
        started = time.monotonic()
        ledger = Ledger(started)
        stop = threading.Event()
        samples: list[dict[str, float]] = []
        probes: list[dict[str, Any]] = []

        def sample() -> None:
            while True:
                if server.alive():
                    samples.append({"t": time.monotonic() - started, **server.resources()})
                if stop.wait(sample_s):
                    return

        def probe() -> None:
            while not stop.wait(probe_every_s):
                try:
                    same = probe_verdicts(server.target, models) == probes_at_start
                except grpc.RpcError as exc:
                    same = False
                    ledger.client_errors.append(f"probe: {exc.code().name}")
                probes.append({"t": time.monotonic() - started, "same": same})

        budget = Budget(max_requests)
        workers = [
            threading.Thread(
                target=Client(i, server.target, pools, ledger, budget, stop, seed).run,
                name=f"soak-client-{i}",
            )
            for i in range(clients)
        ]
        helpers = [threading.Thread(target=f, daemon=True) for f in (sample, probe)]
        for thread in helpers + workers:
            thread.start()
        deadline = started + duration_s
        last_report = started
        while time.monotonic() < deadline and any(t.is_alive() for t in workers):
            time.sleep(0.5)
            if progress and time.monotonic() - last_report >= 10:
                last_report = time.monotonic()
                _progress(ledger, samples, probes, started)
            if not server.alive():
                break
        stop.set()
        for thread in workers + helpers:
            thread.join(120)
        elapsed = time.monotonic() - started
        alive = server.alive()
        if alive:
            samples.append({"t": elapsed, **server.resources()})
        final_probe = probe_verdicts(server.target, models) == probes_at_start if alive else False
        probes.append({"t": elapsed, "same": final_probe})
        exit_code = server.stop()
        log_errors = [line.strip() for line in server.log if " ERROR " in line]
    return {
        "duration_s": duration_s,
        "elapsed_s": elapsed,
        "clients": clients,
        "max_requests": max_requests,
        "interval_s": interval_s,
        "probe_every_s": probe_every_s,
        "sample_s": sample_s,
        "seed": seed,
        "models": [f"{m.name} {list(m.shape)}" for m in models],
        "server_flags": flags,
        "totals": ledger.totals(),
        "intervals": _intervals(ledger.latencies, samples, probes, elapsed, interval_s, ledger),
        "window_s": min(10.0, interval_s / 2),
        "windows": _windows(ledger.latencies, elapsed, min(10.0, interval_s / 2)),
        "samples": samples,
        "probes": probes,
        "probe_images": sum(len(v) for v in probes_at_start.values()),
        "alive": alive,
        "exit_code": exit_code,
        "log_errors": log_errors[:10],
        "log_error_count": len(log_errors),
    }


def _progress(ledger: Ledger, samples: list[dict], probes: list[dict], started: float) -> None:
    now = time.monotonic() - started
    totals = ledger.totals()
    recent = [ms for t, ms in ledger.latencies if t >= now - 10]
    last = samples[-1] if samples else {"rss_bytes": 0, "threads": 0, "fds": 0}
    p50, p99 = _percentile(recent, 50), _percentile(recent, 99)
    codes = ", ".join(f"{c} {n}" for c, n in sorted(totals["codes"].items()))
    print(
        f"[{now:5.0f} s] sent {totals['sent']}, awaiting an answer {totals['lost']}, "
        f"duplicated {totals['duplicated']} ({codes}); Assess p50/p99 over 10 s "
        f"{_ms(p50)}/{_ms(p99)} ms; server RSS {last['rss_bytes'] / 2**20:.0f} MiB, "
        f"{last['threads']} threads, {last['fds']} fds; probes same "
        f"{sum(p['same'] for p in probes)}/{len(probes)}",
        file=sys.stderr,
        flush=True,
    )


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _intervals(
    latencies: list[tuple[float, float]],
    samples: list[dict],
    probes: list[dict],
    elapsed: float,
    interval_s: float,
    ledger: Ledger,
) -> list[dict[str, Any]]:
    """Per interval: latency percentiles of unary Assess, answers, and the median of the
    server's RSS, threads and fds sampled in it (the median: a stream's reader thread lives as
    long as its stream, so the count moves with the load from sample to sample)."""
    # Whole intervals; the last takes the few seconds past them (the clients' last calls).
    count = max(1, int(elapsed // interval_s))
    rows = []
    for i in range(count):
        low = i * interval_s
        high = (i + 1) * interval_s if i < count - 1 else float("inf")
        window = [ms for t, ms in latencies if low <= t < high]
        inside = [s for s in samples if low <= s["t"] < high] or samples[-1:]
        rows.append(
            {
                "interval": i + 1,
                "seconds": min(high, elapsed) - low,
                "assess_ok": len(window),
                "p50_ms": _percentile(window, 50),
                "p99_ms": _percentile(window, 99),
                "rss_mib": _median(inside, "rss_bytes") / 2**20,
                "threads": round(_median(inside, "threads")),
                "fds": round(_median(inside, "fds")),
                "probes": [p["same"] for p in probes if low <= p["t"] < high],
            }
        )
    return rows


def _median(samples: list[dict], key: str) -> float:
    return float(np.median([s[key] for s in samples])) if samples else 0.0


def _windows(latencies: list[tuple[float, float]], elapsed: float, width: float) -> list[dict]:
    """p50/p99 of unary Assess in consecutive windows of ``width`` seconds (for the plot)."""
    rows = []
    for i in range(max(1, int(np.ceil(elapsed / width)))):
        window = [ms for t, ms in latencies if i * width <= t < (i + 1) * width]
        if window:
            rows.append(
                {
                    "t": (i + 0.5) * width,
                    "p50_ms": _percentile(window, 50),
                    "p99_ms": _percentile(window, 99),
                }
            )
    return rows


# ----------------------------------------------------------------------------- verdict


def verdict(r: dict[str, Any]) -> dict[str, tuple[bool | None, str]]:
    """Each criterion: (passed, what was measured); None: the run was too short to judge."""
    totals, rows = r["totals"], r["intervals"]
    bad = {c: totals["codes"].get(c, 0) for c in ("INTERNAL", "UNKNOWN")}
    checks: dict[str, tuple[bool | None, str]] = {
        "zero lost or duplicated answers": (
            totals["lost"] == 0
            and totals["duplicated"] == 0
            and totals["strays"] == 0
            and totals["mismatches"] == 0,
            f"lost {totals['lost']}, duplicated {totals['duplicated']}, answers for unknown "
            f"ids {totals['strays']}, answers not matching their request "
            f"{totals['mismatches']}",
        ),
        "zero INTERNAL": (
            sum(bad.values()) == 0 and r["log_error_count"] == 0,
            f"INTERNAL {bad['INTERNAL']}, UNKNOWN {bad['UNKNOWN']}, errors in the server's log "
            f"{r['log_error_count']}",
        ),
        "every refusal has its expected status": (
            not totals["unexpected"] and totals["client_errors"] == 0,
            f"unexpected {totals['unexpected'] or 'none'}, client errors "
            f"{totals['client_errors']}, streams answered out of order {totals['out_of_order']}",
        ),
        "probe verdicts unchanged": (
            all(p["same"] for p in r["probes"]),
            f"{sum(p['same'] for p in r['probes'])} of {len(r['probes'])} checks equal to the "
            "start",
        ),
        "server alive, exit 0 on SIGTERM": (
            r["alive"] and r["exit_code"] == 0,
            f"alive {r['alive']}, exit status {r['exit_code']}",
        ),
    }
    if len(rows) >= 3:
        base, last = rows[1], rows[-1]
        rss_limit = base["rss_mib"] * (1 + RSS_NOISE) + RSS_NOISE_MIB
        checks["no growth of RSS, threads, fds"] = (
            last["rss_mib"] <= rss_limit
            and last["threads"] <= base["threads"] + THREADS_NOISE
            and last["fds"] <= base["fds"] + FDS_NOISE,
            f"interval 2 → {last['interval']}: RSS {base['rss_mib']:.0f} → "
            f"{last['rss_mib']:.0f} MiB (limit {rss_limit:.0f}), threads {base['threads']} → "
            f"{last['threads']} (limit +{THREADS_NOISE}), fds {base['fds']} → {last['fds']} "
            f"(limit +{FDS_NOISE})",
        )
    else:
        checks["no growth of RSS, threads, fds"] = (
            None,
            f"not judged: {len(rows)} interval(s); the baseline is interval 2, after start-up",
        )
    first, last = rows[0]["p99_ms"], rows[-1]["p99_ms"]
    if len(rows) >= 2 and first and last:
        checks[f"last-interval p99 ≤ {P99_DRIFT}× first"] = (
            last <= P99_DRIFT * first,
            f"{first:.0f} → {last:.0f} ms ({last / first:.2f}×)",
        )
    else:
        checks[f"last-interval p99 ≤ {P99_DRIFT}× first"] = (
            None,
            f"not judged: {len(rows)} interval(s)",
        )
    return checks


def passed(r: dict[str, Any]) -> bool:
    return all(ok is not False for ok, _ in verdict(r).values())


def markdown(r: dict[str, Any], plot: Path | None = None) -> str:
    from benchmarks.results import environment

    totals = r["totals"]
    minutes = r["interval_s"] == 60
    unit = "minute" if minutes else f"{r['interval_s']:g}-s interval"
    rows = "\n".join(
        f"| {row['interval']} | {row['seconds']:.0f} | {row['assess_ok']} | "
        f"{_ms(row['p50_ms'])} | {_ms(row['p99_ms'])} | {row['rss_mib']:.0f} | "
        f"{row['threads']} | {row['fds']} | "
        f"{sum(row['probes'])}/{len(row['probes'])} |"
        for row in r["intervals"]
    )
    statuses = sorted(totals["codes"])
    by_action = "\n".join(
        f"| {action} | {', '.join(sorted(_expect_of(action)))} | {counts.get('sent', 0)} | "
        + " | ".join(str(counts.get(code, "")) for code in statuses)
        + " |"
        for action, counts in sorted(totals["by_action"].items())
    )
    total_row = (
        f"| **all** | | {totals['sent']} | "
        + " | ".join(str(totals["codes"][code]) for code in statuses)
        + " |"
    )
    checks = "\n".join(
        f"- {'pass' if ok else ('n/a' if ok is None else '**FAIL**')}: {name} ({measured})"
        for name, (ok, measured) in verdict(r).items()
    )
    picture = f"\n![latency and memory over the soak]({plot})\n" if plot else ""
    bound = f", at most {r['max_requests']} requests" if r["max_requests"] else ""
    weights = ", ".join(f"{a} {w}" for a, w in ACTIONS.items())
    return f"""## Soak (`python -m benchmarks.soak`)

{environment()}.

- Server: `gradprobe serve {" ".join(r["server_flags"])}`, a process on loopback, serving
  {", ".join(r["models"])}.
- Load: **{r["elapsed_s"]:.0f} s** (asked for {r["duration_s"]:g} s{bound}) from
  {r["clients"]} client threads, each with its own channel, in the benchmark's process. Each
  client picks, by weight: {weights}. Unary Assess of 1-4 clean or challenge images (raw
  float32, uint8 or PNG); streams of 2-8 requests, about one in five malformed; malformed
  images; unknown model names; deadlines of 1-20 ms; calls cancelled after 0-20 ms; streams
  cancelled after their first answer.
- Every request id is unique, and its answer must echo it. {r["probe_images"]} probe images
  are assessed at the start and every {r["probe_every_s"]:g} s under the load.

Per {unit} (latency: unary Assess answered OK; RSS, threads and fds: the median of the samples
taken every {r["sample_s"]:g} s in the {unit}):

| {unit} | s | Assess OK | p50 ms | p99 ms | RSS MiB | threads | fds | probes same |
|---:|---:|---:|---:|---:|---:|---:|---:|---:|
{rows}

Requests and their statuses (streams count each request; a stream's request answered with an
error counts that error's code):

| kind | expected | sent | {" | ".join(statuses)} |
|---|---|---:|{"---:|" * len(statuses)}
{by_action}
{total_row}
{picture}
Criteria. Growth is judged from the second {unit}, after start-up, to the last; allowed as
start-up noise: RSS {RSS_NOISE:.0%} + {RSS_NOISE_MIB} MiB, {THREADS_NOISE} threads, {FDS_NOISE} fds.

{checks}

Result: **{"pass" if passed(r) else "FAIL"}**.
"""


def _expect_of(action: str) -> frozenset[str]:
    return {
        "assess": OK,
        "stream": OK | INVALID,
        "invalid": INVALID,
        "unknown_model": frozenset({"NOT_FOUND"}),
        "deadline": frozenset({"DEADLINE_EXCEEDED", "OK"}),
        "cancel": frozenset({"CANCELLED", "OK"}),
        "stream_cancel": OK | INVALID | {"CANCELLED"},
    }[action]


def plot(r: dict[str, Any], path: Path) -> None:
    """p50/p99 of unary Assess and the server's RSS, threads and fds over time, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    windows, width = r["windows"], r["window_s"]
    times = [w["t"] for w in windows]
    top.plot(times, [w["p50_ms"] for w in windows], ".-", label=f"p50 per {width:g} s")
    top.plot(times, [w["p99_ms"] for w in windows], ".-", label=f"p99 per {width:g} s")
    rows = [row for row in r["intervals"] if row["p99_ms"] is not None]
    middles = [(row["interval"] - 0.5) * r["interval_s"] for row in rows]
    top.plot(middles, [row["p99_ms"] for row in rows], "s", color="C1", label="p99 per interval")
    top.set_ylabel("unary Assess ms")
    top.set_ylim(bottom=0)
    top.legend()
    top.grid(alpha=0.3)
    times = [s["t"] for s in r["samples"]]
    bottom.plot(times, [s["rss_bytes"] / 2**20 for s in r["samples"]], color="C2", label="RSS")
    bottom.set_ylabel("server RSS MiB")
    bottom.set_ylim(bottom=0)
    bottom.set_xlabel("seconds")
    counts = bottom.twinx()
    counts.plot(times, [s["threads"] for s in r["samples"]], color="C3", label="threads")
    counts.plot(times, [s["fds"] for s in r["samples"]], color="C4", label="fds")
    counts.set_ylabel("threads, fds")
    counts.set_ylim(bottom=0)
    lines = bottom.get_lines() + counts.get_lines()
    bottom.legend(lines, [line.get_label() for line in lines], loc="lower right")
    bottom.grid(alpha=0.3)
    figure.suptitle(f"soak: {r['clients']} clients, {r['elapsed_s']:.0f} s")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.soak", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--duration", type=float, default=300.0, help="seconds (default 300)")
    parser.add_argument("--clients", type=int, default=32, help="client threads (default 32)")
    parser.add_argument("--max-requests", type=int, default=None, help="stop after this many")
    parser.add_argument(
        "--model-dir",
        action="append",
        default=[],
        help="also serve this model dir (repeatable; the built-in model is always served)",
    )
    parser.add_argument(
        "--interval", type=float, default=60.0, help="seconds per table row (default 60)"
    )
    parser.add_argument(
        "--probe-every", type=float, default=30.0, help="seconds between probe checks"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument(
        "--no-write", action="store_true", help="do not update RELIABILITY.md or the plot"
    )
    args = parser.parse_args(argv)
    result = run(
        args.duration,
        args.clients,
        args.max_requests,
        args.model_dir,
        args.interval,
        args.probe_every,
        args.seed,
    )
    picture = None
    if not args.no_write:
        from benchmarks.results import RELIABILITY, write_section

        plot(result, PLOT)
        picture = PLOT.relative_to(RELIABILITY.parent)
        write_section("soak", markdown(result, picture), RELIABILITY)
    print(json.dumps(result, default=str) if args.json else markdown(result, picture))
    return 0 if passed(result) else 1


if __name__ == "__main__":
    sys.exit(main())
