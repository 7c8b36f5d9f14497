"""The synthetic traffic-sign example: data layout and determinism, SignNet, training, export."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from detectors.fit.signs import (
    CLASSES,
    SignNet,
    build_example,
    export_signs,
    load_split,
    make_signs,
    render_sign,
    train_signs,
)

PER_CLASS = 8
SIZE = 24


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("signs")
    make_signs(out, per_class=PER_CLASS, size=SIZE, seed=0, progress=False)
    return out


def _pngs(root: Path) -> list[Path]:
    return sorted(root.rglob("*.png"))


def test_tree_is_an_image_folder_with_sorted_class_names(tiny):
    from torchvision.datasets import ImageFolder

    assert list(CLASSES) == sorted(CLASSES)
    assert len(CLASSES) == 12
    assert all(name == name.lower() and " " not in name for name in CLASSES)
    counts = {"train": PER_CLASS, "test": PER_CLASS // 3}
    for split, count in counts.items():
        folders = sorted(p.name for p in (tiny / split).iterdir())
        assert folders == list(CLASSES)
        for name in CLASSES:
            files = sorted((tiny / split / name).iterdir())
            assert [f.name for f in files] == [f"{i:05d}.png" for i in range(count)]
        assert ImageFolder(str(tiny / split)).classes == list(CLASSES)


def test_make_signs_returns_the_folder_names(tmp_path):
    classes = make_signs(tmp_path, per_class=1, size=16, progress=False)
    assert classes == sorted(p.name for p in (tmp_path / "train").iterdir()) == list(CLASSES)


def test_images_are_rgb_pngs_of_the_requested_size(tiny):
    for path in _pngs(tiny)[::7]:
        with Image.open(path) as image:
            assert image.format == "PNG"
            assert image.mode == "RGB"
            assert image.size == (SIZE, SIZE)


def test_same_seed_same_bytes_other_seed_other_images(tiny, tmp_path):
    again, other = tmp_path / "again", tmp_path / "other"
    make_signs(again, per_class=PER_CLASS, size=SIZE, seed=0, progress=False)
    make_signs(other, per_class=PER_CLASS, size=SIZE, seed=1, progress=False)
    originals = _pngs(tiny)
    for path in originals:
        assert (again / path.relative_to(tiny)).read_bytes() == path.read_bytes()
    differing = sum(
        (other / path.relative_to(tiny)).read_bytes() != path.read_bytes() for path in originals
    )
    assert differing == len(originals)


def test_an_image_does_not_depend_on_how_many_are_made(tiny, tmp_path):
    make_signs(tmp_path, per_class=2, size=SIZE, seed=0, progress=False)
    for path in _pngs(tmp_path):
        assert path.read_bytes() == (tiny / path.relative_to(tmp_path)).read_bytes()


def test_train_and_test_images_differ(tiny):
    train = {p.read_bytes() for p in _pngs(tiny / "train")}
    assert not any(p.read_bytes() in train for p in _pngs(tiny / "test"))
    assert len(train) == PER_CLASS * len(CLASSES)  # no two training images alike either


def test_existing_output_is_refused_unless_overwritten(tmp_path):
    make_signs(tmp_path, per_class=2, size=16, progress=False)
    stale = tmp_path / "train" / "stop" / "99999.png"
    stale.write_bytes(b"not a sign")
    with pytest.raises(FileExistsError):
        make_signs(tmp_path, per_class=1, size=16, progress=False)
    make_signs(tmp_path, per_class=1, size=16, progress=False, overwrite=True)
    assert not stale.exists()
    assert len(_pngs(tmp_path / "train")) == len(CLASSES)


def _centre_colour(name: str, n: int = 12) -> np.ndarray:
    """Mean RGB of the middle of ``n`` images, where the sign is whatever the background."""
    index = CLASSES.index(name)
    images = [
        np.asarray(render_sign(name, 32, np.random.default_rng([7, index, i])), dtype=np.float32)
        for i in range(n)
    ]
    return np.mean([image[12:20, 8:24] for image in images], axis=(0, 1, 2))


def test_classes_look_different():
    stop, parking = _centre_colour("stop"), _centre_colour("parking")
    priority, no_entry = _centre_colour("priority"), _centre_colour("no_entry")
    assert stop[0] - stop[2] > parking[0] - parking[2] + 60  # red vs blue
    assert parking[2] > stop[2]
    assert priority[1] > no_entry[1] + 40  # yellow has green in it, red does not
    # Mirror images are different classes: the arrows must not be drawn alike.
    left = np.asarray(render_sign("turn_left", 32, np.random.default_rng(3)), dtype=np.float32)
    right = np.asarray(render_sign("turn_right", 32, np.random.default_rng(3)), dtype=np.float32)
    assert np.abs(left - right).mean() > 3


def test_signnet_shapes_and_size():
    model = SignNet().eval()
    n_params = sum(p.numel() for p in model.parameters())
    assert 50_000 <= n_params <= 150_000
    with torch.no_grad():
        for size in (24, 32, 48):
            logits = model(torch.rand(5, 3, size, size))
            assert logits.shape == (5, len(CLASSES))
            assert logits.dtype == torch.float32
    assert SignNet(n_classes=3)(torch.rand(2, 3, 32, 32)).shape == (2, 3)


@pytest.mark.filterwarnings("ignore:.*torch.jit.load.*:FutureWarning")  # torch 2.10+ deprecates it
def test_traced_file_round_trips_to_identical_logits(tmp_path):
    torch.manual_seed(0)
    model = SignNet()
    # Non-trivial running statistics, so eval-mode BatchNorm is really exercised.
    model.train()
    with torch.no_grad():
        model(torch.rand(16, 3, 32, 32))
    path = export_signs(model, tmp_path / "classifier.pt", 32)
    assert path == tmp_path / "classifier.pt" and path.is_file()
    assert not model.training
    loaded = torch.jit.load(str(path))
    x = torch.rand(7, 3, 32, 32)  # another batch size than the trace's example
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=1e-6)


def test_training_runs_lowers_the_loss_and_is_reproducible(tiny):
    x, y, classes = load_split(tiny, "train")
    assert classes == list(CLASSES)
    assert x.shape == (PER_CLASS * len(CLASSES), 3, SIZE, SIZE)
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0

    short, _ = train_signs(tiny, epochs=1, batch_size=16, progress=False)
    model, acc = train_signs(tiny, epochs=5, batch_size=16, progress=False)
    again, acc_again = train_signs(tiny, epochs=5, batch_size=16, progress=False)

    assert not model.training
    assert 0.0 <= acc <= 1.0
    with torch.no_grad():
        loss_short = F.cross_entropy(short(x), y).item()
        loss = F.cross_entropy(model(x), y).item()
    assert loss < loss_short
    assert loss < math.log(len(CLASSES))  # below chance
    # Normalization comes from the training pixels.
    torch.testing.assert_close(model.pixel_mean.flatten(), x.mean((0, 2, 3)))

    assert acc_again == acc
    for (name, a), (_, b) in zip(
        model.state_dict().items(), again.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


@pytest.mark.filterwarnings("ignore:.*torch.jit.load.*:FutureWarning")  # torch 2.10+ deprecates it
def test_build_example_makes_everything(tmp_path):
    out = build_example(tmp_path / "example", per_class=3, size=24, epochs=1, progress=False)
    assert out == tmp_path / "example"
    assert len(_pngs(out / "train")) == 3 * len(CLASSES)
    assert len(_pngs(out / "test")) == 1 * len(CLASSES)
    loaded = torch.jit.load(str(out / "classifier.pt"))
    assert loaded(torch.rand(2, 3, 24, 24)).shape == (2, len(CLASSES))
    readme = (out / "README.txt").read_text()
    assert "test accuracy" in readme
    assert all(f"{i:2d}: {name}" in readme for i, name in enumerate(CLASSES))
