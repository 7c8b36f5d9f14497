"""Core: a user's classifier file as an eager module the gradient engine can work on.

Users hold TorchScript files (``torch.jit.save``) and ``torch.export`` programs (``.pt2``).
Neither offers per-layer hooks, which the engine needs to read each layer's input and output
gradient. Both are brought to one form — an ATen-level ``ExportedProgram`` (TorchScript through
torch's own converter) — and then *lifted*: every convolution, linear and batch-norm op whose
weights are parameters becomes a real ``nn.Conv2d`` / ``nn.Linear`` / ``nn.BatchNorm*d`` at the
module path its parameters were named under (``layer1.0.conv1.weight`` → ``layer1.0.conv1``),
so the engine's closed-form norms and its label-folded backward apply. An op with parameters of
another kind (layer norm, PReLU, ...) becomes an ``OpLayer`` that runs the op itself; the engine
takes its exact per-sample fallback there. Parameter-free ops are kept, the common ones as the
functional calls the traced backward knows. Nothing is approximated: ``load_classifier``
cross-checks the lifted module against the original program on a probe batch.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from detectors.spec import ArtifactError

aten = torch.ops.aten

# Parameter-free ATen ops rewritten as the functional calls that traced_backward recognizes.
_FUNCTIONAL: dict[Any, Callable[..., Any]] = {
    aten.relu.default: torch.relu,
    aten.max_pool2d.default: F.max_pool2d,
    aten.adaptive_avg_pool2d.default: F.adaptive_avg_pool2d,
    aten.flatten.using_ints: torch.flatten,
    aten.cat.default: torch.cat,
    aten.add.Tensor: operator.add,
    aten.sub.Tensor: operator.sub,
    aten.mul.Tensor: operator.mul,
    aten.div.Tensor: operator.truediv,
}
_METHODS = {
    aten.view.default: "view",
    aten.reshape.default: "reshape",
    aten._unsafe_view.default: "reshape",
    aten.mean.dim: "mean",
    aten.sym_size.int: "size",
}
_IDENTITY = {aten.clone.default, aten.detach.default, aten.alias.default}


def load_program(
    path: Path, fmt: str, input_shape: tuple[int, ...]
) -> tuple[torch.export.ExportedProgram, set[str], nn.Module]:
    """The file as an ExportedProgram, the names of its trainable parameters, and the file's
    own callable (to check the lifted module against).

    ``input_shape`` (C, H, W) is needed to convert TorchScript, which does not record it.
    """
    if fmt == "torch.export":
        try:
            program = torch.export.load(str(path))
        except Exception as exc:
            raise ArtifactError(f"{path} is not a readable torch.export program: {exc}") from exc
        _require_dynamic_batch(program, path)
        names = set(program.graph_signature.inputs_to_parameters.values())
        return program, names, program.module()
    if fmt == "torchscript":
        try:
            script = torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:
            raise ArtifactError(f"{path} is not a readable TorchScript file: {exc}") from exc
        names = {n for n, _ in script.named_parameters()}
        return torchscript_to_program(script, input_shape), names, script
    raise ArtifactError(f"unknown classifier format {fmt!r}")


def _require_dynamic_batch(program: torch.export.ExportedProgram, path: Path) -> None:
    """A program exported for one batch size only cannot take GradProbe's batches."""
    inputs = set(program.graph_signature.user_inputs)
    for node in program.graph_module.graph.nodes:
        value = node.meta.get("val") if node.op == "placeholder" and node.name in inputs else None
        if isinstance(value, Tensor) and value.dim() and isinstance(value.shape[0], int):
            raise ArtifactError(
                f"{path} was exported for batches of exactly {value.shape[0]}; export it with a "
                "dynamic batch: torch.export.export(model, (x,), dynamic_shapes=({0: "
                'torch.export.Dim("batch")},))'
            )


def torchscript_to_program(
    script: torch.jit.ScriptModule, input_shape: tuple[int, ...]
) -> torch.export.ExportedProgram:
    """TorchScript as an ATen-level ExportedProgram, through torch's own converter (which
    needs an example batch of the model's input shape)."""
    import warnings

    from torch._export.converter import TS2EPConverter

    script = script.eval()
    example = (torch.rand(2, *input_shape),)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return TS2EPConverter(script, example).convert()
    except Exception as exc:
        raise ArtifactError(
            f"the TorchScript model could not be converted for gradient analysis ({exc}); "
            "export it with torch.export (.pt2) instead"
        ) from exc


class OpLayer(nn.Module):
    """One ATen op that owns parameters of a kind without a closed-form norm (layer norm,
    PReLU, embedding, ...): its activations come in as arguments, its parameters and
    constants are held here. The engine differentiates it with its exact per-sample VJP."""

    def __init__(
        self,
        op: Any,
        template: list[Any],
        slots: list[int],
        params: dict[int, str],
        kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.op = op
        self.kwargs = kwargs or {}  # constant keyword arguments of the op
        self.template = template  # the op's arguments, None where filled at call time
        self.slots = slots  # argument positions of the activations, in call order
        self.param_slots = params  # argument position → parameter name

    def forward(self, *activations: Tensor) -> Tensor:
        args = list(self.template)
        for slot, value in zip(self.slots, activations, strict=True):
            args[slot] = value
        for slot, name in self.param_slots.items():
            args[slot] = getattr(self, name)
        return self.op(*args, **self.kwargs)


@dataclass(frozen=True)
class _Transposed:
    """A weight's transpose, folded into the linear layer that multiplies by it."""

    fqn: str


class _Lifter:
    def __init__(
        self,
        program: torch.export.ExportedProgram,
        parameters: set[str],
        mean: tuple[float, ...] | None,
        std: tuple[float, ...] | None,
    ) -> None:
        self.program = program
        self.normalization = (mean, std) if mean is not None and std is not None else None
        self.parameters = parameters
        signature = program.graph_signature
        self.fqn = {
            **signature.inputs_to_parameters,
            **signature.inputs_to_buffers,
            **signature.inputs_to_lifted_tensor_constants,
        }
        self.tensors = {**program.state_dict, **program.constants}
        self.user_inputs = list(signature.user_inputs)
        self.user_outputs = [str(o) for o in signature.user_outputs]
        self.root = nn.Module()
        self.graph = fx.Graph()
        self.env: dict[fx.Node, Any] = {}
        self.layer_of_param: dict[str, str] = {}  # parameter FQN → layer path that took it
        self.attr_names: dict[str, str] = {}  # buffer FQN → attribute name on the root

    # -- helpers

    def param_name(self, node: Any) -> str | None:
        """The FQN when ``node`` is a placeholder for a trainable parameter."""
        if isinstance(node, fx.Node) and node.op == "placeholder":
            name = self.fqn.get(node.name)
            if name in self.parameters:
                return name
        return None

    def tensor(self, node: Any) -> Tensor | None:
        if isinstance(node, fx.Node) and node.op == "placeholder" and node.name in self.fqn:
            return self.tensors[self.fqn[node.name]].detach()
        return None

    def claim(self, layer: str, fqns: list[str]) -> None:
        if not layer:
            raise ArtifactError(
                f"parameters {fqns} belong to no submodule: wrap them in a module "
                "(a layer is the module path its parameters are named under)"
            )
        for fqn in fqns:
            if fqn in self.layer_of_param:
                raise ArtifactError(
                    f"parameter {fqn} is used by more than one operation (weight sharing): "
                    "per-layer gradient norms need one use per layer"
                )
            self.layer_of_param[fqn] = layer

    def add_module(self, path: str, module: nn.Module) -> None:
        parent = self.root
        *parents, leaf = path.split(".")
        for part in parents:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        if hasattr(parent, leaf):
            raise ArtifactError(f"two operations claim the layer {path}")
        parent.add_module(leaf, module)

    def mapped(self, value: Any) -> Any:
        """Translate an argument: nodes to new nodes, buffers to attributes, lists deeply."""
        if isinstance(value, fx.Node):
            if value in self.env:
                return self.env[value]
            if value.op == "placeholder" and value.name in self.fqn:
                return self.get_attr(self.fqn[value.name])
            raise ArtifactError(f"unexpected reference to {value.format_node()}")
        if isinstance(value, list | tuple):
            return type(value)(self.mapped(v) for v in value)
        return value

    def get_attr(self, fqn: str) -> fx.Node:
        if fqn not in self.attr_names:
            name = "_const_" + fqn.replace(".", "_")
            self.root.register_buffer(name, self.tensors[fqn].detach().clone())
            self.attr_names[fqn] = name
        return self.graph.get_attr(self.attr_names[fqn])

    # -- the walk

    def run(self) -> fx.GraphModule:
        nodes = list(self.program.graph_module.graph.nodes)
        for node in nodes:
            if node.op == "placeholder":
                if node.name in self.user_inputs:
                    self.env[node] = self.input()
            elif node.op == "call_function":
                self.env[node] = self.call(node)
            elif node.op == "output":
                outputs = node.args[0]
                if isinstance(outputs, list | tuple):
                    # Mutated buffers come first in an ExportedProgram's outputs.
                    names = [str(getattr(o, "name", o)) for o in outputs]
                    user = outputs[names.index(self.user_outputs[0])]
                else:
                    user = outputs
                self.graph.output(self.mapped(user))
            else:
                raise ArtifactError(f"unsupported node {node.format_node()} in the program")
        if len(self.user_inputs) != 1:
            raise ArtifactError(
                f"the classifier takes {len(self.user_inputs)} inputs; expected one image batch"
            )
        unused = self.parameters - set(self.layer_of_param)
        if unused:
            raise ArtifactError(f"parameters not reached by the forward pass: {sorted(unused)}")
        module = fx.GraphModule(self.root, self.graph)
        module.eval()
        return module

    def input(self) -> fx.Node:
        x = self.graph.placeholder("x")
        if self.normalization is None:
            return x
        for name, values in zip(("input_mean", "input_std"), self.normalization, strict=True):
            tensor = torch.tensor(values, dtype=torch.float32).view(1, -1, 1, 1)
            self.root.register_buffer(name, tensor)
        mean, std = self.graph.get_attr("input_mean"), self.graph.get_attr("input_std")
        return self.graph.call_function(
            operator.truediv, (self.graph.call_function(operator.sub, (x, mean)), std)
        )

    def call(self, node: fx.Node) -> Any:
        target = node.target
        if target is operator.getitem:
            source = node.args[0]
            produced = self.env[source]
            if isinstance(produced, tuple) and produced[0] == "bn":
                if node.args[1] == 0:
                    return produced[1]
                if node.users:
                    raise ArtifactError("batch norm statistics outputs are not supported")
                return None  # an unused statistics output (decomposed programs keep them)
            return self.graph.call_function(operator.getitem, self.mapped(node.args))
        transposed = self.transposed_weight(node)
        if transposed is not None:
            return transposed
        if target in (aten.addmm.default, aten.mm.default) and any(
            isinstance(self.env.get(a), _Transposed) for a in node.args
        ):
            return self.decomposed_linear(node)
        params = [(i, self.param_name(a)) for i, a in enumerate(node.args)]
        params = [(i, p) for i, p in params if p is not None]
        if params:
            return self.layer(node, params)
        if target in _IDENTITY or (
            target is aten.dropout.default and not (len(node.args) > 2 and node.args[2])
        ):  # dropout in eval mode passes its input through
            return self.mapped(node.args[0])
        rebind = None
        name = getattr(target, "_opname", "")
        if name.endswith("_") and node.args and isinstance(node.args[0], fx.Node):
            # An in-place op on an intermediate value becomes its out-of-place twin, and later
            # readers of the mutated value read the result.
            packet = getattr(aten, name[:-1], None)
            twin = getattr(packet, target._overloadname, None) if packet else None
            if twin is not None and node.args[0].op != "placeholder":
                target, rebind = twin, node.args[0]
        if target in _FUNCTIONAL and not node.kwargs:
            args = tuple(_as_tuple(a) for a in self.mapped(node.args))
            out = self.graph.call_function(_FUNCTIONAL[target], args)
        elif target in _METHODS and not node.kwargs:
            args = self.mapped(node.args)
            out = self.graph.call_method(_METHODS[target], (args[0], *map(_as_tuple, args[1:])))
        else:
            out = self.graph.call_function(target, self.mapped(node.args), self.mapped(node.kwargs))
        if rebind is not None:
            self.env[rebind] = out
        return out

    def transposed_weight(self, node: fx.Node) -> _Transposed | None:
        """A 2-D parameter transposed for a matrix product: decomposed programs spell a
        linear layer as ``addmm(bias, x, permute(weight))``."""
        fqn = self.param_name(node.args[0]) if node.args else None
        if fqn is None or self.tensors[fqn].dim() != 2:
            return None
        if node.target is aten.t.default or (
            node.target is aten.permute.default and list(node.args[1]) == [1, 0]
        ):
            users = {u.target for u in node.users}
            if users and users <= {aten.addmm.default, aten.mm.default}:
                return _Transposed(fqn)
        return None

    def decomposed_linear(self, node: fx.Node) -> fx.Node:
        if node.kwargs:
            raise ArtifactError(f"{node.format_node()}: a scaled matrix product is not supported")
        if node.target is aten.addmm.default:
            bias_node, x_node, w_node = node.args
            bias = self.param_name(bias_node)
            if bias is None:
                raise ArtifactError(f"{node.format_node()}: the bias is not a parameter")
        else:
            (x_node, w_node), bias = node.args, None
        weight = self.env[w_node]
        if not isinstance(weight, _Transposed) or isinstance(self.env.get(x_node), _Transposed):
            raise ArtifactError(f"{node.format_node()}: not a linear layer's product")
        layer = weight.fqn.rpartition(".")[0]
        fqns = [weight.fqn] + ([bias] if bias is not None else [])
        if any(f.rpartition(".")[0] != layer for f in fqns):
            raise ArtifactError(f"one operation uses parameters of several layers: {fqns}")
        self.claim(layer, fqns)
        w = self.tensors[weight.fqn].detach()
        linear = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None)
        with torch.no_grad():
            linear.weight.copy_(w)
            if bias is not None:
                linear.bias.copy_(self.tensors[bias].detach())
        self.add_module(layer, linear)
        return self.graph.call_module(layer, (self.mapped(x_node),))

    def layer(self, node: fx.Node, params: list[tuple[int, str]]) -> Any:
        """An op that uses trainable parameters: a standard layer module where it is one."""
        fqns = [p for _, p in params]
        layer = fqns[0].rpartition(".")[0]
        if any(p.rpartition(".")[0] != layer for p in fqns):
            raise ArtifactError(f"one operation uses parameters of several layers: {fqns}")
        self.claim(layer, fqns)
        args = list(node.args) + [None] * 12
        target = node.target
        module = None
        if target in (aten.conv2d.default, aten.convolution.default):
            module = self.conv(node, args)
        elif target is aten.linear.default:
            module = self.linear(args)
        elif target in (aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default):
            module = self.batch_norm(node, args)
        if module is None or node.kwargs:
            module = self.op_layer(node)
            self.add_module(layer, module)
            activations = [self.mapped(node.args[i]) for i in module.slots]
            return self.graph.call_module(layer, tuple(activations))
        self.add_module(layer, module)
        out = self.graph.call_module(layer, (self.mapped(node.args[0]),))
        if target is aten._native_batch_norm_legit_no_training.default:
            return ("bn", out)  # its users take item 0
        return out

    def conv(self, node: fx.Node, args: list[Any]) -> nn.Module | None:
        weight = self.tensor(args[1])
        if weight is None or weight.dim() != 4 or self.param_name(args[0]) is not None:
            return None
        bias = self.tensor(args[2]) if args[2] is not None else None
        if node.target is aten.convolution.default:
            stride, padding, dilation, transposed, _, groups = args[3:9]
            if transposed:
                return None
        else:
            stride, padding, dilation, groups = args[3:7]
        stride, dilation = stride or 1, dilation or 1
        padding, groups = padding if padding is not None else 0, groups or 1
        if isinstance(padding, str):
            return None
        conv = nn.Conv2d(
            weight.shape[1] * groups,
            weight.shape[0],
            tuple(weight.shape[2:]),
            stride=_pair(stride),
            padding=_pair(padding),
            dilation=_pair(dilation),
            groups=groups,
            bias=bias is not None,
        )
        with torch.no_grad():
            conv.weight.copy_(weight)
            if bias is not None:
                conv.bias.copy_(bias)
        return conv

    def linear(self, args: list[Any]) -> nn.Module | None:
        weight = self.tensor(args[1])
        if weight is None or weight.dim() != 2 or self.param_name(args[0]) is not None:
            return None
        bias = self.tensor(args[2]) if args[2] is not None else None
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if bias is not None:
                linear.bias.copy_(bias)
        return linear

    def batch_norm(self, node: fx.Node, args: list[Any]) -> nn.Module | None:
        weight, bias = self.tensor(args[1]), self.tensor(args[2])
        mean, var = self.tensor(args[3]), self.tensor(args[4])
        if node.target is aten.batch_norm.default:
            training, momentum, eps = args[5], args[6], args[7]
            if training:
                raise ArtifactError(
                    "the classifier normalizes with batch statistics (batch norm in training "
                    "mode): export it after model.eval()"
                )
        else:
            momentum, eps = args[5], args[6]
        if mean is None or var is None or self.param_name(args[0]) is not None:
            return None
        rank = _rank(node.args[0])
        kind = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
        if rank not in kind:
            return None
        norm = kind[rank](len(mean), eps=float(eps), momentum=momentum, affine=weight is not None)
        if weight is None and bias is not None:
            return None
        with torch.no_grad():
            norm.running_mean.copy_(mean)
            norm.running_var.copy_(var)
            if weight is not None:
                norm.weight.copy_(weight)
                norm.bias.copy_(bias)
        return norm.eval()

    def op_layer(self, node: fx.Node) -> OpLayer:
        template: list[Any] = []
        slots: list[int] = []
        param_slots: dict[int, str] = {}
        tensors: dict[str, Tensor] = {}
        for i, arg in enumerate(node.args):
            fqn = self.param_name(arg)
            if fqn is not None:
                leaf = fqn.rpartition(".")[2]
                param_slots[i] = leaf
                tensors[leaf] = self.tensor(arg)  # type: ignore[assignment]
                template.append(None)
            elif isinstance(arg, fx.Node):
                constant = self.tensor(arg)
                template.append(None if constant is None else constant.clone())
                if constant is None:
                    slots.append(i)
            elif _holds_node(arg):
                raise ArtifactError(
                    f"{node.format_node()}: an op with parameters and a list of activations "
                    "is not supported"
                )
            else:
                template.append(arg)
        if any(_holds_node(v) for v in node.kwargs.values()):
            raise ArtifactError(f"{node.format_node()}: tensor keyword arguments are not supported")
        layer = OpLayer(node.target, template, slots, param_slots, dict(node.kwargs))
        for leaf, value in tensors.items():
            layer.register_parameter(leaf, nn.Parameter(value.clone()))
        return layer


def lift(
    program: torch.export.ExportedProgram,
    parameters: set[str],
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
) -> fx.GraphModule:
    """The program as an eager module with standard layers (see the module docstring).

    With ``mean`` and ``std``, (x - mean) / std per channel runs first, for models that
    expect GradProbe to normalize their input; layer names stay the model's own.
    """
    return _Lifter(program, parameters, mean, std).run()


def _pair(value: Any) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    value = tuple(value)
    return (value[0], value[0]) if len(value) == 1 else (value[0], value[1])


def _as_tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _rank(node: Any) -> int | None:
    meta = getattr(node, "meta", {}).get("val")
    return meta.dim() if isinstance(meta, Tensor) else None


def _holds_node(value: Any) -> bool:
    if isinstance(value, fx.Node):
        return True
    return isinstance(value, list | tuple) and any(_holds_node(v) for v in value)
