"""The `gradprobe` command line on the real default artifact."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from detectors.fit.fashion_mnist import load_fashion_mnist
from detectors.gradients import GradientFeatures
from detectors.reference import loop_features
from service.cli import main

pytestmark = pytest.mark.slow


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def fashion_images() -> np.ndarray:
    return load_fashion_mnist("test").images[:6]


def test_info_json_describes_the_artifact(capsys, default_model_dir: Path) -> None:
    code, out, _ = run_cli(capsys, "info", "--json", "--model-dir", str(default_model_dir))
    assert code == 0
    info = json.loads(out)
    path = Path(info["classifier"])
    assert path.is_absolute() and path.exists()
    assert info["format"] == "torch.export"
    assert info["input_shape"] == [1, 28, 28]
    assert len(info["classes"]) == 10 and info["classes"][9] == "ankle boot"
    # Layer names are spelled as in the artifact's own named_parameters().
    module = torch.export.load(path).module()
    prefixes = list(dict.fromkeys(n.rpartition(".")[0] for n, _ in module.named_parameters()))
    assert info["layers"] == prefixes == ["conv1", "conv2", "fc1", "fc2"]
    assert info["test_accuracy"] >= 0.90


def test_info_defaults_to_the_built_default_model(capsys, default_model_dir: Path) -> None:
    code, out, _ = run_cli(capsys, "info", "--json", "--quiet")
    assert code == 0
    assert Path(json.loads(out)["classifier"]).parent == default_model_dir


def test_artifact_loads_with_plain_torch_and_no_project_code(default_model_dir: Path) -> None:
    script = (
        "import sys, torch\n"
        f"m = torch.export.load({str(default_model_dir / 'classifier.pt2')!r}).module()\n"
        "y = m(torch.rand(3, 1, 28, 28))\n"
        "assert y.shape == (3, 10), y.shape\n"
        "assert not {'service', 'detectors'} & set(sys.modules)\n"
        "print('ok')\n"
    )
    result = subprocess.run(
        [sys.executable, "-I", "-c", script], cwd="/", capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


@pytest.mark.parametrize("form", ["uint8", "float32"])
def test_features_writes_the_engine_output(
    capsys, tmp_path, default_classifier, fashion_images, form
) -> None:
    images = (
        fashion_images if form == "uint8" else (fashion_images / 255.0).astype(np.float32)[:, None]
    )
    src, dst = tmp_path / "x.npy", tmp_path / "f.npy"
    np.save(src, images)
    code, _, err = run_cli(
        capsys,
        "features",
        "--images",
        str(src),
        "--output",
        str(dst),
        "--model-dir",
        str(default_classifier.model_dir),
        "--batch-size",
        "4",
    )
    assert code == 0, err
    features = np.load(dst)
    assert features.dtype == np.float32 and features.shape == (6, 10, 4)
    x = torch.from_numpy(fashion_images).float().div(255).unsqueeze(1)
    expected = loop_features(default_classifier.module, x[:2]).numpy()
    np.testing.assert_allclose(features[:2], expected, rtol=1e-4)
    # The true class needs the smallest change: its contrast gradient is the smallest one.
    labels = load_fashion_mnist("test").labels[:6]
    predicted = default_classifier.module(x).argmax(1).numpy()
    smallest = features.sum(-1).argmin(1)
    assert (smallest == predicted).all()
    assert (predicted == labels).mean() >= 0.5


def test_features_confounding_label(capsys, tmp_path, default_classifier, fashion_images) -> None:
    src, dst = tmp_path / "x.npy", tmp_path / "f.npy"
    np.save(src, fashion_images)
    code, _, _ = run_cli(
        capsys,
        "features",
        "--images",
        str(src),
        "--output",
        str(dst),
        "--labels",
        "confounding",
        "-q",
        "--model-dir",
        str(default_classifier.model_dir),
    )
    assert code == 0
    x = torch.from_numpy(fashion_images).float().div(255).unsqueeze(1)
    expected = GradientFeatures(default_classifier.module, labels="confounding").compute(x)
    np.testing.assert_allclose(np.load(dst), expected.numpy(), rtol=1e-5)
    assert np.load(dst).shape == (6, 1, 4)


BAD_INPUTS = {
    "wrong shape": (np.zeros((2, 32, 32), np.uint8), "got shape (2, 32, 32)"),
    "wrong channels": (np.zeros((2, 3, 28, 28), np.float32), "got shape (2, 3, 28, 28)"),
    "float64": (np.zeros((2, 1, 28, 28)), "dtype float64 (cast with .astype(np.float32))"),
    "int": (np.zeros((2, 28, 28), np.int32), "got dtype int32"),
    "nan": (np.full((2, 1, 28, 28), np.nan, np.float32), "image 0 contains NaN"),
    "out of range": (np.full((1, 1, 28, 28), 255.0, np.float32), "must lie in [0, 1]"),
    "empty batch": (np.zeros((0, 28, 28), np.uint8), "the batch is empty"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_images_get_one_line_error_and_status_2(
    capsys, tmp_path, default_model_dir, case
) -> None:
    array, message = BAD_INPUTS[case]
    src = tmp_path / "x.npy"
    np.save(src, array)
    code, _, err = run_cli(
        capsys,
        "features",
        "--images",
        str(src),
        "--output",
        str(tmp_path / "f.npy"),
        "--model-dir",
        str(default_model_dir),
    )
    assert code == 2
    assert message in err
    assert err.count("\n") == 1 and err.startswith("gradprobe features: error:")
    assert not (tmp_path / "f.npy").exists()


def test_empty_and_garbage_files_are_rejected(capsys, tmp_path, default_model_dir) -> None:
    empty, garbage = tmp_path / "empty.npy", tmp_path / "garbage.npy"
    empty.write_bytes(b"")
    garbage.write_bytes(b"not an array at all")
    for path, message in [
        (empty, "is empty"),
        (garbage, "not a readable .npy"),
        (tmp_path / "missing.npy", "does not exist"),
    ]:
        code, _, err = run_cli(
            capsys,
            "features",
            "--images",
            str(path),
            "--output",
            str(tmp_path / "f.npy"),
            "--model-dir",
            str(default_model_dir),
        )
        assert code == 2 and message in err, err


def test_tampered_artifact_is_refused_naming_both_hashes(
    capsys, tmp_path, default_model_dir
) -> None:
    copy = tmp_path / "model"
    shutil.copytree(default_model_dir, copy)
    with (copy / "classifier.pt2").open("ab") as f:
        f.write(b"\0")
    code, _, err = run_cli(capsys, "info", "--model-dir", str(copy))
    manifest = json.loads((copy / "manifest.json").read_text())
    assert code == 2
    assert manifest["sha256"] in err and "altered or replaced" in err


def test_not_a_model_folder(capsys, tmp_path) -> None:
    code, _, err = run_cli(capsys, "info", "--model-dir", str(tmp_path))
    assert code == 2 and "not a GradProbe model dir" in err and "gradprobe fit" in err


def test_console_script_help_explains_the_commands() -> None:
    exe = Path(sys.executable).with_name("gradprobe")
    result = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    for word in ("info", "features", "train-model", "demo", "GRADPROBE_HOME"):
        assert word in result.stdout
    result = subprocess.run(
        [str(exe), "features", "--help"], capture_output=True, text=True, timeout=60
    )
    assert "(B, C, H, W)" in result.stdout and "--labels" in result.stdout


def test_archive_writes_a_mar_with_the_chosen_mode(capsys, tmp_path, default_model_dir) -> None:
    import zipfile

    import yaml

    args = ["archive", "--model-dir", str(default_model_dir), "--export-path", str(tmp_path)]
    args += ["--mode", "gate", "--on-unreliable", "refuse", "--timeout-ms", "120", "-q"]
    assert main(args) == 0
    archive = Path(capsys.readouterr().out.strip())
    assert archive == tmp_path / "fashion.mar"
    config = yaml.safe_load(zipfile.ZipFile(archive).read("model-config.yaml"))
    assert config["gradprobe"]["mode"] == "gate"
    assert config["gradprobe"]["on_unreliable"] == "refuse"
    assert config["gradprobe"]["timeout_ms"] == 120
    assert main(args) == 2  # no silent overwrite
    assert "--force" in capsys.readouterr().err
    assert main([*args, "--force"]) == 0


def test_the_default_model_dir_is_made_by_train_model_then_fit(capsys, default_model_dir) -> None:
    """One model dir, like a user's: the classifier keeps its name and training record, fit
    added H and the held-out report."""
    from detectors.detector import MANIFEST_FILE as DETECTOR_MANIFEST
    from detectors.model_dir import DETECTOR_DIR, REPORT_DIR
    from detectors.spec import Manifest
    from service.artifacts import default_classifier_dir, default_fit_command
    from service.classifier import ARCHITECTURE

    manifest = Manifest.read(default_model_dir)
    assert manifest.architecture == ARCHITECTURE
    assert manifest.recipe["classifier_training"]["epochs"] >= 1  # from train-model
    assert manifest.recipe["eps"] and manifest.recipe["time_plan"]  # from fit
    assert manifest.sha256 == Manifest.read(default_classifier_dir()).sha256
    detector = json.loads((default_model_dir / DETECTOR_DIR / DETECTOR_MANIFEST).read_text())
    assert detector["classifier_sha256"] == manifest.sha256
    assert detector["guard"] is not None  # the portable H, as for any user's model
    assert (default_model_dir / REPORT_DIR / "REPORT.md").exists()
    command = default_fit_command()
    assert "--train-data fashion-mnist:train --val-data fashion-mnist:test" in command


def test_evaluate_copies_the_report_fit_wrote(capsys, tmp_path, default_model_dir) -> None:
    code, out, _ = run_cli(capsys, "evaluate", "--quiet")
    assert code == 0 and Path(out.strip()).parent.parent == default_model_dir
    code, out, _ = run_cli(capsys, "evaluate", "--quiet", "--output-dir", str(tmp_path / "r"))
    assert code == 0 and Path(out.strip()) == tmp_path / "r" / "REPORT.md"
    assert "## By family" in (tmp_path / "r" / "REPORT.md").read_text()
    assert (tmp_path / "r" / "roc_by_family.png").stat().st_size > 0


def test_serve_without_a_built_default_says_what_to_run(tmp_path, monkeypatch) -> None:
    """Serving never trains: on a machine without the built-in example it fails at once."""
    monkeypatch.setenv("GRADPROBE_HOME", str(tmp_path / "home"))
    exe = Path(sys.executable).with_name("gradprobe")
    result = subprocess.run(
        [str(exe), "serve", "--port", "0", "--metrics-port", "0"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "not built yet" in result.stderr and "gradprobe demo" in result.stderr
    assert not (tmp_path / "home" / "models").exists()  # nothing was trained
