"""Generate the Python gRPC stubs from ``proto/`` into ``service/_proto`` with one command.

    python -m service.protos            regenerate the checked-in stubs
    python -m service.protos --check    exit 1 if the checked-in stubs differ from the .proto

protoc writes ``import gradprobe.v1.reliability_pb2`` into the ``_grpc`` module, which only
works with ``service/_proto`` on ``sys.path``; it is rewritten to a relative import so the
stubs are an ordinary subpackage.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
OUTPUT = ROOT / "service" / "_proto"
PROTO_FILES = ("gradprobe/v1/reliability.proto",)


class ProtocFailed(RuntimeError):
    """grpc_tools.protoc rejected the .proto files."""


def generate(output: Path, proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Write the stubs of ``PROTO_FILES`` under ``output``; returns the files written."""
    import grpc_tools
    from grpc_tools import protoc

    output.mkdir(parents=True, exist_ok=True)
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    for name in PROTO_FILES:
        status = protoc.main(
            [
                "grpc_tools.protoc",
                f"-I{proto_root}",
                f"-I{well_known}",
                f"--python_out={output}",
                f"--pyi_out={output}",
                f"--grpc_python_out={output}",
                str(proto_root / name),
            ]
        )
        if status != 0:
            raise ProtocFailed(f"protoc failed on {proto_root / name} (status {status})")
    for name in PROTO_FILES:
        _make_imports_relative(output / name.replace(".proto", "_pb2_grpc.py"), name)
    # Empty __init__.py files make the stubs a regular package (found by setuptools).
    for folder in [output, *(p for p in output.rglob("*") if p.is_dir())]:
        (folder / "__init__.py").touch()
    return sorted(p for p in output.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


def _make_imports_relative(grpc_module: Path, proto_name: str) -> None:
    package, _, stem = proto_name.removesuffix(".proto").rpartition("/")
    absolute = f"from {package.replace('/', '.')} import {stem}_pb2 as"
    text = grpc_module.read_text()
    if absolute not in text:
        raise ProtocFailed(f"{grpc_module} has no line '{absolute} ...' to rewrite")
    grpc_module.write_text(text.replace(absolute, f"from . import {stem}_pb2 as"))


def drift(checked_in: Path = OUTPUT, proto_root: Path = PROTO_ROOT) -> list[str]:
    """Stub files (relative paths) that differ from a fresh generation, or are missing/extra."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        generate(fresh, proto_root)
        expected = {p.relative_to(fresh) for p in fresh.rglob("*") if _is_stub(p)}
        actual = {p.relative_to(checked_in) for p in checked_in.rglob("*") if _is_stub(p)}
        differing = [
            str(rel)
            for rel in sorted(expected | actual)
            if rel not in expected
            or rel not in actual
            or not filecmp.cmp(fresh / rel, checked_in / rel, shallow=False)
        ]
    return differing


def _is_stub(path: Path) -> bool:
    return path.is_file() and "__pycache__" not in path.parts


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m service.protos", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="regenerate into a temporary folder and fail if service/_proto differs",
    )
    args = parser.parse_args(argv)
    if args.check:
        differing = drift()
        if differing:
            print(
                f"service/_proto is out of date with {PROTO_ROOT.relative_to(ROOT)}/: "
                f"{', '.join(differing)} differ. Run `python -m service.protos` and commit "
                "the result.",
                file=sys.stderr,
            )
            return 1
        print("service/_proto matches proto/")
        return 0
    written = generate(OUTPUT)
    print(f"wrote {len(written)} files under {OUTPUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
