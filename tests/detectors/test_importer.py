"""Imported classifiers (TorchScript, torch.export) lifted to eager modules: exact features."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from byom_models import make_model, save
from torch import nn

from detectors.gradients import GradientFeatures
from detectors.importer import OpLayer, lift, load_program
from detectors.reference import loop_features
from detectors.spec import ArtifactError

FORMATS = {".pt": "torchscript", ".pt2": "torch.export"}


def lifted(model: nn.Module, tmp_path, shape, suffix, **kwargs) -> nn.Module:
    path = save(model, tmp_path / f"model{suffix}", shape)
    program, parameters, _ = load_program(path, FORMATS[suffix], shape)
    return lift(program, parameters, **kwargs)


@pytest.mark.parametrize("suffix", [".pt", ".pt2"])
@pytest.mark.parametrize("shape", [(3, 20, 24), (1, 17, 17)])
def test_lifted_features_equal_the_per_label_loop(tmp_path, suffix, shape) -> None:
    model = make_model(channels=shape[0])
    module = lifted(model, tmp_path, shape, suffix)
    # Layers are the module paths of the user's own parameters.
    engine = GradientFeatures(module)
    assert engine.layer_names == ["stem", "bn", "block.0", "block.1", "block.3", "block.4",
                                  "down", "head"]  # fmt: skip
    assert engine.uses_traced_backward is False  # decided by the first pass
    for batch in (1, 17):
        x = torch.rand(batch, *shape, generator=torch.Generator().manual_seed(batch))
        expected = loop_features(model, x).numpy()
        got = engine.compute(x).numpy()
        assert got.shape == (batch, 4, 8)
        assert abs(got - expected).max() <= 1e-4 * abs(expected).max()
        assert (abs(got - expected) <= 1e-4 * abs(expected) + 1e-9).all()
    assert engine.uses_traced_backward  # the label-folded backward applies to lifted models
    autograd = GradientFeatures(module, traced=False).compute(x).numpy()
    assert (abs(autograd - got) <= 1e-4 * abs(got) + 1e-9).all()


def test_lifted_module_gives_the_files_logits(tmp_path) -> None:
    model = make_model()
    x = torch.rand(5, 3, 20, 24)
    for suffix in FORMATS:
        with torch.no_grad():
            torch.testing.assert_close(lifted(model, tmp_path, (3, 20, 24), suffix)(x), model(x))


class WithOtherLayers(nn.Module):
    """LayerNorm and PReLU have no closed-form norm: they become OpLayers (exact fallback)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, stride=2)
        self.norm = nn.LayerNorm(6)
        self.act = nn.PReLU()
        self.fc = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.act(self.norm(self.conv(x).mean((2, 3)))))


@pytest.mark.parametrize("suffix", [".pt", ".pt2"])
def test_layers_without_closed_form_are_exact(tmp_path, suffix) -> None:
    torch.manual_seed(1)
    model = WithOtherLayers().eval()
    module = lifted(model, tmp_path, (3, 12, 12), suffix)
    kinds = {name: type(m) for name, m in module.named_modules() if name}
    assert kinds["norm"] is OpLayer and kinds["act"] is OpLayer
    assert kinds["conv"] is nn.Conv2d and kinds["fc"] is nn.Linear
    x = torch.rand(3, 3, 12, 12)
    expected = loop_features(model, x).numpy()
    got = GradientFeatures(module).compute(x).numpy()
    assert (abs(got - expected) <= 1e-4 * abs(expected) + 1e-9).all()


def test_normalization_runs_before_the_model_and_keeps_layer_names(tmp_path) -> None:
    model = make_model()
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    module = lifted(model, tmp_path, (3, 20, 24), ".pt2", mean=mean, std=std)
    x = torch.rand(2, 3, 20, 24)
    normalized = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(module(x), model(normalized))
    assert GradientFeatures(module).layer_names[0] == "stem"


class Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc(self.fc(x.flatten(1))))


def test_weight_sharing_is_refused_with_a_reason(tmp_path) -> None:
    with pytest.raises(ArtifactError, match="more than one operation"):
        lifted(Shared().eval(), tmp_path, (1, 2, 2), ".pt2")


def test_batch_norm_in_training_mode_is_refused(tmp_path) -> None:
    model = make_model()
    path = tmp_path / "train.pt"
    model.train()
    with pytest.warns(Warning), torch.no_grad():
        torch.jit.save(torch.jit.trace(model, torch.rand(2, 3, 8, 8)), path)
    program, parameters, _ = load_program(path, "torchscript", (3, 8, 8))
    with pytest.raises(ArtifactError, match=r"model\.eval"):
        lift(program, parameters)


def test_unreadable_files_name_the_format(tmp_path) -> None:
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"not a model")
    with pytest.raises(ArtifactError, match="TorchScript"):
        load_program(bad, "torchscript", (3, 8, 8))
    with pytest.raises(ArtifactError, match=r"torch\.export"):
        load_program(bad, "torch.export", (3, 8, 8))


def test_in_place_ops_read_as_their_results(tmp_path) -> None:
    class InPlace(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, padding=1)
            self.fc = nn.Linear(4 * 4 * 4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            z = y.clone()
            z += y
            F.relu_(z)
            return self.fc(F.max_pool2d(z, 2).view(z.size(0), -1))

    torch.manual_seed(2)
    model = InPlace().eval()
    x = torch.rand(3, 1, 8, 8)
    for suffix in FORMATS:
        module = lifted(model, tmp_path, (1, 8, 8), suffix)
        expected = loop_features(model, x).numpy()
        got = GradientFeatures(module).compute(x).numpy()
        assert (abs(got - expected) <= 1e-4 * abs(expected) + 1e-9).all()


def test_a_program_exported_for_one_batch_size_is_refused_with_the_fix(tmp_path) -> None:
    path = tmp_path / "static.pt2"
    torch.export.save(torch.export.export(make_model(), (torch.rand(1, 3, 20, 24),)), path)
    with pytest.raises(ArtifactError, match="dynamic batch"):
        load_program(path, "torch.export", (3, 20, 24))


def test_a_decomposed_program_lifts_to_the_same_layers(tmp_path) -> None:
    """After run_decompositions(), linear layers are permute + addmm and batch norm returns
    its statistics too; the lifted module still has the model's layers and exact features."""
    model = make_model()
    x = torch.rand(2, 3, 20, 24)
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(model, (x,), dynamic_shapes=({0: batch},)).run_decompositions()
    torch.export.save(program, tmp_path / "decomposed.pt2")
    loaded, parameters, _ = load_program(tmp_path / "decomposed.pt2", "torch.export", (3, 20, 24))
    module = lift(loaded, parameters)
    assert isinstance(dict(module.named_modules())["head"], nn.Linear)
    expected = loop_features(model, x).numpy()
    got = GradientFeatures(module).compute(x).numpy()
    assert (abs(got - expected) <= 1e-4 * abs(expected) + 1e-9).all()
