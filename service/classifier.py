"""The default example classifier: a small Fashion-MNIST CNN, its reproducible training and
its artifact.

The artifact is a ``torch.export`` program (``classifier.pt2``), loadable with plain torch and
no project import (``torch.export.load(path).module()``), next to ``manifest.json`` with its
sha256, class names, input spec and the layer names whose gradient norms form the features.
It is loaded like any user's classifier (``detectors.model_dir.load_classifier``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

# The core's model-dir API, re-exported: this module is the default example's builder.
from detectors.model_dir import LoadedClassifier, load_classifier, sha256_file
from detectors.spec import MANIFEST_FILE, MODEL_FILES, ArtifactError, Manifest

__all__ = [
    "MANIFEST_FILE",
    "ArtifactError",
    "FashionCNN",
    "LoadedClassifier",
    "Manifest",
    "TrainingRecipe",
    "export_classifier",
    "load_classifier",
    "sha256_file",
    "train_classifier",
]

ARCHITECTURE = "gradprobe.fashion_cnn.v1"
ARTIFACT_FORMAT = "torch.export"
MODEL_FILE = MODEL_FILES[ARTIFACT_FORMAT]
INPUT_SHAPE = (1, 28, 28)
# Fashion-MNIST training-set pixel statistics, applied inside the model so clients send [0, 1].
PIXEL_MEAN = 0.2860
PIXEL_STD = 0.3530


class FashionCNN(nn.Module):
    """conv-pool ×2 → linear → linear; float32 (B, 1, 28, 28) in [0, 1] → logits (B, 10)."""

    def __init__(self, channels: tuple[int, int] = (16, 32), hidden: int = 128) -> None:
        super().__init__()
        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN))
        self.register_buffer("pixel_std", torch.tensor(PIXEL_STD))
        self.conv1 = nn.Conv2d(1, channels[0], 3, padding=1)
        self.conv2 = nn.Conv2d(channels[0], channels[1], 3, padding=1)
        self.fc1 = nn.Linear(channels[1] * 7 * 7, hidden)
        self.dropout = nn.Dropout(0.25)
        self.fc2 = nn.Linear(hidden, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = (x - self.pixel_mean) / self.pixel_std
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = self.dropout(F.relu(self.fc1(x.flatten(1))))
        return self.fc2(x)


@dataclass(frozen=True)
class TrainingRecipe:
    seed: int = 0
    epochs: int = 6
    batch_size: int = 128
    learning_rate: float = 1e-3
    # Narrow enough to train in about a minute on 2 cores and to serve per request on a CPU.
    channels: tuple[int, int] = (16, 32)
    hidden: int = 128


def build_module(recipe: TrainingRecipe) -> FashionCNN:
    return FashionCNN(channels=tuple(recipe.channels), hidden=recipe.hidden)


def train_classifier(
    train_x: np.ndarray,
    train_y: np.ndarray,
    recipe: TrainingRecipe,
    progress: Callable[[int, int, float], None] | None = None,
) -> FashionCNN:
    """Train from uint8 images (n, 28, 28); the same seed and data give the same weights."""
    torch.manual_seed(recipe.seed)
    # Tiny gradients turn denormal late in training and make CPU arithmetic many times slower.
    torch.set_flush_denormal(True)
    model = build_module(recipe)
    optimizer = torch.optim.Adam(model.parameters(), lr=recipe.learning_rate)
    total_steps = recipe.epochs * ((len(train_x) + recipe.batch_size - 1) // recipe.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=3 * recipe.learning_rate, total_steps=total_steps
    )
    images = torch.from_numpy(np.array(train_x)).float().div_(255.0).unsqueeze(1)
    labels = torch.from_numpy(train_y)
    generator = torch.Generator().manual_seed(recipe.seed)
    steps_per_epoch = (len(images) + recipe.batch_size - 1) // recipe.batch_size
    try:
        model.train()
        for epoch in range(recipe.epochs):
            order = torch.randperm(len(images), generator=generator)
            for step in range(steps_per_epoch):
                index = order[step * recipe.batch_size : (step + 1) * recipe.batch_size]
                loss = F.cross_entropy(model(images[index]), labels[index])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                if progress is not None:
                    done = epoch * steps_per_epoch + step + 1
                    progress(done, recipe.epochs * steps_per_epoch, loss.item())
    finally:
        # A process-wide CPU flag: other code in the process expects IEEE subnormals.
        torch.set_flush_denormal(False)
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, images: np.ndarray, labels: np.ndarray, batch: int = 1000) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(images), batch):
        x = torch.from_numpy(np.array(images[i : i + batch])).float().div_(255.0).unsqueeze(1)
        correct += (model(x).argmax(1).numpy() == labels[i : i + batch]).sum()
    return float(correct) / len(images)


def export_classifier(
    model: nn.Module,
    out_dir: Path,
    *,
    classes: list[str],
    test_accuracy: float,
    recipe: TrainingRecipe,
    data_sha256: str,
) -> Manifest:
    """Write ``classifier.pt2`` (dynamic batch) and ``manifest.json`` into ``out_dir``."""
    from detectors.gradients import parameterized_layers

    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    batch = torch.export.Dim("batch", min=1, max=65536)
    program = torch.export.export(
        model, (torch.zeros(2, *INPUT_SHAPE),), dynamic_shapes=({0: batch},)
    )
    path = out_dir / MODEL_FILE
    torch.export.save(program, path)
    manifest = Manifest(
        architecture=ARCHITECTURE,
        format=ARTIFACT_FORMAT,
        file=MODEL_FILE,
        sha256=sha256_file(path),
        input_shape=list(INPUT_SHAPE),
        input_dtype="float32",
        input_range=[0.0, 1.0],
        classes=list(classes),
        layers=[name for name, _ in parameterized_layers(model)],
        test_accuracy=round(test_accuracy, 6),
        recipe=asdict(recipe),
        data_sha256=data_sha256,
        torch_version=torch.__version__,
    )
    (out_dir / MANIFEST_FILE).write_text(manifest.to_json())
    return manifest
