"""Gradient features: per-label autograd loop vs torch.func vmap vs the batched engine.

    python -m benchmarks.features [--json] [--models default,resnet18] [--batches 1,32,128]

Peak memory: every (model, method, batch) makes its first call in a fresh child process, so
that the peak is that method's alone (peak RSS above the process's resident size before the
call, or peak CUDA allocation on a GPU). Time: for each (model, batch), one more child
process alternates the methods in blocks of consecutive calls (about 40 ms each: loop ×k,
vmap ×k, engine ×k, loop ×k, ...) and takes each one's median steady-state call, so that the
ratios compare methods under the same machine state rather than processes that each met a
different load; a method taking seconds per call keeps the time of its single call.
The numbers go to benchmarks/RESULTS.md; ``--json`` also prints them.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# engine+squeeze: the engine with the squeezed views' forward (detectors.stability), as a
# detector whose guard reads feature squeezing asks for it.
METHODS = ("loop", "vmap", "engine", "engine+squeeze")
MODELS = ("default", "resnet18")
# torch.func.vmap materializes one gradient per (sample, label); bound what one chunk holds
# so that ResNet-18 fits on the machine (unchunked at batch 32 it would need ~14 GiB).
VMAP_CHUNK_BYTES = 2 * 2**30
SLOW_MS = 1500.0  # a method slower than this per call is timed on its single call
INTERLEAVED_BUDGET_S = 10.0  # per (model, batch), once every method has MIN_REPEATS calls
MIN_REPEATS = 3
BLOCK_MS = 40.0  # consecutive calls of one method before switching to the next
BLOCK_MIN = 3


def _build(model_name: str):  # noqa: ANN202
    if model_name == "default":
        from service.artifacts import load_default_classifier

        return load_default_classifier(quiet=True).module, (1, 28, 28)
    if model_name == "resnet18":
        from benchmarks.models import cifar_resnet18

        return cifar_resnet18(), (3, 32, 32)
    raise ValueError(f"unknown model {model_name!r}; choose from {MODELS}")


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _setup(model_name: str, method: str, batch: int, device: str):  # noqa: ANN202
    """The model, on ``device``, and a no-argument function computing one batch's features."""
    import torch

    from detectors.gradients import GradientFeatures
    from detectors.reference import loop_features, vmap_features

    torch.manual_seed(0)
    model, shape = _build(model_name)
    model = model.to(device)
    x = torch.rand(batch, *shape, device=device)
    n_params = sum(p.numel() for p in model.parameters())
    if method == "loop":
        return lambda: loop_features(model, x)
    if method == "vmap":
        chunk = max(1, VMAP_CHUNK_BYTES // (4 * n_params))
        return lambda: vmap_features(model, x, chunk_size=chunk)
    if method == "engine":
        engine = GradientFeatures(model)
        return lambda: engine.compute(x)
    if method == "engine+squeeze":
        squeezing = GradientFeatures(model, squeeze=True)
        return lambda: squeezing.signals(x)
    raise ValueError(method)


def _timer(device: str):  # noqa: ANN202
    import torch

    def timed(run) -> float:  # noqa: ANN001
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        if device == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) * 1000

    return timed


def measure(model_name: str, method: str, batch: int, device: str) -> dict:
    """Run in a child process: one method's peak memory on its first call, and its time."""
    import torch

    run = _setup(model_name, method, batch, device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS watermark
        base = _rss_kb("VmRSS")
    timed = _timer(device)
    first = timed(run)
    if device == "cuda":
        peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak_mb = (_rss_kb("VmHWM") - base) / 1024
    # The first call pays for lazy initialization; a second, warm one (unless the first took
    # long enough for that not to matter) tells whether the method is fast enough to repeat.
    warm = timed(run) if first < 4 * SLOW_MS else first
    return {
        "model": model_name,
        "method": method,
        "batch": batch,
        "warm_ms": round(warm, 3),
        "peak_mb": round(peak_mb, 1),
        "device": device,
    }


def time_interleaved(
    model_name: str, methods: list[str], batch: int, repeats: int, device: str
) -> dict[str, list[float]]:
    """Run in a child process: the methods alternate in blocks of consecutive calls (loop,
    loop, loop, engine, engine, engine, ...) so that every method sees the same machine
    state, and each is timed in its steady state, as a service calling it repeatedly would
    see it. A block lasts about ``BLOCK_MS`` (at least ``BLOCK_MIN`` calls); its first call,
    which pays for switching from the other method's memory and caches, is not counted.
    ``repeats`` counted calls each at most, within a time budget."""
    runs = {method: _setup(model_name, method, batch, device) for method in methods}
    timed = _timer(device)
    blocks = {}
    for method, run in runs.items():
        run()  # warm up
        blocks[method] = max(BLOCK_MIN, math.ceil(BLOCK_MS / max(timed(run), 1e-3)))
    times: dict[str, list[float]] = {method: [] for method in methods}
    budget_end = time.perf_counter() + INTERLEAVED_BUDGET_S
    while min(len(t) for t in times.values()) < repeats:
        for method, run in runs.items():
            timed(run)  # the switch
            times[method] += [timed(run) for _ in range(blocks[method] - 1)]
        if time.perf_counter() > budget_end and len(times[methods[0]]) >= MIN_REPEATS:
            break
    return times


def _child(*args: str) -> Any:
    cmd = [sys.executable, "-m", "benchmarks.features", "--child", *args]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_all(
    models: list[str], batches: list[int], repeats: int, device: str, quiet: bool = False
) -> list[dict]:
    from tqdm import tqdm

    rows = []
    pairs = [(m, b) for m in models for b in batches]
    for model_name, batch in tqdm(
        pairs, desc="benchmark", unit="config", disable=quiet, file=sys.stderr
    ):
        # Peak memory: each method alone in a fresh process, on its first call.
        group = [_child("memory", model_name, method, str(batch), device) for method in METHODS]
        # Time: the methods that are fast enough to repeat, interleaved in one process; a
        # slow one (seconds per call) keeps the time of its single call.
        fast = [r["method"] for r in group if r["warm_ms"] <= SLOW_MS]
        times = (
            _child("time", model_name, ",".join(fast), str(batch), str(repeats), device)
            if fast
            else {}
        )
        for row in group:
            samples = times.get(row["method"], [row["warm_ms"]])
            row["ms_per_batch"] = round(statistics.median(samples), 3)
            row["runs"] = len(samples)
            row["timing"] = "interleaved" if row["method"] in times else "single"
        loop = next(r for r in group if r["method"] == "loop")
        for row in group:
            row["ratio_vs_loop"] = round(loop["ms_per_batch"] / row["ms_per_batch"], 2)
        rows += group
    return rows


def markdown(rows: list[dict]) -> str:
    from benchmarks.results import environment

    def get(model: str, method: str, batch: int) -> dict | None:
        return next(
            (r for r in rows if (r["model"], r["method"], r["batch"]) == (model, method, batch)),
            None,
        )

    lines = [
        "## Gradient features (`python -m benchmarks.features`)",
        "",
        f"Environment: {environment()}.",
        "All N=10 contrast labels, exact per-layer squared gradient norms. Time is the median "
        "per batch in steady state, the methods alternating in blocks of consecutive calls "
        f"(~{BLOCK_MS:g} ms; a block's first call, after the switch, not counted) in one "
        "process per model and batch "
        f"(a method slower than {SLOW_MS / 1000:g} s per call: its single call); peak memory "
        "is each method's first call in a fresh process, above the process's size before "
        "the call. `ratio` = loop time / method time. `engine+squeeze`: the engine with the "
        "squeezed views' forward pass (feature squeezing, which the detector's guard reads).",
        "",
        "| model | batch | method | ms / batch | timed calls | peak MB | ratio vs loop |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['method']} | {r['ms_per_batch']:.1f} "
            f"| {r['runs']} | {r['peak_mb']:.0f} | {r['ratio_vs_loop']:.2f}× |"
        )
    checks = []
    for batch, target in ((32, 5.0), (1, 3.0)):
        r = get("default", "engine", batch)
        if r:
            ok = "met" if r["ratio_vs_loop"] >= target else "NOT met"
            checks.append(
                f"- default model, batch {batch}: engine {r['ratio_vs_loop']:.2f}× "
                f"the loop (target ≥ {target:g}×): {ok}"
            )
    e, v, lp = (get("resnet18", m, 32) for m in ("engine", "vmap", "loop"))
    if e and v and lp:
        faster = e["ms_per_batch"] < min(v["ms_per_batch"], lp["ms_per_batch"])
        smaller = e["peak_mb"] < v["peak_mb"]
        checks.append(
            f"- resnet18, batch 32: engine {lp['ms_per_batch'] / e['ms_per_batch']:.2f}× the "
            f"loop, {v['ms_per_batch'] / e['ms_per_batch']:.2f}× vmap; peak "
            f"{e['peak_mb']:.0f} MB vs vmap {v['peak_mb']:.0f} MB: "
            f"{'met' if faster and smaller else 'NOT met'}"
        )
    costs = []
    for model_name, batch in sorted({(r["model"], r["batch"]) for r in rows}):
        plain, squeezing = (
            get(model_name, "engine", batch),
            get(model_name, "engine+squeeze", batch),
        )
        if plain and squeezing:
            extra = squeezing["ms_per_batch"] / plain["ms_per_batch"] - 1
            costs.append(f"{model_name} at batch {batch}: {extra:+.0%}")
    if costs:
        lines += ["", "What the squeezed views add to the engine's time: " + "; ".join(costs) + "."]
    if checks:
        lines += ["", "Targets:", *checks]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.features",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--json", action="store_true", help="print the rows as a JSON list")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--batches", default="1,32,128")
    parser.add_argument(
        "--repeats", type=int, default=60, help="timed runs per row at most (fewer when slow)"
    )
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        kind, *rest = args.child
        if kind == "memory":
            model_name, method, batch, device = rest
            print(json.dumps(measure(model_name, method, int(batch), device)))
        else:
            model_name, methods, batch, repeats, device = rest
            times = time_interleaved(
                model_name, methods.split(","), int(batch), int(repeats), device
            )
            print(json.dumps(times))
        return 0
    import torch

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = run_all(
        args.models.split(","),
        [int(b) for b in args.batches.split(",")],
        args.repeats,
        device,
        quiet=False,
    )
    if not args.no_write:
        from benchmarks.results import write_section

        write_section("features", markdown(rows))
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
