"""Core: what a served classifier is — its manifest on disk and the input spec read from it.

Every check of a client's input, every warm-up, ``GetModelInfo`` and the TorchServe handler ask
``ModelSpec`` (one place) instead of assuming a size, a channel count or a class count.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MANIFEST_FILE = "manifest.json"
FORMATS = ("torch.export", "torchscript")
# Model files by format, as `gradprobe fit` names them inside a model dir.
MODEL_FILES = {"torch.export": "classifier.pt2", "torchscript": "classifier.pt"}
# The manifest's layout. A release reads every version up to its own and refuses a newer one
# by name (instead of failing on a field it does not know).
MANIFEST_VERSION = 1
# The smallest image side the challenge data (corruptions, OOD sets) and image statistics
# are made for.
MIN_SIDE = 8


class ArtifactError(RuntimeError):
    """An artifact is missing, altered or does not match what it claims to be."""


@dataclass
class Manifest:
    """A classifier file and what it expects; checked before the file is served.

    ``input_shape`` is one image as the model takes it, (C, H, W). Pixels are float32 in
    ``input_range``; when ``normalization`` is set, GradProbe applies (x - mean) / std per
    channel before the model (otherwise the model normalizes inside, the default).
    ``resize`` lets the server resize encoded images to H×W instead of refusing other sizes.
    """

    architecture: str
    format: str
    file: str
    sha256: str
    input_shape: list[int]
    input_dtype: str
    input_range: list[float]
    classes: list[str]
    layers: list[str]
    test_accuracy: float | None = None
    recipe: dict[str, Any] = field(default_factory=dict)
    data_sha256: str = ""
    torch_version: str = ""
    normalization: dict[str, list[float]] | None = None
    resize: bool = False
    manifest_version: int = MANIFEST_VERSION

    def to_json(self) -> str:
        values = asdict(self)
        if values["manifest_version"] == 1:  # as releases before the field wrote it: they can
            del values["manifest_version"]  # still serve a model dir whose layout is the same
        return json.dumps(values, indent=2) + "\n"

    def write(self, model_dir: Path) -> None:
        (Path(model_dir) / MANIFEST_FILE).write_text(self.to_json())

    @classmethod
    def read(cls, model_dir: Path) -> Manifest:
        path = Path(model_dir) / MANIFEST_FILE
        if not path.exists():
            raise ArtifactError(
                f"no {MANIFEST_FILE} in {model_dir}: not a GradProbe model dir; make one with "
                "`gradprobe fit --classifier FILE --train-data DIR --output MODEL_DIR`"
            )
        try:
            values = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ArtifactError(f"{path} is not a valid manifest: {exc}") from exc
        version = values.get("manifest_version", 1) if isinstance(values, dict) else None
        if isinstance(version, int) and version > MANIFEST_VERSION:
            raise ArtifactError(
                f"{path} has manifest version {version}, written by a newer GradProbe; this "
                f"release reads versions up to {MANIFEST_VERSION}: upgrade gradprobe to serve it"
            )
        try:
            manifest = cls(**values)
        except TypeError as exc:
            raise ArtifactError(f"{path} is not a valid manifest: {exc}") from exc
        if manifest.format not in FORMATS:
            raise ArtifactError(
                f"{path}: classifier format {manifest.format!r} is not one of {FORMATS}"
            )
        spec = manifest.spec  # validates the shape, range and normalization
        del spec
        return manifest

    @property
    def spec(self) -> ModelSpec:
        return ModelSpec.from_manifest(self)


@dataclass(frozen=True)
class ModelSpec:
    """One image as the model takes it, and what the model answers."""

    input_shape: tuple[int, int, int]  # (C, H, W)
    classes: tuple[str, ...]
    layers: tuple[str, ...] = ()
    input_range: tuple[float, float] = (0.0, 1.0)
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    resize: bool = False

    def __post_init__(self) -> None:
        if len(self.input_shape) != 3 or min(self.input_shape) < 1:
            raise ArtifactError(f"input_shape must be (C, H, W), got {list(self.input_shape)}")
        if min(self.input_shape[1:]) < MIN_SIDE:
            raise ArtifactError(
                f"images of {self.input_shape[1]}×{self.input_shape[2]} pixels are too small: "
                f"GradProbe needs at least {MIN_SIDE}×{MIN_SIDE}"
            )
        if self.channels not in (1, 3):
            raise ArtifactError(f"models take 1 or 3 channels, this one {self.channels}")
        if len(self.classes) < 2:
            raise ArtifactError(f"a classifier needs at least 2 classes, got {len(self.classes)}")
        if (self.mean is None) != (self.std is None):
            raise ArtifactError("normalization needs both mean and std")
        for name, values in (("mean", self.mean), ("std", self.std)):
            if values is not None and len(values) not in (1, self.channels):
                raise ArtifactError(
                    f"normalization {name} has {len(values)} values for {self.channels} channels"
                )
        if self.std is not None and min(self.std) <= 0:
            raise ArtifactError(f"normalization std must be positive, got {list(self.std)}")

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> ModelSpec:
        norm = manifest.normalization or {}
        mean, std = norm.get("mean"), norm.get("std")
        low, high = manifest.input_range
        return cls(
            input_shape=tuple(int(v) for v in manifest.input_shape),  # type: ignore[arg-type]
            classes=tuple(manifest.classes),
            layers=tuple(manifest.layers),
            input_range=(float(low), float(high)),
            mean=None if mean is None else tuple(float(v) for v in mean),
            std=None if std is None else tuple(float(v) for v in std),
            resize=bool(manifest.resize),
        )

    @property
    def channels(self) -> int:
        return self.input_shape[0]

    @property
    def height(self) -> int:
        return self.input_shape[1]

    @property
    def width(self) -> int:
        return self.input_shape[2]

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    @property
    def pixels(self) -> int:
        return self.channels * self.height * self.width

    def describe(self) -> str:
        """What a batch must look like, for error messages and ``--help``."""
        c, h, w = self.input_shape
        uint8 = f"(B, {h}, {w})" if c == 1 else f"(B, {h}, {w}, 3) or (B, 3, {h}, {w})"
        return f"float32 (B, {c}, {h}, {w}) in [0, 1] or uint8 {uint8}"
