"""Straightforward ways to compute the same features, kept as the yardstick for the engine.

``loop_features`` is the definition written out: one backward per (sample, label).
``vmap_features`` is the usual ``torch.func`` recipe, which materializes every per-sample
gradient. Both are slow by construction; tests check the engine against the first and the
benchmark measures the engine against both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detectors.gradients import _eval_mode, parameterized_layers


def _layer_param_groups(model: nn.Module) -> list[list[str]]:
    groups: dict[str, list[str]] = {name: [] for name, _ in parameterized_layers(model)}
    for param_name, param in model.named_parameters():
        if param.requires_grad:
            groups[param_name.rpartition(".")[0]].append(param_name)
    return list(groups.values())


def loop_features(model: nn.Module, x: Tensor, labels: str = "onehot") -> Tensor:
    """(B, N, L) features from one autograd backward per sample and label."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for p in model.parameters() if p.requires_grad]
    index = {name: i for i, name in enumerate(names)}
    groups = _layer_param_groups(model)
    rows = []
    with torch.enable_grad(), _eval_mode(model):
        for sample in x:
            logits = model(sample.unsqueeze(0))[0]
            n_classes = logits.shape[-1]
            if labels == "confounding":
                losses = [-F.log_softmax(logits, -1).sum()]
            else:
                losses = [F.cross_entropy(logits, torch.tensor(c)) for c in range(n_classes)]
            per_label = []
            for i, loss in enumerate(losses):
                grads = torch.autograd.grad(loss, params, retain_graph=i < len(losses) - 1)
                per_label.append(
                    torch.stack(
                        [sum(grads[index[n]].pow(2).sum() for n in group) for group in groups]
                    )
                )
            rows.append(torch.stack(per_label))
    return torch.stack(rows)


def vmap_features(model: nn.Module, x: Tensor, chunk_size: int | None = None) -> Tensor:
    """(B, N, L) features from ``torch.func.vmap(grad(...))`` over every (sample, label)."""
    from torch.func import functional_call, grad, vmap

    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    buffers = dict(model.named_buffers())
    groups = _layer_param_groups(model)

    def loss(p: dict[str, Tensor], sample: Tensor, label: Tensor) -> Tensor:
        logits = functional_call(model, {**p, **buffers}, (sample.unsqueeze(0),))
        return F.cross_entropy(logits, label.unsqueeze(0))

    def norms(sample: Tensor, label: Tensor) -> Tensor:
        g = grad(loss)(params, sample, label)
        return torch.stack([sum(g[n].pow(2).sum() for n in group) for group in groups])

    with _eval_mode(model):
        n_classes = model(x[:1]).shape[-1]
        batch = x.shape[0]
        samples = x.repeat_interleave(n_classes, dim=0)
        labels = torch.arange(n_classes).repeat(batch)
        flat = vmap(norms, chunk_size=chunk_size)(samples, labels)
    return flat.view(batch, n_classes, -1)
