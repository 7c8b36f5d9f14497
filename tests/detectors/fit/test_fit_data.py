"""Reading a user's labelled images: ImageFolder trees and .npz files, with actionable errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from byom_models import write_image_folder
from PIL import Image

from detectors.fit.data import DataError, load_labelled, load_unlabelled, survey


def test_image_folder_classes_are_sorted_folder_names(tmp_path) -> None:
    root = write_image_folder(tmp_path / "train", ["zebra", "ant", "cat"], 3, (3, 12, 16))
    assert survey(root) == (3, 12, 16)
    data = load_labelled(root, (3, 12, 16))
    assert data.classes == ["ant", "cat", "zebra"]
    assert data.images.shape == (9, 3, 12, 16) and data.images.dtype == np.float32
    assert data.images.min() >= 0.0 and data.images.max() <= 1.0
    assert data.labels.tolist() == [0] * 3 + [1] * 3 + [2] * 3
    # The pixels are the files' own (channels first, divided by 255).
    first = np.asarray(Image.open(root / "ant" / "000.png"), dtype=np.float32) / 255
    np.testing.assert_allclose(data.images[0], first.transpose(2, 0, 1))
    assert load_labelled(root, (3, 12, 16)).digest == data.digest


def test_grayscale_folders_other_sizes_and_resizing(tmp_path) -> None:
    root = write_image_folder(tmp_path / "gray", ["a", "b"], 2, (1, 10, 10))
    Image.new("L", (20, 20), 128).save(root / "a" / "big.png")
    assert survey(root) == (1, 10, 10)
    data = load_labelled(root, (1, 10, 10))
    assert data.images.shape == (5, 1, 10, 10) and data.resized == 1
    rgb = load_labelled(root, (3, 10, 10))  # a colour model reads grey images as RGB
    assert rgb.images.shape == (5, 3, 10, 10)


def test_validation_data_must_use_the_training_classes(tmp_path) -> None:
    train = write_image_folder(tmp_path / "train", ["a", "b", "c"], 2, (3, 8, 8))
    val = write_image_folder(tmp_path / "val", ["b", "c"], 2, (3, 8, 8))
    data = load_labelled(val, (3, 8, 8), classes=load_labelled(train, (3, 8, 8)).classes)
    assert data.labels.tolist() == [1, 1, 2, 2]
    other = write_image_folder(tmp_path / "other", ["a", "x"], 1, (3, 8, 8))
    with pytest.raises(DataError, match="'x'"):
        load_labelled(other, (3, 8, 8), classes=["a", "b", "c"])


def test_npz_layouts(tmp_path) -> None:
    rng = np.random.default_rng(0)
    hwc = rng.integers(0, 256, (6, 9, 11, 3), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", images=hwc, labels=np.arange(6) % 3)
    assert survey(tmp_path / "d.npz") == (3, 9, 11)
    data = load_labelled(tmp_path / "d.npz", (3, 9, 11))
    np.testing.assert_allclose(data.images[2], hwc[2].transpose(2, 0, 1) / 255, rtol=1e-6)
    assert data.classes == ["0", "1", "2"]
    floats = rng.uniform(0, 1, (4, 1, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "f.npz", images=floats, labels=[0, 1, 0, 1], classes=["no", "yes"])
    data = load_labelled(tmp_path / "f.npz", (1, 8, 8))
    assert data.classes == ["no", "yes"] and np.array_equal(data.images, floats)
    assert load_unlabelled(tmp_path / "f.npz", (1, 8, 8)).shape == (4, 1, 8, 8)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p.mkdir(), "one sub-folder per class"),
        (lambda p: np.savez(p.with_suffix(".npz"), pixels=np.zeros(3)), "no `images`"),
        (
            lambda p: np.savez(p.with_suffix(".npz"), images=np.full((2, 4, 4), 2.0)),
            "within",
        ),
    ],
)
def test_bad_data_says_what_to_fix(tmp_path, make, message) -> None:
    path = tmp_path / "data"
    make(path)
    target = path if path.exists() else path.with_suffix(".npz")
    with pytest.raises(DataError, match=message):
        load_labelled(target, (1, 4, 4))


def test_unreadable_image_is_named(tmp_path) -> None:
    root = write_image_folder(tmp_path / "t", ["a", "b"], 1, (3, 8, 8))
    (root / "b" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"broken\.png"):
        load_labelled(root, (3, 8, 8))


def test_an_installed_data_set_is_named_instead_of_a_path() -> None:
    from detectors.fit.data import survey

    data = load_labelled(Path("fashion-mnist:test"), (1, 28, 28))
    assert data.images.shape == (10_000, 1, 28, 28) and data.images.dtype == np.float32
    assert data.images.min() >= 0.0 and data.images.max() <= 1.0
    assert len(data.classes) == 10 and set(np.unique(data.labels)) == set(range(10))
    assert survey(Path("fashion-mnist:train")) == (1, 28, 28)
    # The digest names the split: train and test never share a cache entry.
    assert data.digest != load_labelled(Path("fashion-mnist:train"), (1, 28, 28)).digest


def test_a_named_set_refuses_another_shape_and_unknown_names() -> None:
    with pytest.raises(DataError, match="1×28×28"):
        load_labelled(Path("fashion-mnist:test"), (3, 32, 32))
    with pytest.raises(DataError, match="fashion-mnist:train"):
        load_labelled(Path("fashion-mnist:validation"), (1, 28, 28))
