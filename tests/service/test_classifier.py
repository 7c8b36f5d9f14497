"""Training is reproducible; the artifact round-trips through export and the hash check."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from detectors.fit.fashion_mnist import load_fashion_mnist
from service.classifier import (
    ArtifactError,
    Manifest,
    TrainingRecipe,
    export_classifier,
    load_classifier,
    train_classifier,
)


@pytest.fixture(scope="module")
def small_train() -> tuple[np.ndarray, np.ndarray]:
    train = load_fashion_mnist("train")
    return train.images[:512], train.labels[:512]


def test_same_seed_same_weights_other_seed_other_weights(small_train) -> None:
    recipe = TrainingRecipe(epochs=1, batch_size=64, channels=(4, 8), hidden=16)
    a = train_classifier(*small_train, recipe).state_dict()
    b = train_classifier(*small_train, recipe).state_dict()
    c = train_classifier(*small_train, TrainingRecipe(**{**recipe.__dict__, "seed": 1}))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c.state_dict()[k]) for k in a)


def test_training_leaves_subnormal_floats_to_the_rest_of_the_process(small_train) -> None:
    train_classifier(
        *small_train, TrainingRecipe(epochs=1, batch_size=64, channels=(4, 8), hidden=16)
    )
    tiny = torch.tensor([1e-40], dtype=torch.float32)
    assert (tiny * 1.0).item() != 0.0  # flushed to zero if the training flag stayed on


def test_export_then_load_round_trip(small_train, tmp_path) -> None:
    recipe = TrainingRecipe(epochs=1, batch_size=64, channels=(4, 8), hidden=16)
    model = train_classifier(*small_train, recipe)
    manifest = export_classifier(
        model,
        tmp_path,
        classes=[str(i) for i in range(10)],
        test_accuracy=0.5,
        recipe=recipe,
        data_sha256="x",
    )
    assert manifest.layers == ["conv1", "conv2", "fc1", "fc2"]
    loaded = load_classifier(tmp_path)
    x = torch.rand(5, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(x), model(x), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(loaded.exported(x), model(x), rtol=1e-5, atol=1e-6)
        assert loaded.exported(torch.rand(1, 1, 28, 28)).shape == (1, 10)  # dynamic batch

    stored = json.loads((tmp_path / "manifest.json").read_text())
    stored["format"] = "someone.elses.format"
    (tmp_path / "manifest.json").write_text(json.dumps(stored))
    with pytest.raises(ArtifactError, match=r"someone\.elses\.format"):
        load_classifier(tmp_path)


def test_default_model_reaches_90_percent(default_classifier) -> None:
    test = load_fashion_mnist("test")
    x = torch.from_numpy(np.array(test.images)).float().div(255).unsqueeze(1)
    with torch.no_grad():
        predicted = default_classifier.exported(x).argmax(1).numpy()
    accuracy = (predicted == test.labels).mean()
    assert accuracy >= 0.90
    # `train-model` records the accuracy on the whole test set; the served model dir's
    # manifest has fit's, on its held-out split of those images.
    from service.artifacts import default_classifier_dir

    trained = Manifest.read(default_classifier_dir())
    assert trained.sha256 == default_classifier.manifest.sha256
    assert accuracy == pytest.approx(trained.test_accuracy, abs=1e-4)
    assert default_classifier.manifest.test_accuracy == pytest.approx(accuracy, abs=0.02)
