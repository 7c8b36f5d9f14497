"""Small user-style classifiers for the bring-your-own-classifier tests: RGB, sizes other than
28, BatchNorm, residual sums; saved as TorchScript and torch.export files as users hold them."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# The fitted example the service tests share (see ``tests/conftest.py``).
SHAPE = (3, 20, 24)
CLASSES = ["bus", "car", "sign", "truck"]


class TinyResNet(nn.Module):
    """conv-BN-ReLU, a residual block, a strided conv, global pooling, a linear head."""

    def __init__(self, channels: int = 3, classes: int = 4, width: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(channels, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.block = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
        )  # fmt: skip
        self.down = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn(self.stem(x)))
        y = F.relu(self.block(y) + y)
        y = F.relu(self.down(y))
        return self.head(F.adaptive_avg_pool2d(y, 1).flatten(1))


def make_model(channels: int = 3, classes: int = 4, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = TinyResNet(channels, classes)
    with torch.no_grad():  # non-trivial running statistics, as a trained model has
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.3, 0.3)
                module.running_var.uniform_(0.5, 1.5)
    return model.eval()


def save(model: nn.Module, path: Path, shape: tuple[int, int, int]) -> Path:
    """TorchScript for ``.pt``, a torch.export program with a dynamic batch for ``.pt2``."""
    example = torch.rand(2, *shape)
    if path.suffix == ".pt2":
        batch = torch.export.Dim("batch", min=1, max=4096)
        torch.export.save(
            torch.export.export(model, (example,), dynamic_shapes=({0: batch},)), path
        )
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.jit.save(torch.jit.trace(model, example), path)
    return path


def write_image_folder(
    root: Path, classes: list[str], per_class: int, shape: tuple[int, int, int], seed: int = 0
) -> Path:
    """Class-coloured noisy PNGs in an ImageFolder tree (sorted names = class indices)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    c, h, w = shape
    for k, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        base = np.array([(k * 70 + 40) % 256, (k * 130 + 90) % 256, (k * 30 + 160) % 256])
        for i in range(per_class):
            pixels = base + rng.normal(0, 25, (h, w, 3)) + rng.uniform(-30, 30)
            image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
            (image if c == 3 else image.convert("L")).save(root / name / f"{i:03d}.png")
    return root


def trained(folder: Path) -> nn.Module:
    """The tiny model briefly trained on an image folder: a classifier a user would hold."""
    from detectors.fit.data import load_labelled

    data = load_labelled(folder, SHAPE)
    model = make_model(classes=len(CLASSES)).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = torch.from_numpy(data.images), torch.from_numpy(data.labels)
    for _ in range(30):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()
