"""Gradient features: per-label autograd loop vs torch.func vmap vs the batched engine.

    python -m benchmarks.features [--json] [--models default,resnet18] [--batches 1,32,128]

Every (model, method, batch) runs in a fresh child process, one after the other in the same
run, so that peak memory is that method's alone (peak RSS above the process's resident size
before the call, or peak CUDA allocation on a GPU) and the ratios compare like with like.
The numbers go to benchmarks/RESULTS.md; ``--json`` also prints them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

METHODS = ("loop", "vmap", "engine")
MODELS = ("default", "resnet18")
# torch.func.vmap materializes one gradient per (sample, label); bound what one chunk holds
# so that ResNet-18 fits on the machine (unchunked at batch 32 it would need ~14 GiB).
VMAP_CHUNK_BYTES = 2 * 2**30


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


def measure(model_name: str, method: str, batch: int, repeats: int, device: str) -> dict:
    """Run in a child process: time one method and take its peak memory."""
    import torch

    from detectors.gradients import GradientFeatures
    from detectors.reference import loop_features, vmap_features

    torch.manual_seed(0)
    model, shape = _build(model_name)
    model = model.to(device)
    x = torch.rand(batch, *shape, device=device)
    n_params = sum(p.numel() for p in model.parameters())
    if method == "loop":
        run = lambda: loop_features(model, x)  # noqa: E731
    elif method == "vmap":
        chunk = max(1, VMAP_CHUNK_BYTES // (4 * n_params))
        run = lambda: vmap_features(model, x, chunk_size=chunk)  # noqa: E731
    elif method == "engine":
        engine = GradientFeatures(model)
        run = lambda: engine.compute(x)  # noqa: E731
    else:
        raise ValueError(method)

    def timed() -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        if device == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) * 1000

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS watermark
        base = _rss_kb("VmRSS")
    first = timed()
    if device == "cuda":
        peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak_mb = (_rss_kb("VmHWM") - base) / 1024
    times = []
    # Repeat while cheap; a slow configuration (seconds per batch) is timed on its first run.
    budget_end = time.perf_counter() + 4.0
    while len(times) < repeats and (not times or time.perf_counter() < budget_end):
        if first > 4000 and not times:
            times.append(first)
            break
        times.append(timed())
    return {
        "model": model_name,
        "method": method,
        "batch": batch,
        "ms_per_batch": round(statistics.median(times), 3),
        "peak_mb": round(peak_mb, 1),
        "runs": len(times),
        "device": device,
    }


def _child(model_name: str, method: str, batch: int, repeats: int, device: str) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.features",
        "--child",
        model_name,
        method,
        str(batch),
        str(repeats),
        device,
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_all(
    models: list[str], batches: list[int], repeats: int, device: str, quiet: bool = False
) -> list[dict]:
    from tqdm import tqdm

    jobs = [(m, method, b) for m in models for b in batches for method in METHODS]
    rows = []
    for model_name, method, batch in tqdm(
        jobs, desc="benchmark", unit="run", disable=quiet, file=sys.stderr
    ):
        rows.append(_child(model_name, method, batch, repeats, device))
    for row in rows:
        loop = next(
            r
            for r in rows
            if r["model"] == row["model"] and r["batch"] == row["batch"] and r["method"] == "loop"
        )
        row["ratio_vs_loop"] = round(loop["ms_per_batch"] / row["ms_per_batch"], 2)
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
        "All N=10 contrast labels, exact per-layer squared gradient norms. Each row ran in its "
        "own process, in one run; time is the median per batch, peak memory is above the "
        "process's size before the call. `ratio` = loop time / method time.",
        "",
        "| model | batch | method | ms / batch | peak MB | ratio vs loop |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['method']} | {r['ms_per_batch']:.1f} "
            f"| {r['peak_mb']:.0f} | {r['ratio_vs_loop']:.2f}× |"
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
        "--repeats", type=int, default=30, help="timed runs per row at most (fewer when slow)"
    )
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        model_name, method, batch, repeats, device = args.child
        print(json.dumps(measure(model_name, method, int(batch), int(repeats), device)))
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
