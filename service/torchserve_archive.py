"""Pack a model dir's classifier into a TorchServe model archive (.mar) with the GradProbe
handler.

The archive is self-contained: the classifier file (torch.export or TorchScript) and its
manifest, from which the handler reads the input shape, channels, classes and normalization;
the handler (``deploy/torchserve/``) and the generated ``gradprobe.v1`` stubs. It runs in any
TorchServe 0.12 with grpcio, protobuf, numpy and pillow, without this project installed.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from detectors.model_dir import verified_file
from detectors.spec import MANIFEST_FILE, Manifest

REPO = Path(__file__).resolve().parent.parent
HANDLER_DIR = REPO / "deploy" / "torchserve"
HANDLER_FILE = "gradprobe_handler.py"
SIDECAR_FILE = "gradprobe_sidecar.py"
STUBS_DIR = REPO / "service" / "_proto" / "gradprobe" / "v1"
STUB_PACKAGE = "gradprobe_v1"


@dataclass(frozen=True)
class ArchiveOptions:
    """The archive's model-config.yaml: TorchServe's batching and workers, and the handler's
    ``gradprobe`` section (each field also a ``GRADPROBE_TS_<NAME>`` variable at run time)."""

    mode: str = "monitor"
    target: str = "127.0.0.1:50051"
    timeout_ms: float = 250.0
    on_unreliable: str = "flag"
    on_unavailable: str = "mark"
    # GradProbe's name for the classifier (its ListModels); empty: the only model it serves.
    model: str = ""
    batch_size: int = 8
    max_batch_delay_ms: int = 5
    workers: int = 1
    response_timeout_s: int = 30

    def model_config(self) -> dict:
        return {
            "minWorkers": self.workers,
            "maxWorkers": self.workers,
            "batchSize": self.batch_size,
            "maxBatchDelay": self.max_batch_delay_ms,
            "responseTimeout": self.response_timeout_s,
            "gradprobe": {
                "mode": self.mode,
                "target": self.target,
                "timeout_ms": self.timeout_ms,
                "on_unreliable": self.on_unreliable,
                "on_unavailable": self.on_unavailable,
                "model": self.model,
            },
        }


def stage_handler(folder: Path) -> Path:
    """Copy the handler's modules and the stub package into ``folder`` (importable from it)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in (HANDLER_FILE, SIDECAR_FILE):
        shutil.copy2(HANDLER_DIR / name, folder / name)
    package = folder / STUB_PACKAGE
    package.mkdir(exist_ok=True)
    for name in ("reliability_pb2.py", "reliability_pb2_grpc.py"):
        shutil.copy2(STUBS_DIR / name, package / name)
    (package / "__init__.py").write_text('"""Generated gradprobe.v1 stubs."""\n')
    return folder


def build_archive(
    model_dir: Path,
    export_path: Path,
    *,
    name: str | None = None,
    version: str = "1.0",
    options: ArchiveOptions | None = None,
    force: bool = False,
) -> Path:
    """Write ``<export_path>/<name>.mar`` (default name: the model dir's) and return its path."""
    options = options or ArchiveOptions()
    model_dir = Path(model_dir).resolve()
    name = name or model_dir.name
    manifest = Manifest.read(model_dir)  # any format and input spec the handler serves
    model_file = verified_file(model_dir, manifest)
    target = export_path / f"{name}.mar"
    if target.exists() and not force:
        raise FileExistsError(f"{target} exists; pass --force to replace it")
    export_path.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gradprobe-mar-") as tmp:
        stage = Path(tmp)
        extra = stage / "extra"
        stage_handler(extra)
        handler = extra / HANDLER_FILE
        shutil.move(handler, stage / HANDLER_FILE)
        shutil.copy2(model_dir / MANIFEST_FILE, extra / MANIFEST_FILE)
        config = stage / "model-config.yaml"
        config.write_text(yaml.safe_dump(options.model_config(), sort_keys=False))
        command = [
            sys.executable,
            "-m",
            "model_archiver.model_packaging",
            "--model-name",
            name,
            "--version",
            version,
            "--serialized-file",
            str(model_file),
            "--handler",
            str(stage / HANDLER_FILE),
            "--extra-files",
            str(extra),
            "--config-file",
            str(config),
            "--export-path",
            str(export_path),
            "--force",
        ]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"torch-model-archiver failed:\n{done.stdout}{done.stderr}")
    return target
