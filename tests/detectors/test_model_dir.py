"""Model dirs are verified before anything in them is read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from byom_models import make_model, save

from detectors.model_dir import load_classifier, sha256_file
from detectors.spec import ArtifactError, Manifest, ModelSpec


def write_model_dir(folder, **overrides) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    path = save(make_model(), folder / "classifier.pt2", (3, 20, 24))
    manifest = {
        "architecture": "user:test", "format": "torch.export", "file": path.name,
        "sha256": sha256_file(path), "input_shape": [3, 20, 24], "input_dtype": "float32",
        "input_range": [0.0, 1.0], "classes": ["a", "b", "c", "d"], "layers": [],
        **overrides,
    }  # fmt: skip
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_a_model_dir_loads_and_describes_its_input(tmp_path) -> None:
    write_model_dir(tmp_path / "m")
    loaded = load_classifier(tmp_path / "m")
    assert loaded.spec.input_shape == (3, 20, 24) and loaded.spec.n_classes == 4
    assert "float32 (B, 3, 20, 24)" in loaded.spec.describe()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"file": "../elsewhere.pt2"}, "one of"),
        ({"sha256": "0" * 64}, "altered or replaced"),
        ({"classes": ["a", "b"]}, r"logits \(2, 2\)"),
        ({"format": "onnx"}, "format 'onnx'"),
        ({"input_shape": [2, 20, 24]}, "1 or 3 channels"),
        # A newer release's manifest is named as such, not misread field by field.
        ({"manifest_version": 99, "new_field": 1}, "manifest version 99, written by a newer"),
        ({"new_field": 1}, "not a valid manifest"),
    ],
)
def test_a_model_dir_that_is_not_what_it_claims_is_refused(tmp_path, overrides, message) -> None:
    write_model_dir(tmp_path / "m", **overrides)
    with pytest.raises(ArtifactError, match=message):
        load_classifier(tmp_path / "m")


def test_specs_refuse_what_gradprobe_cannot_serve() -> None:
    with pytest.raises(ArtifactError, match="too small"):
        ModelSpec((3, 4, 32), ("a", "b"))
    with pytest.raises(ArtifactError, match="mean and std"):
        ModelSpec((3, 8, 8), ("a", "b"), mean=(0.5, 0.5, 0.5))
    with pytest.raises(ArtifactError, match=r"no manifest\.json"):
        Manifest.read(Path("/nonexistent"))


def test_a_version_1_manifest_is_written_as_earlier_releases_read_it(tmp_path) -> None:
    write_model_dir(tmp_path / "m")
    manifest = Manifest.read(tmp_path / "m")
    assert manifest.manifest_version == 1
    assert "manifest_version" not in json.loads(manifest.to_json())
    manifest.manifest_version = 2
    assert json.loads(manifest.to_json())["manifest_version"] == 2
