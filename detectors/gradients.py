"""The feature engine: per-layer squared gradient norms for all contrast labels in one pass.

For an input x, a classifier f with N classes and each one-hot contrast label y_c, the loss is
J_c = CE(f(x), y_c) and the feature is ||∂J_c/∂θ_l||² for every parameterized layer l (weight
and bias together): an N × L matrix per sample. The classifier is never updated.

How it is done in one batched pass instead of N·B backward passes:
1. one forward of the batch, with forward hooks recording each layer's input and output;
2. since ∂J_c/∂z = softmax(z) − e_c, all N labels' cotangents are stacked and pushed back in one
   vectorized backward (``is_grads_batched``) to the layer outputs only — parameter gradients
   are never formed, and activations are shared by all labels;
3. each layer's per-sample norms come from its input and output gradient in closed form
   (``layer_norms``), with a generic per-layer VJP fallback for unknown layer types.

For models whose forward traces (torch.fx) to layers it knows, steps 1-2 run instead through
``traced_backward``: its own forward, then a hand-written backward with the labels folded into
the batch (no vmap, no autograd graph), about 1.3× faster at batch 1 and 2× at batch 32 on the
default model. Both paths are exact; the autograd one remains for everything else.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from detectors import stability
from detectors.layer_norms import LayerNormFn, norm_fn_for, pooled_conv2d_sq_norms
from detectors.traced_backward import PooledDelta, TracedBackward, Unsupported

LabelMode = Literal["onehot", "confounding"]
_SQUEEZE_CHUNK = 32  # images per forward of the squeezed views (each view adds as many)


def parameterized_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules owning parameters, in the order of ``model.named_parameters()``.

    A layer's name is the prefix before ``.weight``/``.bias`` in ``named_parameters()``.
    """
    modules = dict(model.named_modules())
    layers: dict[str, nn.Module] = {}
    for param_name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        prefix = param_name.rpartition(".")[0]
        layers.setdefault(prefix, modules[prefix])
    return list(layers.items())


@dataclass
class GradientSignals:
    """One pass's outputs: features (B, N|1, L), logits (B, N), embeddings (B, D) (the input
    of the last parameterized layer), wall time per stage in milliseconds and, from an engine
    built with ``squeeze=True``, the logits of the squeezed views (B, K, N)
    (``detectors.stability``)."""

    features: Tensor
    logits: Tensor
    embeddings: Tensor
    timings_ms: dict[str, float]
    squeezed_logits: Tensor | None = None


@dataclass
class _Capture:
    inputs: tuple[Tensor, ...] | None = None
    output: Tensor | None = None
    calls: int = 0
    version: int = 0


class GradientFeatures:
    """Exact per-layer squared gradient norms of every contrast label, batched.

    Args:
        model: the classifier, returning logits of shape (B, N). It is never modified: its
            parameters, their ``.grad`` and every module's train/eval flag are left as found.
            Features are computed with the model in eval mode.
        labels: ``"onehot"`` backpropagates each of the N one-hot labels (features (B, N, L));
            ``"confounding"`` backpropagates one all-ones label (features (B, 1, L)), the
            Introspective Learning variant.
        max_batch: samples per internal chunk. Memory grows as chunk × N × (activation size
            of the parameterized layers); ``None`` picks the largest chunk whose output
            gradients fit in ``memory_budget_mb``.
        memory_budget_mb: the budget for the output gradients of one pass: it sets the chunk
            when ``max_batch`` is ``None``, and when a chunk's labels do not fit (many
            classes, large images) they are taken in blocks, each a pass of its own.
        traced: use the label-folded backward of ``traced_backward`` when the model's
            ``torch.fx`` graph is made of layers it knows (faster; same values); otherwise,
            or with ``False``, autograd under vmap.
        squeeze: also run the model on the squeezed views of the batch
            (``detectors.stability``), for detectors that read the stability signals.

    Works on whatever device the model is on, and also when called inside ``torch.no_grad()``
    or ``torch.inference_mode()``. One instance serves one thread at a time (it registers
    hooks on the model, or reuses buffers between passes); use one per thread.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        labels: LabelMode = "onehot",
        max_batch: int | None = None,
        memory_budget_mb: float = 256.0,
        traced: bool = True,
        squeeze: bool = False,
    ) -> None:
        if labels not in ("onehot", "confounding"):
            raise ValueError(f"labels must be 'onehot' or 'confounding', got {labels!r}")
        self.model = model
        self.labels = labels
        self.max_batch = max_batch
        self.memory_budget_mb = memory_budget_mb
        self.squeeze = squeeze
        # Per input shape: (bytes of output gradients per label and sample, labels).
        self._chunk_for_shape: dict[tuple[int, ...], tuple[int, int]] = {}
        self._label_slice: slice | None = None  # the label block of the pass under way
        self._protect_outputs = False
        self._eye: tuple[tuple, Tensor] | None = None  # one-hot labels, made once per shape
        # The label-folded backward for traceable models (``traced_backward``): built on
        # first use, in eval mode; False when the model's graph is not supported.
        self._traced: TracedBackward | bool | None = None if traced else False
        self._layers = parameterized_layers(model)
        if not self._layers:
            raise ValueError("the model has no trainable parameters to take gradients of")
        self._norm_fns: list[LayerNormFn] = [norm_fn_for(m) for _, m in self._layers]

    @property
    def layer_names(self) -> list[str]:
        """Names of the L feature columns, as prefixes of ``named_parameters()``."""
        return [name for name, _ in self._layers]

    def compute(self, x: Tensor) -> Tensor:
        """Features of shape (B, N, L) (or (B, 1, L) for ``labels="confounding"``), float32."""
        return self.signals(x).features

    __call__ = compute

    def signals(self, x: Tensor) -> GradientSignals:
        """Features plus what the same forward pass gives for free (logits and embeddings)
        and, with ``squeeze``, the logits of the squeezed views (their own forward)."""
        if x.dim() < 2 or x.shape[0] == 0:
            raise ValueError(f"expected a non-empty batch (B, ...), got shape {tuple(x.shape)}")
        device = _model_device(self.model)
        timings = {"forward": 0.0, "gradients": 0.0}
        with torch.inference_mode(False), torch.enable_grad(), _eval_mode(self.model):
            # A copy: inference tensors cannot be saved for backward, and a model that
            # edits its input in place must not touch the caller's tensor.
            x = x.detach().clone().to(device=device, dtype=torch.float32)
            # First: a model that edits its input in place must not change what is squeezed.
            squeezed = self._squeezed_logits(x, timings) if self.squeeze else None
            step, block, n_labels = self._plan(x)
            parts = [
                self._compute_blocks(x[i : i + step], timings, block, n_labels)
                for i in range(0, x.shape[0], step)
            ]
        if len(parts) == 1:
            features, logits, embeddings = parts[0]
        else:
            features, logits, embeddings = (torch.cat(p) for p in zip(*parts, strict=True))
        return GradientSignals(features.float().contiguous(), logits, embeddings, timings, squeezed)

    def _squeezed_logits(self, x: Tensor, timings: dict[str, float]) -> Tensor:
        # No gradients are held for these passes, so their chunk is their own, not the
        # gradient pass's (which can be one image when the labels go in blocks).
        chunk = _SQUEEZE_CHUNK
        start = time.perf_counter()
        squeezed = torch.cat(
            [
                stability.squeezed_logits(self.model, x[i : i + chunk]).detach()
                for i in range(0, x.shape[0], chunk)
            ]
        )
        if squeezed.is_cuda:
            torch.cuda.synchronize(squeezed.device)  # so the stage's time is its own
        timings["squeeze"] = (time.perf_counter() - start) * 1000
        return squeezed

    def _forward(self, x: Tensor) -> tuple[Tensor, list[_Capture]]:
        """Forward with every layer's input and output recorded, intact for the backward."""
        while True:
            captures = [_Capture() for _ in self._layers]
            handles = [
                module.register_forward_hook(_recorder(capture, self._protect_outputs))
                for (_, module), capture in zip(self._layers, captures, strict=True)
            ]
            try:
                # x itself needs no gradient: the layer outputs require grad through their
                # own parameters.
                logits = self.model(x)
            finally:
                for handle in handles:
                    handle.remove()
            if self._protect_outputs or all(
                c.output is None or c.output._version == c.version for c in captures
            ):
                return logits, captures
            # Some output was overwritten in place: copies are needed for this model.
            self._protect_outputs = True

    @property
    def uses_traced_backward(self) -> bool:
        """Whether passes run the label-folded backward (decided by the first pass)."""
        return isinstance(self._traced, TracedBackward)

    def _compute_chunk(self, x: Tensor, timings: dict[str, float]) -> tuple[Tensor, Tensor, Tensor]:
        if self._traced is None:
            self._traced = TracedBackward.build(self.model, self.layer_names) or False
        if isinstance(self._traced, TracedBackward):
            try:
                return self._compute_chunk_traced(self._traced, x, timings)
            except Unsupported:
                self._traced = False  # this input met a case it has no rule for
        return self._compute_chunk_autograd(x, timings)

    def _compute_chunk_traced(
        self, traced: TracedBackward, x: Tensor, timings: dict[str, float]
    ) -> tuple[Tensor, Tensor, Tensor]:
        start = time.perf_counter()
        result = traced.run(x, self._cotangents)
        columns = [
            pooled_conv2d_sq_norms(module, inputs, delta.grad, delta.indices)
            if isinstance(delta, PooledDelta)
            else fn(module, inputs, delta)
            for fn, (_, module), inputs, delta in zip(
                self._norm_fns, self._layers, result.layer_inputs, result.deltas, strict=True
            )
        ]
        features = torch.stack(columns, dim=-1).transpose(0, 1)  # (N, B, L) -> (B, N, L)
        timings["forward"] += result.forward_ms
        timings["gradients"] += (time.perf_counter() - start) * 1000 - result.forward_ms
        embeddings = result.layer_inputs[-1][0].flatten(1)
        return features, result.logits, embeddings

    def _compute_chunk_autograd(
        self, x: Tensor, timings: dict[str, float]
    ) -> tuple[Tensor, Tensor, Tensor]:
        start = time.perf_counter()
        logits, captures = self._forward(x)
        for (name, _), capture in zip(self._layers, captures, strict=True):
            if capture.calls != 1:
                raise NotImplementedError(
                    f"layer {name!r} ran {capture.calls} times in one forward; layers that are "
                    "skipped or reused (weight sharing) are not supported"
                )
        middle = time.perf_counter()
        timings["forward"] += (middle - start) * 1000
        cotangents = self._cotangents(logits.detach())
        # One vectorized backward for all labels, to the layer outputs only. (Replicating the
        # batch once per label and running a plain backward was measured 1.5-2x slower.)
        deltas = torch.autograd.grad(
            logits,
            [capture.output for capture in captures],
            grad_outputs=cotangents,
            is_grads_batched=True,
            allow_unused=True,
        )
        columns = []
        for fn, (_, module), capture, delta in zip(
            self._norm_fns, self._layers, captures, deltas, strict=True
        ):
            if delta is None:  # the layer does not reach the logits
                columns.append(cotangents.new_zeros(cotangents.shape[:2]))
                continue
            with torch.no_grad():
                columns.append(fn(module, capture.inputs, delta.detach()))
        features = torch.stack(columns, dim=-1).transpose(0, 1)  # (N, B, L) -> (B, N, L)
        timings["gradients"] += (time.perf_counter() - middle) * 1000
        # The last layer's input is the penultimate representation the peers (KNN,
        # Mahalanobis, ViM) work in.
        embeddings = captures[-1].inputs[0].flatten(1)
        return features, logits.detach(), embeddings

    def _plan(self, x: Tensor) -> tuple[int, int, int]:
        """(samples per chunk, labels per block, labels) so that the output gradients of
        every layer fit the memory budget. Samples are chunked first; when one sample's
        labels alone do not fit (a thousand classes at 224 px), the labels go in blocks too,
        each block a pass of its own (exact: the labels' gradients are independent)."""
        shape = tuple(x.shape[1:])
        if shape not in self._chunk_for_shape:
            sizes: list[int] = []
            handles = [
                module.register_forward_hook(lambda _m, _i, out: sizes.append(out[0].numel()))
                for _, module in self._layers
            ]
            try:
                with torch.no_grad():
                    n_classes = self.model(x[:1]).shape[-1]
            finally:
                for handle in handles:
                    handle.remove()
            n_labels = 1 if self.labels == "confounding" else n_classes
            # Output gradients of every layer, plus as much again for the backward's own
            # intermediates, per label and sample, in float32.
            self._chunk_for_shape[shape] = (2 * 4 * sum(sizes), n_labels)
        per_label_sample, n_labels = self._chunk_for_shape[shape]
        budget = self.memory_budget_mb * 2**20
        step = self.max_batch or max(1, int(budget // (per_label_sample * n_labels)))
        block = max(1, min(n_labels, int(budget // (per_label_sample * step))))
        return step, block, n_labels

    def _compute_blocks(
        self, x: Tensor, timings: dict[str, float], block: int, n_labels: int
    ) -> tuple[Tensor, Tensor, Tensor]:
        if block >= n_labels:
            return self._compute_chunk(x, timings)
        parts = []
        try:
            for start in range(0, n_labels, block):
                self._label_slice = slice(start, start + block)
                parts.append(self._compute_chunk(x, timings))
        finally:
            self._label_slice = None
        _, logits, embeddings = parts[0]
        return torch.cat([p[0] for p in parts], dim=1), logits, embeddings

    def _cotangents(self, logits: Tensor) -> Tensor:
        """∂J/∂z per label, shape (labels, B, N): softmax − onehot, or N·softmax − 1."""
        probs = torch.softmax(logits, dim=-1)
        n_classes = logits.shape[-1]
        if self.labels == "confounding":
            return (n_classes * probs - 1.0).unsqueeze(0)
        key = (n_classes, probs.dtype, probs.device)
        if self._eye is None or self._eye[0] != key:
            self._eye = (key, torch.eye(n_classes, dtype=probs.dtype, device=probs.device))
        eye = self._eye[1] if self._label_slice is None else self._eye[1][self._label_slice]
        return probs.unsqueeze(0) - eye.unsqueeze(1)


def _recorder(
    capture: _Capture, protect: bool
) -> Callable[[nn.Module, tuple[Tensor, ...], Tensor], Tensor | None]:
    def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor | None:
        capture.calls += 1
        capture.inputs = tuple(t.detach() for t in inputs)
        capture.output = output
        capture.version = output._version
        # When a later op modifies this output in place (ReLU(inplace=True) after BatchNorm),
        # the rest of the network gets a copy instead, so the captured tensor stays intact.
        return output.clone() if protect else None

    return hook


def _model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    # Only modules in training mode are switched (and switched back): a model served for
    # inference is already in eval mode, and then nothing is touched.
    training = [module for module in model.modules() if module.training]
    if training:
        model.eval()
    try:
        yield
    finally:
        for module in training:
            module.training = True
