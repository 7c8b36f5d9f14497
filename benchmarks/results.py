"""Writing one benchmark's section of benchmarks/RESULTS.md, leaving the others untouched."""

from __future__ import annotations

import platform
from pathlib import Path

import torch

RESULTS = Path(__file__).with_name("RESULTS.md")
HEADER = "# Benchmark results\n\nWritten by the benchmarks themselves; do not edit by hand.\n"
# Soak, fault and fuzzing runs write their sections here (issue: reliability and security).
RELIABILITY = Path(__file__).resolve().parent.parent / "RELIABILITY.md"
RELIABILITY_HEADER = (
    "# Reliability\n\nWritten by the soak, fault and fuzzing runs themselves "
    "(`python -m benchmarks.soak`, `python -m benchmarks.faults`, `python -m benchmarks.fuzz`); "
    "do not edit by hand.\n"
)


def environment() -> str:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch "
        f"threads, {device}, torch {torch.__version__}, Python {platform.python_version()}"
    )


def write_section(name: str, body: str, path: Path = RESULTS) -> None:
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    header = RELIABILITY_HEADER if path == RELIABILITY else HEADER
    text = path.read_text() if path.exists() else header
    block = f"{start}\n{body.rstrip()}\n{end}"
    if start in text and end in text:
        before, rest = text.split(start, 1)
        text = before + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)
