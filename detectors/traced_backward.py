"""A faster backward for classifiers made of common layers: the labels folded into the batch.

The engine's general path pushes the N label cotangents back through autograd under vmap
(``is_grads_batched``). That vmap has no batching rule for the convolution and max-pool
backward kernels, so it loops over the labels for them, and at small batches every op also
pays autograd's and vmap's bookkeeping. When the classifier's forward traces (``torch.fx``)
to a graph of the ops below, this module runs that forward itself, keeping what each op's
backward needs, and then the backward by hand with every gradient shaped (labels, batch, ...):
one kernel call per op for all labels. The formulas are autograd's, so the values agree to
float rounding; any other graph is refused at build time (or, for conditions only the data
shows, at run time with ``Unsupported``) and the engine keeps its general path.

Three choices keep the largest tensors (the first convolution's output gradients, one per
label) from being formed or copied: a ReLU followed by max pooling is differentiated in one step,
masking at the pooled resolution (``max(relu(z)) = relu(max(z))``, so the masks agree); the
first convolution's norms are computed from its pooled gradients (``PooledDelta``) when nothing
before it needs a gradient; and max pooling's gradients are written channels-last into a reused
buffer, the layout the next convolution's input gradient runs fastest in.

Supported: Conv2d (zero padding), Linear, eval-mode BatchNorm, ReLU, max pooling, global
average pooling, flatten/view/reshape, dropout (eval), identity, and + − × ÷ where at most
one side depends on the layers (sums of two such branches, as in residual blocks, too), and
concatenation along a feature dimension.
"""

from __future__ import annotations

import math
import operator
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn


class Unsupported(Exception):
    """The graph (or this input) uses something this backward has no rule for."""


_ARITHMETIC = {
    operator.add: "add",
    operator.iadd: "add",
    torch.add: "add",
    operator.sub: "sub",
    torch.sub: "sub",
    operator.mul: "mul",
    torch.mul: "mul",
    operator.truediv: "div",
    torch.div: "div",
}


@dataclass
class PooledDelta:
    """A convolution's output gradients when a ReLU and a max pooling follow it alone: the
    pooled gradients (labels, B, C, Q), already masked by the ReLU, and the position in the
    H×W output each pooled cell took its maximum from (B, C, Q). The full gradient is zero
    elsewhere, so the layer's norms can be computed from the Q pooled cells alone
    (``layer_norms.pooled_conv2d_sq_norms``), never forming the (labels, B, C, H, W) tensor."""

    grad: Tensor
    indices: Tensor


@dataclass
class TracedPass:
    """One pass's results: logits (B, N), each layer's inputs (batch B), the gradient of every
    label's loss with respect to each layer's output, (labels, B, ...), and the forward's
    wall time."""

    logits: Tensor
    layer_inputs: list[tuple[Tensor, ...]]
    deltas: list[Tensor | PooledDelta]
    forward_ms: float


class TracedBackward:
    """The forward and the label-batched backward of one traced classifier.

    Build with ``TracedBackward.build``, which returns None for graphs it does not support.
    """

    def __init__(
        self, model: nn.Module, graph: fx.Graph, kinds: dict[fx.Node, str], layer_names: list[str]
    ) -> None:
        self.model = model
        self.nodes = [n for n in graph.nodes if n.op != "output"]
        self.output = next(n for n in graph.nodes if n.op == "output").args[0]
        self.kinds = kinds
        self.modules = dict(model.named_modules())
        self._layer_index = {name: i for i, name in enumerate(layer_names)}
        self._active = _active_nodes(self.nodes, kinds, set(layer_names))
        self._workspaces = {n: _Workspace() for n in self.nodes if kinds[n] == "maxpool"}

    @classmethod
    def build(cls, model: nn.Module, layer_names: list[str]) -> TracedBackward | None:
        """Trace ``model`` (in eval mode) and classify every node; None when unsupported."""
        try:
            graph = fx.Tracer().trace(model)
        except Exception:  # any model fx cannot trace keeps the general path
            return None
        modules = dict(model.named_modules())
        nodes = list(graph.nodes)
        if sum(n.op == "placeholder" for n in nodes) != 1:
            return None
        if any(m._forward_hooks or m._forward_pre_hooks for m in modules.values()):
            return None  # hooks may change values behind the backward's rules
        if not isinstance(nodes[-1].args[0], fx.Node):
            return None  # the model must return one tensor
        called = [n.target for n in nodes if n.op == "call_module"]
        if sorted(t for t in called if t in layer_names) != sorted(layer_names):
            return None  # a layer skipped, reused, or reached some other way
        try:
            kinds = {n: _classify(n, modules) for n in nodes if n.op != "output"}
        except Unsupported:
            return None
        layers = [n for n in nodes if n.op == "call_module" and n.target in layer_names]
        if any(kinds[n] not in ("conv", "linear", "batchnorm") for n in layers):
            return None  # a parameterized layer without a rule here
        return cls(model, graph, kinds, layer_names)

    def run(self, x: Tensor, cotangents: Callable[[Tensor], Tensor]) -> TracedPass:
        """Forward on ``x`` (B, ...), then backward of ``cotangents(logits)`` (labels, B, N).

        Raises ``Unsupported`` when this input meets a case the rules do not cover.
        """
        values: dict[fx.Node, Any] = {}
        saved: dict[fx.Node, Any] = {}
        layer_inputs: list[tuple[Tensor, ...]] = [()] * len(self._layer_index)
        start = time.perf_counter()
        with torch.no_grad():
            for node in self.nodes:
                values[node] = self._forward(node, values, saved, layer_inputs, x)
            logits = values[self.output]
            forward_ms = (time.perf_counter() - start) * 1000
            grads: dict[fx.Node, Tensor] = {self.output: cotangents(logits)}
            pooled: dict[fx.Node, PooledDelta] = {}
            deltas: list[Tensor | PooledDelta | None] = [None] * len(self._layer_index)
            for node in reversed(self.nodes):
                grad = grads.pop(node, None)
                if node in pooled:
                    deltas[self._layer_index[node.target]] = pooled[node]
                elif (
                    grad is not None
                    and node.op == "call_module"
                    and node.target in self._layer_index
                ):
                    deltas[self._layer_index[node.target]] = grad
                if grad is not None:
                    self._backward(node, grad, values, saved, grads, pooled)
        if any(delta is None for delta in deltas):
            raise Unsupported("a layer does not reach the logits")
        return TracedPass(logits, layer_inputs, deltas, forward_ms)  # type: ignore[arg-type]

    # -- forward

    def _forward(
        self,
        node: fx.Node,
        values: dict[fx.Node, Any],
        saved: dict[fx.Node, Any],
        layer_inputs: list[tuple[Tensor, ...]],
        x: Tensor,
    ) -> Any:
        kind = self.kinds[node]
        if kind == "input":
            return x
        if kind == "const":
            return operator.attrgetter(node.target)(self.model)
        args = fx.node.map_arg(node.args, lambda n: values[n])
        kwargs = fx.node.map_arg(node.kwargs, lambda n: values[n])
        if kind in ("conv", "linear", "batchnorm"):
            if node.target in self._layer_index:
                layer_inputs[self._layer_index[node.target]] = (args[0],)
            module = self.modules[node.target]
            if kind == "conv":  # the functional call skips Module.__call__'s bookkeeping
                return F.conv2d(
                    args[0],
                    module.weight,
                    module.bias,
                    module.stride,
                    module.padding,
                    module.dilation,
                    module.groups,
                )
            if kind == "linear":
                return F.linear(args[0], module.weight, module.bias)
            return module(args[0])
        if kind == "relu":
            out = F.relu(args[0])
            saved[node] = out
            return out
        if kind == "maxpool":
            source = args[0]
            channels_last = source.device.type == "cpu" and source.dim() == 4
            if channels_last:
                # CPU kernels vectorize max pooling over channels only when they are
                # innermost: the copy there and back costs a fifth of what it saves (2.2 ms
                # vs 0.4 ms on 32×16×28×28). Same values and indices.
                source = source.contiguous(memory_format=torch.channels_last)
            out, indices = F.max_pool2d(
                source, **self._pool_options(node, args, kwargs), return_indices=True
            )
            if channels_last:  # what follows may view() it
                out, indices = out.contiguous(), indices.contiguous()
            saved[node] = (indices, args[0].shape, out)
            return out
        if kind == "identity":
            return args[0]
        if kind == "cat":
            tensors = args[0]
            dim = (args[1] if len(args) > 1 else kwargs.get("dim", 0)) % tensors[0].dim()
            if dim == 0:
                raise Unsupported("concatenation along the batch")
            saved[node] = (dim, [t.shape[dim] for t in tensors])
            return torch.cat(tensors, dim)
        if kind == "arith":
            saved[node] = args
            # In-place += would overwrite a value another op may have kept.
            target = operator.add if node.target is operator.iadd else node.target
            return target(*args)
        if kind in ("gpool", "reshape"):
            saved[node] = args[0].shape
        # gpool, reshape and int: the original call.
        if node.op == "call_module":
            return self.modules[node.target](*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        return node.target(*args, **kwargs)

    def _pool_options(self, node: fx.Node, args: tuple, kwargs: dict) -> dict[str, Any]:
        if node.op == "call_module":
            pool = self.modules[node.target]
            return {
                "kernel_size": pool.kernel_size,
                "stride": pool.stride,
                "padding": pool.padding,
                "dilation": pool.dilation,
                "ceil_mode": pool.ceil_mode,
            }
        names = ("kernel_size", "stride", "padding", "dilation", "ceil_mode")
        options = dict(zip(names, args[1:], strict=False))
        options.update({k: v for k, v in kwargs.items() if k in names})
        return options

    # -- backward

    def _backward(
        self,
        node: fx.Node,
        grad: Tensor,
        values: dict[fx.Node, Any],
        saved: dict[fx.Node, Any],
        grads: dict[fx.Node, Tensor],
        pooled: dict[fx.Node, PooledDelta],
    ) -> None:
        """Add the gradients (labels, B, ...) of this node's active inputs into ``grads``
        (and, for a convolution followed by ReLU and max pooling alone, its ``PooledDelta``
        into ``pooled``)."""
        kind = self.kinds[node]
        if kind == "arith":
            self._arithmetic_grad(node, grad, saved[node], grads)
            return
        if kind == "cat":
            dim, sizes = saved[node]
            for part_node, part in zip(node.args[0], grad.split(sizes, dim + 1), strict=True):
                if isinstance(part_node, fx.Node) and part_node in self._active:
                    _accumulate(grads, part_node, part)
            return
        source = node.args[0] if node.args else None
        if not isinstance(source, fx.Node) or source not in self._active:
            return  # e.g. the first layer: nothing before it needs a gradient
        if kind == "conv":
            part = _conv_input_grad(grad, values[source].shape, self.modules[node.target])
        elif kind == "linear":
            weight = self.modules[node.target].weight
            part = torch.mm(grad.reshape(-1, weight.shape[0]), weight).view(
                *grad.shape[:-1], weight.shape[1]
            )
        elif kind == "batchnorm":
            norm = self.modules[node.target]
            scale = torch.rsqrt(norm.running_var + norm.eps)
            if norm.weight is not None:
                scale = scale * norm.weight
            part = grad * scale.view(-1, *[1] * (values[source].dim() - 2))
        elif kind == "relu":
            part = grad * (saved[node] > 0).to(grad.dtype)
        elif kind == "maxpool":
            indices, input_shape, pooled_out = saved[node]
            if self.kinds[source] == "relu" and len(source.users) == 1:
                # relu then max pool: mask where the pooled value is positive, then route;
                # the relu's own full-resolution pass is skipped.
                mask = (pooled_out > 0).to(grad.dtype)
                source = source.args[0]
                if not isinstance(source, fx.Node) or source not in self._active:
                    return
                # At batch 1 the gather's fixed costs exceed forming the small full gradient
                # (1.95 vs 1.85 ms per pass on the default model); from batch 2 on it wins.
                if grad.shape[1] > 1 and grad.dim() == 5 and self._pooled_form(source):
                    n_labels, batch, channels, height, width = grad.shape
                    # Masked straight into (B, C, labels, Q) memory, the order the pooled
                    # norms multiply in, whatever layout the incoming gradient has.
                    masked = grad.new_empty(batch, channels, n_labels, height * width)
                    masked = masked.permute(2, 0, 1, 3)
                    torch.mul(grad, mask, out=masked.unflatten(-1, (height, width)))
                    pooled[source] = PooledDelta(masked, indices.reshape(batch, channels, -1))
                    return  # the full-resolution gradient is never formed
                grad = grad * mask
            part = _max_pool_grad(grad, indices, input_shape, self._workspaces[node])
        elif kind == "gpool":
            part = _global_pool_grad(grad, saved[node])
        elif kind == "reshape":
            part = grad.reshape(grad.shape[0], *saved[node])
        elif kind == "identity":
            part = grad
        else:
            raise Unsupported(f"no gradient rule for {node.format_node()}")
        _accumulate(grads, source, part)

    def _pooled_form(self, node: fx.Node) -> bool:
        """Whether this convolution layer's norms come from its pooled gradients: only a ReLU
        (then max pooling) reads its output, and nothing before it needs a gradient (the
        first layer), so the full (labels, B, C, H, W) gradient is never needed. Where it is
        needed anyway, the dense product over it is cheaper than gathering U's columns,
        which a CPU does an order of magnitude slower per element than a multiply-add."""
        source = node.args[0]
        return (
            self.kinds[node] == "conv"
            and node.target in self._layer_index
            and self.modules[node.target].groups == 1
            and len(node.users) == 1
            and not (isinstance(source, fx.Node) and source in self._active)
        )

    def _arithmetic_grad(
        self, node: fx.Node, grad: Tensor, args: tuple, grads: dict[fx.Node, Tensor]
    ) -> None:
        kind = _ARITHMETIC[node.target]
        a_node, b_node = node.args[0], node.args[1]
        a_active = isinstance(a_node, fx.Node) and a_node in self._active
        b_active = isinstance(b_node, fx.Node) and b_node in self._active
        if kind in ("mul", "div") and a_active and b_active:
            raise Unsupported("product of two layer-dependent tensors")
        a, b = args
        for side, active, value, other in ((a_node, a_active, a, b), (b_node, b_active, b, a)):
            if not active:
                continue
            if value.shape != grad.shape[1:]:
                raise Unsupported("broadcasting a layer-dependent tensor")
            if kind == "add":
                part = grad
            elif kind == "sub":
                part = grad if side is a_node else -grad
            elif kind == "mul":
                part = grad * other
            elif side is a_node:  # a / b, with b independent of the layers
                part = grad / other
            else:
                raise Unsupported("division by a layer-dependent tensor")
            _accumulate(grads, side, part)


def _classify(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    """What a node does, for the forward and backward rules; ``Unsupported`` if unknown."""
    if node.op == "placeholder":
        return "input"
    if node.op == "get_attr":
        return "const"
    target = node.target
    if node.op == "call_module":
        module = modules[target]
        if isinstance(module, nn.Conv2d):
            if module.padding_mode != "zeros" or isinstance(module.padding, str):
                raise Unsupported("conv padding")
            return "conv"
        if isinstance(module, nn.Linear):
            return "linear"
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            if not module.track_running_stats or module.running_var is None:
                raise Unsupported("batch norm without running statistics")
            return "batchnorm"
        if isinstance(module, nn.ReLU):
            return "relu"
        if isinstance(module, nn.MaxPool2d):
            if module.return_indices:
                raise Unsupported("max pool returning indices")
            return "maxpool"
        if isinstance(module, nn.AdaptiveAvgPool2d):
            if module.output_size not in (1, (1, 1)):
                raise Unsupported("adaptive pooling to more than one cell")
            return "gpool"
        if isinstance(module, nn.Flatten):
            return "reshape"
        if isinstance(module, nn.Identity | nn.Dropout | nn.Dropout2d):
            return "identity"
        raise Unsupported(f"module {type(module).__name__}")
    if node.op == "call_function":
        if target in (F.relu, torch.relu):
            return "relu"
        if target in (F.max_pool2d, torch.max_pool2d):
            if node.kwargs.get("return_indices") or (len(node.args) > 6 and node.args[6]):
                raise Unsupported("max pool returning indices")
            return "maxpool"
        if target is F.adaptive_avg_pool2d:
            size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
            if size not in (1, (1, 1)):
                raise Unsupported("adaptive pooling to more than one cell")
            return "gpool"
        if target is torch.flatten:
            return "reshape"
        if target is torch.cat:
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            if not isinstance(dim, int) or not isinstance(node.args[0], list | tuple):
                raise Unsupported("concatenation with a computed dimension")
            return "cat"
        if target is F.dropout:
            training = node.args[2] if len(node.args) > 2 else node.kwargs.get("training", True)
            if training is not False:
                raise Unsupported("dropout in training mode")
            return "identity"
        if target in _ARITHMETIC:
            if node.kwargs or len(node.args) != 2:
                raise Unsupported(f"{target} with extra arguments")
            return "arith"
        raise Unsupported(f"function {target}")
    if node.op == "call_method":
        if target == "relu":
            return "relu"
        if target in ("flatten", "view", "reshape"):
            return "reshape"
        if target == "contiguous":
            return "identity"
        if target in ("size", "dim"):
            return "int"
        if target == "mean" and _is_global_mean(node):
            return "gpool"
        raise Unsupported(f"method {target}")
    raise Unsupported(f"node kind {node.op}")


def _is_global_mean(node: fx.Node) -> bool:
    """``x.mean((2, 3))`` (any order, negative dims, keepdim or not) on a 4-d map."""
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    if isinstance(dims, int):
        dims = (dims,)
    if not isinstance(dims, tuple | list) or not isinstance(keepdim, bool):
        return False
    return sorted(d % 4 for d in dims) == [2, 3] and all(d in (2, 3, -1, -2) for d in dims)


def _active_nodes(
    nodes: list[fx.Node], kinds: dict[fx.Node, str], layer_names: set[str]
) -> set[fx.Node]:
    """Nodes whose value depends on some layer's output (or is a layer's output)."""
    active: set[fx.Node] = set()
    for node in nodes:
        if kinds[node] == "int":
            continue  # integers: no gradient flows through them
        is_layer = node.op == "call_module" and node.target in layer_names
        if is_layer or any(n in active for n in node.all_input_nodes):
            active.add(node)
    return active


def _accumulate(grads: dict[fx.Node, Tensor], node: fx.Node, grad: Tensor) -> None:
    grads[node] = grads[node] + grad if node in grads else grad


def _conv_input_grad(grad: Tensor, input_shape: torch.Size, conv: nn.Conv2d) -> Tensor:
    """∂/∂input of a convolution for every label: one kernel call, labels folded into the
    batch. A channels-last gradient (max pooling's) is convolved channels-last."""
    n_labels = grad.shape[0]
    folded = grad.flatten(0, 1)  # a view for both layouts the backward produces
    channels_last = not folded.is_contiguous() and folded.is_contiguous(
        memory_format=torch.channels_last
    )
    (kh, kw), (dh, dw), (ph, pw) = conv.kernel_size, conv.dilation, conv.padding
    if conv.stride == (1, 1) and ph <= dh * (kh - 1) and pw <= dw * (kw - 1):
        # Stride 1: the input gradient is a plain convolution with the kernel flipped and
        # its in/out channels swapped, which CPU backends run about twice as fast as their
        # backward-data kernel.
        groups = conv.groups
        weight = conv.weight.flip(-1, -2)
        c_out, c_in_group = weight.shape[:2]
        weight = (
            weight.view(groups, c_out // groups, c_in_group, kh, kw)
            .transpose(1, 2)
            .reshape(groups * c_in_group, c_out // groups, kh, kw)
        )
        if channels_last:
            weight = weight.contiguous(memory_format=torch.channels_last)
        out = F.conv2d(
            folded,
            weight,
            padding=(dh * (kh - 1) - ph, dw * (kw - 1) - pw),
            dilation=conv.dilation,
            groups=groups,
        )
    else:
        out = torch.nn.grad.conv2d_input(
            (folded.shape[0], *input_shape[1:]),
            conv.weight,
            folded,
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.groups,
        )
    return out.unflatten(0, (n_labels, input_shape[0]))


def _max_pool_grad(
    grad: Tensor, indices: Tensor, input_shape: torch.Size, workspace: _Workspace
) -> Tensor:
    """Each pooled cell's gradient goes to the input position its maximum came from.

    Written channels-last per (label, sample), memory (labels, B, H, W, C): folding labels
    into the batch then gives the channels-last layout the next convolution's input gradient
    runs fastest in (about 1.6x NCHW on CPU), and the per-sample norms read it as one matrix
    per sample after a single copy.
    """
    n_labels = grad.shape[0]
    batch, channels, height, width = input_shape
    out = workspace.zeros(grad, (n_labels, batch, height * width, channels)).transpose(2, 3)
    index = indices.reshape(1, batch, channels, -1).expand(n_labels, -1, -1, -1)
    out.scatter_add_(-1, index, grad.reshape(n_labels, batch, channels, -1))
    return out.unflatten(-1, (height, width))


class _Workspace:
    """A zeroed buffer reused from call to call, grown to the largest pass seen.

    Max pooling's input gradients are the largest tensors of the pass (labels × the first
    convolution's output). Freshly allocated each call, their pages are faulted in again every
    time (glibc returns big freed blocks to the system): zeroing a reused buffer is several
    times faster. The buffer is only read within the pass that wrote it.
    """

    def __init__(self) -> None:
        self._buffer: Tensor | None = None

    def zeros(self, like: Tensor, shape: tuple[int, ...]) -> Tensor:
        numel = math.prod(shape)
        buffer = self._buffer
        if (
            buffer is None
            or buffer.numel() < numel
            or buffer.dtype != like.dtype
            or buffer.device != like.device
        ):
            buffer = self._buffer = like.new_empty(numel)
        return buffer[:numel].view(shape).zero_()


def _global_pool_grad(grad: Tensor, input_shape: torch.Size) -> Tensor:
    if len(input_shape) != 4:
        raise Unsupported("global pooling of a tensor that is not (B, C, H, W)")
    cells = input_shape[2] * input_shape[3]
    grad = grad.reshape(grad.shape[0], *input_shape[:2], 1, 1) / cells
    return grad.expand(grad.shape[0], *input_shape)
