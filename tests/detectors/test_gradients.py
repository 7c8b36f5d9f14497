"""The batched engine against the definition (one autograd backward per sample and label)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from detectors import layer_norms
from detectors.gradients import GradientFeatures, parameterized_layers
from detectors.layer_norms import (
    conv2d_sq_norms,
    generic_sq_norms,
    norm_fn_for,
    pooled_conv2d_sq_norms,
    unfold,
)
from detectors.reference import loop_features, vmap_features
from service.classifier import FashionCNN


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(3 * 6 * 6, 32),
            nn.Tanh(),
            nn.Linear(32, 16),
            nn.ReLU(),
            nn.Linear(16, 7, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)  # in-place ops must not corrupt captured outputs
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class TinyResNet(nn.Module):
    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.layer1 = BasicBlock(8, 8, 1)
        self.layer2 = BasicBlock(8, 12, 2)
        self.fc = nn.Linear(12, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn(self.stem(x)))
        out = self.layer2(self.layer1(out))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


class GroupedDilated(nn.Module):
    """Convolutions with groups, dilation, stride, asymmetric kernels and no bias."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 8, 3, padding=2, dilation=2)
        self.conv2 = nn.Conv2d(8, 8, (3, 2), stride=2, padding=1, groups=4)
        self.conv3 = nn.Conv2d(8, 6, 1, groups=2, bias=False)
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.gelu(self.conv1(x))
        out = F.relu(self.conv2(out))
        out = self.conv3(out)
        return self.fc(out.mean((2, 3)))


class WithUnknownLayers(nn.Module):
    """LayerNorm and a custom parameterized module have no closed form: generic fallback."""

    class Scale(nn.Module):
        def __init__(self, n: int) -> None:
            super().__init__()
            self.gain = nn.Parameter(torch.linspace(0.5, 1.5, n))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.gain

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(10, 12)
        self.norm = nn.LayerNorm(12)
        self.scale = self.Scale(12)
        self.fc2 = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.scale(torch.tanh(self.norm(self.fc1(x.flatten(1))))))


class TracedZoo(nn.Module):
    """Every op the label-folded backward knows, in one graph: strided, dilated and grouped
    convolutions, overlapping padded max pooling (as a module and as a function, with and
    without a ReLU before it), BatchNorm, a residual sum, scaling by a buffer, view through
    ``size``, global means and dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.tensor(0.5))
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)  # overlapping windows
        self.grouped = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=2, bias=False)
        self.strided = nn.Conv2d(8, 12, 3, stride=2, padding=1)
        self.fc1 = nn.Linear(12 * 2 * 2, 16)
        self.drop = nn.Dropout(0.5)
        self.fc2 = nn.Linear(16 + 12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.pool(F.relu(self.bn(self.stem(x * self.scale))))
        out = F.relu(out + self.grouped(out))  # residual
        out = F.max_pool2d(self.strided(out), 2, ceil_mode=True)  # no ReLU before it
        pooled = out.mean((2, 3))
        flat = out.view(out.size(0), -1)
        hidden = self.drop(F.dropout(torch.relu(self.fc1(flat)), 0.3, self.training))
        return self.fc2(torch.cat([hidden, pooled], dim=1))


def _randomize_batchnorm(model: nn.Module) -> None:
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen) * 0.1)


CASES = {
    "default_cnn": (lambda: FashionCNN(), (1, 28, 28)),
    "mlp": (MLP, (3, 6, 6)),
    "resnet_bn": (TinyResNet, (3, 8, 8)),
    "grouped_dilated": (GroupedDilated, (4, 9, 9)),
    "unknown_layers": (WithUnknownLayers, (1, 10)),
    "traced_zoo": (TracedZoo, (3, 9, 9)),
}


def _build(name: str) -> tuple[nn.Module, tuple[int, ...]]:
    torch.manual_seed(0)
    factory, shape = CASES[name]
    model = factory()
    _randomize_batchnorm(model)
    return model.eval(), shape


def assert_features_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape
    # rtol 1e-4 on every entry; the atol only covers exact zeros (dead units) in float32.
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-7 * expected.abs().max().item())


TRACED = {"default_cnn", "resnet_bn", "traced_zoo"}  # graphs the folded backward knows


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("batch", [1, 17])
@pytest.mark.parametrize("traced", [True, False], ids=["traced", "autograd"])
def test_engine_matches_per_label_loop(name: str, batch: int, traced: bool) -> None:
    model, shape = _build(name)
    x = torch.rand(batch, *shape, generator=torch.Generator().manual_seed(batch))
    engine = GradientFeatures(model, traced=traced)
    features = engine.compute(x)
    assert engine.uses_traced_backward == (traced and name in TRACED)
    expected = loop_features(model, x)
    n_classes = model(x[:1]).shape[-1]
    assert features.shape == (batch, n_classes, len(parameterized_layers(model)))
    assert features.dtype == torch.float32
    assert (features > 0).any()
    assert_features_close(features, expected)


@pytest.mark.parametrize("name", ["resnet_bn", "grouped_dilated"])
def test_confounding_label_matches_loop(name: str) -> None:
    model, shape = _build(name)
    x = torch.rand(5, *shape, generator=torch.Generator().manual_seed(3))
    features = GradientFeatures(model, labels="confounding").compute(x)
    assert features.shape[1] == 1
    assert_features_close(features, loop_features(model, x, labels="confounding"))


def test_traced_and_autograd_paths_agree_closely() -> None:
    model, shape = _build("traced_zoo")
    x = torch.rand(6, *shape, generator=torch.Generator().manual_seed(5))
    traced = GradientFeatures(model).signals(x)
    general = GradientFeatures(model, traced=False).signals(x)
    torch.testing.assert_close(traced.features, general.features, rtol=1e-5, atol=0)
    torch.testing.assert_close(traced.logits, general.logits, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(traced.embeddings, general.embeddings, rtol=1e-6, atol=1e-6)


def test_a_case_found_only_at_run_time_falls_back_to_autograd() -> None:
    class BroadcastGate(nn.Module):
        """A layer's output broadcast against another's: no folded rule, found at run time."""

        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(2, 4, 3, padding=1)
            self.gate = nn.Linear(2, 4)
            self.fc = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            gate = self.gate(x.mean((2, 3))).view(x.size(0), -1, 1, 1)
            return self.fc((self.conv(x) * 0.5 + gate).mean((2, 3)))

    torch.manual_seed(0)
    model = BroadcastGate().eval()
    x = torch.rand(4, 2, 5, 5)
    engine = GradientFeatures(model)
    features = engine.compute(x)
    assert not engine.uses_traced_backward
    assert_features_close(features, loop_features(model, x))


def test_pooled_norms_equal_norms_of_the_full_gradient() -> None:
    # Overlapping, padded pooling: cells can share a maximum, and must then add up.
    conv = nn.Conv2d(3, 5, 3, padding=1)
    a = torch.rand(4, 3, 9, 9)
    z = conv(a).detach()
    pooled, indices = F.max_pool2d(z, 3, stride=2, padding=1, return_indices=True)
    pooled_grad = torch.randn(6, *pooled.shape)
    full = torch.zeros(6, 4, 5, 81)
    index = indices.flatten(2).expand(6, -1, -1, -1)
    full.scatter_add_(-1, index, pooled_grad.flatten(3))
    expected = conv2d_sq_norms(conv, (a,), full.view(6, 4, 5, 9, 9))
    actual = pooled_conv2d_sq_norms(conv, (a,), pooled_grad.flatten(3), indices.flatten(2))
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=0)


def test_models_with_forward_hooks_keep_the_autograd_path() -> None:
    model, shape = _build("default_cnn")
    seen: list[int] = []
    model.conv2.register_forward_hook(lambda _m, _i, out: seen.append(out.shape[0]))
    x = torch.rand(3, *shape)
    engine = GradientFeatures(model)
    features = engine.compute(x)
    assert not engine.uses_traced_backward
    assert seen  # the user's hook ran
    assert_features_close(features, loop_features(model, x))


def test_reused_buffers_do_not_leak_between_batches() -> None:
    model, shape = _build("default_cnn")
    x = torch.rand(6, *shape, generator=torch.Generator().manual_seed(2))
    engine = GradientFeatures(model)
    first = engine.compute(x)
    engine.compute(x[:2] * 0.5)  # smaller batch, other values, same buffers
    torch.testing.assert_close(engine.compute(x), first, rtol=0, atol=0)
    torch.testing.assert_close(engine.compute(x[3:5]), first[3:5], rtol=1e-5, atol=0)


def test_vmap_reference_agrees_with_loop() -> None:
    model, shape = _build("mlp")
    x = torch.rand(3, *shape)
    assert_features_close(vmap_features(model, x, chunk_size=8), loop_features(model, x))


def test_chunking_does_not_change_features() -> None:
    model, shape = _build("resnet_bn")
    x = torch.rand(9, *shape)
    whole = GradientFeatures(model, max_batch=None).compute(x)
    chunked = GradientFeatures(model, max_batch=4).compute(x)
    torch.testing.assert_close(whole, chunked, rtol=1e-5, atol=0)


def test_automatic_chunks_follow_the_memory_budget() -> None:
    model, shape = _build("resnet_bn")
    x = torch.rand(9, *shape)
    whole = GradientFeatures(model, max_batch=None, memory_budget_mb=1e6)
    tight = GradientFeatures(model, max_batch=None, memory_budget_mb=0.05)
    torch.testing.assert_close(whole.compute(x), tight.compute(x), rtol=1e-5, atol=0)
    assert whole._plan(x)[0] >= 9
    assert 1 <= tight._plan(x)[0] < 9


@pytest.mark.parametrize("traced", [True, False])
def test_labels_in_blocks_when_one_sample_does_not_fit(traced) -> None:
    """A thousand classes at 224 px do not fit one pass: the labels go in blocks, exactly."""
    model, shape = _build("resnet_bn")
    x = torch.rand(3, *shape)
    whole = GradientFeatures(model, memory_budget_mb=1e6, traced=traced)
    blocked = GradientFeatures(model, max_batch=2, memory_budget_mb=0.002, traced=traced)
    step, block, n_labels = blocked._plan(x)
    assert step == 2 and 1 <= block < n_labels
    torch.testing.assert_close(whole.compute(x), blocked.compute(x), rtol=1e-5, atol=0)
    signals = blocked.signals(x)
    torch.testing.assert_close(signals.logits, whole.signals(x).logits)


def test_features_do_not_depend_on_the_rest_of_the_batch() -> None:
    model, shape = _build("resnet_bn")
    x = torch.rand(6, *shape)
    engine = GradientFeatures(model)
    torch.testing.assert_close(engine.compute(x)[2:3], engine.compute(x[2:3]), rtol=1e-5, atol=0)


def test_engine_leaves_model_exactly_as_found() -> None:
    model, shape = _build("resnet_bn")
    model.train()
    model.layer1.eval()  # a mixed state must come back mixed
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    model.fc.weight.grad = None
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    modes = {n: m.training for n, m in model.named_modules()}
    requires = {n: p.requires_grad for n, p in model.named_parameters()}

    GradientFeatures(model).compute(torch.rand(4, *shape))

    for n, p in model.named_parameters():
        assert torch.equal(p, params[n]), n
        assert requires[n] == p.requires_grad, n
        if grads[n] is None:
            assert p.grad is None, n
        else:
            assert torch.equal(p.grad, grads[n]), n
    for n, b in model.named_buffers():
        assert torch.equal(b, buffers[n]), n  # BatchNorm running stats untouched
    assert {n: m.training for n, m in model.named_modules()} == modes


def test_features_use_eval_mode_even_for_a_training_model() -> None:
    model, shape = _build("resnet_bn")
    x = torch.rand(4, *shape)
    expected = GradientFeatures(model).compute(x)
    model.train()
    torch.testing.assert_close(GradientFeatures(model).compute(x), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_works_inside_no_grad_and_inference_mode(context) -> None:
    model, shape = _build("default_cnn")
    expected = GradientFeatures(model).compute(torch.ones(2, *shape) * 0.3)
    with context():
        x = torch.ones(2, *shape) * 0.3  # an inference tensor under inference_mode
        features = GradientFeatures(model).compute(x)
    torch.testing.assert_close(features, expected, rtol=1e-6, atol=0)


def test_frozen_parameters_are_not_features() -> None:
    model, shape = _build("mlp")
    model.net[1].weight.requires_grad_(False)
    model.net[1].bias.requires_grad_(False)
    engine = GradientFeatures(model)
    assert engine.layer_names == ["net.3", "net.5"]
    x = torch.rand(3, *shape)
    assert_features_close(engine.compute(x), loop_features(model, x))


def test_layer_that_does_not_reach_the_logits_gets_zero_features() -> None:
    class SideBranch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(4, 3)
            self.probe = nn.Linear(4, 2)  # computed, never used by the logits

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.probe(x)
            return self.head(x)

    model = SideBranch()
    x = torch.rand(5, 4)
    features = GradientFeatures(model).compute(x)
    assert features.shape == (5, 3, 2)
    assert torch.all(features[..., 1] == 0)
    model.probe.requires_grad_(False)  # the reference loop needs every parameter used
    assert_features_close(features[..., :1], loop_features(model, x))


def test_layer_names_follow_named_parameters() -> None:
    model, _ = _build("resnet_bn")
    prefixes = []
    for name, _ in model.named_parameters():
        prefix = name.rpartition(".")[0]
        if prefix not in prefixes:
            prefixes.append(prefix)
    assert GradientFeatures(model).layer_names == prefixes


def test_reused_layer_is_refused_with_a_clear_message() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.tanh(self.fc(x)))

    with pytest.raises(NotImplementedError, match="'fc' ran 2 times"):
        GradientFeatures(Twice()).compute(torch.rand(2, 4))


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="labels must be"):
        GradientFeatures(MLP(), labels="zeros")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="non-empty batch"):
        GradientFeatures(MLP()).compute(torch.rand(0, 3, 6, 6))


def test_closed_forms_are_chosen_for_known_layers() -> None:
    from detectors import layer_norms

    assert norm_fn_for(nn.Linear(2, 2)) is layer_norms.linear_sq_norms
    assert norm_fn_for(nn.Conv2d(2, 2, 3)) is conv2d_sq_norms
    assert norm_fn_for(nn.BatchNorm2d(2)) is layer_norms.batchnorm_sq_norms
    assert norm_fn_for(nn.Conv2d(2, 2, 3, padding="same")) is generic_sq_norms
    assert norm_fn_for(nn.Conv2d(2, 2, 3, padding_mode="reflect")) is generic_sq_norms
    assert norm_fn_for(nn.LayerNorm(2)) is generic_sq_norms


@pytest.mark.parametrize(
    ("kernel", "stride", "padding", "dilation"),
    [(3, 1, 1, 1), ((3, 2), (2, 1), (1, 0), (1, 2)), (5, 3, 2, 1), (1, 1, 0, 1)],
)
def test_strided_unfold_equals_torch_unfold(kernel, stride, padding, dilation) -> None:
    conv = nn.Conv2d(3, 4, kernel, stride=stride, padding=padding, dilation=dilation)
    a = torch.rand(2, 3, 11, 10)
    expected = F.unfold(
        a, conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride
    )
    assert torch.equal(unfold(a, conv), expected)


@pytest.mark.parametrize("groups", [1, 2])
def test_gram_and_direct_conv_norms_agree(groups: int, monkeypatch) -> None:
    """Both exact forms give the same numbers (each is chosen by cost on some layer)."""
    conv = nn.Conv2d(6, 8, 3, padding=1, groups=groups).double()
    a = torch.rand(3, 6, 5, 5, dtype=torch.float64)
    delta = torch.randn(4, 3, 8, 5, 5, dtype=torch.float64)
    direct = conv2d_sq_norms(conv, (a,), delta, method="direct")
    gram = conv2d_sq_norms(conv, (a,), delta, method="gram")
    torch.testing.assert_close(direct, gram, rtol=1e-10, atol=0)
    # Channels-last per (label, sample), as max pooling's gradients are laid out: same values.
    channels_last = delta.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
    assert channels_last.stride(2) == 1
    direct_cl = conv2d_sq_norms(conv, (a,), channels_last, method="direct")
    torch.testing.assert_close(direct_cl, gram, rtol=1e-10, atol=0)
    monkeypatch.setattr(layer_norms, "_COPY_BLOCK_FLOATS", 1)  # one sample per block
    direct_blocks = conv2d_sq_norms(conv, (a,), channels_last, method="direct")
    torch.testing.assert_close(direct_blocks, gram, rtol=1e-10, atol=0)


def test_signals_carry_logits_and_last_layer_inputs() -> None:
    model, shape = _build("resnet_bn")
    x = torch.rand(5, *shape)
    signals = GradientFeatures(model, max_batch=2).signals(x)
    captured = []
    handle = model.fc.register_forward_hook(lambda _m, i, _o: captured.append(i[0]))
    with torch.no_grad():
        logits = model(x)
    handle.remove()
    torch.testing.assert_close(signals.logits, logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(signals.embeddings, captured[0], rtol=1e-5, atol=1e-6)
    assert set(signals.timings_ms) == {"forward", "gradients"}
    assert all(v > 0 for v in signals.timings_ms.values())


def test_outputs_are_copied_only_when_modified_in_place() -> None:
    # The autograd path keeps the layer outputs themselves, which a later in-place op may
    # overwrite; the traced path computes its own values and needs no copies.
    resnet, shape = _build("resnet_bn")  # ReLU(inplace=True) after BatchNorm
    engine = GradientFeatures(resnet, traced=False)
    x = torch.rand(3, *shape)
    assert_features_close(engine.compute(x), loop_features(resnet, x))
    assert engine._protect_outputs
    cnn, shape = _build("default_cnn")
    engine = GradientFeatures(cnn, traced=False)
    engine.compute(torch.rand(2, *shape))
    assert not engine._protect_outputs
