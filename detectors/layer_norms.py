"""Per-sample squared gradient norms of one layer's parameters, without per-sample gradients.

Every function here takes the layer's input activation ``a`` (shared by all labels, batch B)
and the gradient of the losses with respect to the layer's output ``delta`` (one per label,
shape (N, B, ...)), and returns ||∂J_{c,b}/∂θ_layer||² of shape (N, B), weight and bias
together. The identities are the "ghost norm" ones used in differentially private training:
a layer's per-sample weight gradient is a sum of outer products δ_p ⊗ a_p over positions p,
so its norm needs only the two factors, never a weight-shaped tensor per (label, sample).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LayerNormFn = Callable[[nn.Module, tuple[Tensor, ...], Tensor], Tensor]

# Largest temporary copy made at once (floats): 4 MB stays in malloc's reused heap.
_COPY_BLOCK_FLOATS = 1 << 20


def linear_sq_norms(module: nn.Module, inputs: tuple[Tensor, ...], delta: Tensor) -> Tensor:
    """nn.Linear on (B, in) inputs: ||δ aᵀ||² = ||δ||²·||a||², bias adds ||δ||²."""
    (a,) = inputs
    if a.dim() != 2:
        # Sequence inputs (B, T, in) make the gradient a sum over T: use the Gram form.
        return _linear_sequence_sq_norms(module, a, delta)
    delta_sq = delta.pow(2).sum(-1)  # (N, B)
    a_sq = a.pow(2).sum(-1)  # (B,)
    norms = delta_sq * a_sq
    if module.bias is not None:
        norms = norms + delta_sq
    return norms


def _linear_sequence_sq_norms(module: nn.Module, a: Tensor, delta: Tensor) -> Tensor:
    n_labels = delta.shape[0]
    a = a.flatten(1, -2)  # (B, T, in)
    delta = delta.flatten(2, -2)  # (N, B, T, out)
    weight_grad = torch.einsum("nbto,bti->nboi", delta, a)
    norms = weight_grad.pow(2).sum((-1, -2))
    if module.bias is not None:
        norms = norms + delta.sum(2).pow(2).sum(-1)
    return norms.reshape(n_labels, -1)


def conv2d_sq_norms(
    module: nn.Module,
    inputs: tuple[Tensor, ...],
    delta: Tensor,
    method: Literal["auto", "direct", "gram"] = "auto",
) -> Tensor:
    """nn.Conv2d with any stride, padding, dilation and groups (zero padding).

    The per-sample weight gradient is δᵀU, with U the unfolded input (positions × C_in·k·k).
    Two exact ways to get its norm; the cheaper one is chosen per layer:
    - direct: form δᵀU for each (label, sample), cost N·B·P·C_out·K;
    - Gram ("ghost"): <δδᵀ, UUᵀ> over positions, cost B·P²·K + N·B·P²·C_out, where UUᵀ is
      shared by all N labels. It wins when positions are few and channels many (deep layers).
    """
    (a,) = inputs
    n_labels, batch = delta.shape[:2]
    groups = module.groups
    c_out = module.out_channels
    # (B, G, K, P), channel-major: groups are contiguous. With a bias, each group's unfolded
    # input gets a row of ones: the bias gradient is then one more column of δᵀU (and UUᵀ
    # gains 1 everywhere), so weight and bias come out of the same product, without another
    # pass over δ.
    unfolded = _unfold_groups(a, module, ones_row=module.bias is not None)
    positions = unfolded.shape[-1]
    k_per_group = unfolded.shape[2]
    delta = delta.reshape(n_labels, batch, groups, c_out // groups, positions)  # (N, B, G, O, P)

    # Both ways are exact; costs in multiply-adds. The direct product is one GEMM per
    # (sample, group) with all labels' rows stacked, which runs near peak, so it is preferred
    # unless the Gram form is clearly cheaper.
    direct_cost = n_labels * positions * c_out * k_per_group
    gram_cost = positions * positions * (k_per_group * groups + n_labels * c_out)
    if method == "auto":
        method = "direct" if direct_cost <= 2 * gram_cost else "gram"
    if method == "direct" and delta.stride(3) == 1:
        # Channels innermost (max pooling's channels-last gradients): the one copy puts the
        # labels beside the channels, (B, G, P, N·O), and U @ it -> (B, G, K, N·O).
        # In blocks of samples: one copy of a whole large batch is a fresh buffer above
        # glibc's mmap threshold, mapped and faulted in on every call (at batch 128 that made
        # each image cost 1.5x what it costs at batch 32).
        step = max(1, _COPY_BLOCK_FLOATS // (groups * positions * n_labels * (c_out // groups)))
        norms = []
        for start in range(0, batch, step):
            part = delta[:, start : start + step]
            stacked = part.permute(1, 2, 4, 0, 3).reshape(part.shape[1], groups, positions, -1)
            weight_grad = torch.matmul(unfolded[start : start + step], stacked)
            weight_grad = weight_grad.view(part.shape[1], groups, -1, n_labels, c_out // groups)
            norms.append(weight_grad.pow_(2).sum((1, 2, 4)))  # (b, N); squared in place
        return (norms[0] if len(norms) == 1 else torch.cat(norms)).t()
    if method == "direct":
        # (B, G, N·O, P) @ (B, G, P, K) -> (B, G, N·O, K): U is shared by all labels.
        stacked = delta.permute(1, 2, 0, 3, 4).reshape(batch, groups, -1, positions)
        weight_grad = torch.matmul(stacked, unfolded.transpose(-1, -2))
        weight_grad = weight_grad.view(batch, groups, n_labels, -1)
        return weight_grad.pow_(2).sum((-1, 1)).transpose(0, 1)  # (N, B); squared in place
    unfolded_gram = torch.matmul(unfolded.transpose(-1, -2), unfolded)  # (B, G, P, P)
    delta_gram = torch.matmul(delta.transpose(-1, -2), delta)  # (N, B, G, P, P)
    return (delta_gram * unfolded_gram).sum((-1, -2, -3))


def pooled_conv2d_sq_norms(
    module: nn.Module, inputs: tuple[Tensor, ...], pooled_grad: Tensor, indices: Tensor
) -> Tensor:
    """nn.Conv2d (groups 1) whose output gradient is nonzero only where a max pooling took
    its maxima: ``pooled_grad`` (N, B, C, Q) at positions ``indices`` (B, C, Q) of the
    output's H×W.

    δᵀU sums δ_p U_p over positions; with δ zero but at the pooled maxima it is Σ_q δ_q U_idx(q)
    (cells sharing a maximum add up, as the full gradient would), so only the Q gathered
    columns of U take part: a quarter of the direct product's work for 2×2 pooling, and the
    (N, B, C, H, W) gradient is never needed.
    """
    (a,) = inputs
    unfolded = _unfold_groups(a, module, ones_row=module.bias is not None)[:, 0]  # (B, K, P)
    batch, k, positions = unfolded.shape
    channels, cells = pooled_grad.shape[2:]
    rows = unfolded.transpose(1, 2).reshape(batch * positions, k)
    offsets = torch.arange(batch, device=indices.device).view(-1, 1, 1) * positions
    gathered = rows.index_select(0, (indices + offsets).reshape(-1))
    gathered = gathered.view(batch, channels, cells, k)  # U's columns at each channel's maxima
    # (B, C, N, Q) @ (B, C, Q, K) -> (B, C, N, K): per sample and channel, all labels at once.
    weight_grad = torch.matmul(pooled_grad.permute(1, 2, 0, 3), gathered)
    return weight_grad.pow_(2).sum((1, 3)).transpose(0, 1)  # (N, B)


def _windows(a: Tensor, conv: nn.Conv2d) -> Tensor:
    """The conv's input windows as a strided view (B, C_in, kh, kw, out_h, out_w)."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
    )
    padded = F.pad(a, (pw, pw, ph, ph)) if ph or pw else a
    batch, channels, height, width = padded.shape
    out_h = (height - dh * (kh - 1) - 1) // sh + 1
    out_w = (width - dw * (kw - 1) - 1) // sw + 1
    s_b, s_c, s_h, s_w = padded.stride()
    return padded.as_strided(
        (batch, channels, kh, kw, out_h, out_w),
        (s_b, s_c, dh * s_h, dw * s_w, sh * s_h, sw * s_w),
    )


def unfold(a: Tensor, conv: nn.Conv2d) -> Tensor:
    """``F.unfold`` for the conv's geometry, as a strided view and one copy.

    Same result as ``F.unfold`` (rows ordered channel, kernel row, kernel column), several
    times faster on CPU, where im2col is the slow path.
    """
    windows = _windows(a, conv)
    batch, channels, kh, kw, out_h, out_w = windows.shape
    return windows.reshape(batch, channels * kh * kw, out_h * out_w)


def _unfold_groups(a: Tensor, conv: nn.Conv2d, ones_row: bool) -> Tensor:
    """``unfold`` split by group, (B, G, K, P), optionally with a row of ones per group
    appended, (B, G, K + 1, P): one copy either way."""
    windows = _windows(a, conv)
    batch, channels, kh, kw, out_h, out_w = windows.shape
    groups = conv.groups
    k = channels // groups * kh * kw
    if not ones_row:
        return windows.reshape(batch, groups, k, out_h * out_w)
    out = windows.new_empty(batch, groups, k + 1, out_h * out_w)
    shape = (batch, groups, channels // groups, kh, kw, out_h, out_w)
    out[:, :, :k].view(shape).copy_(windows.view(shape))
    out[:, :, k].fill_(1.0)
    return out


def batchnorm_sq_norms(module: nn.Module, inputs: tuple[Tensor, ...], delta: Tensor) -> Tensor:
    """BatchNorm in eval mode: γ sees Σ δ·x̂ per channel, β sees Σ δ per channel."""
    (a,) = inputs
    shape = [1, -1] + [1] * (a.dim() - 2)
    mean = module.running_mean.view(shape)
    var = module.running_var.view(shape)
    x_hat = (a - mean) * torch.rsqrt(var + module.eps)  # (B, C, ...)
    spatial = tuple(range(3, delta.dim()))
    norms = torch.zeros(delta.shape[:2], dtype=delta.dtype, device=delta.device)
    if module.weight is not None:
        gamma_grad = (delta * x_hat).sum(spatial) if spatial else delta * x_hat
        norms = norms + gamma_grad.pow(2).sum(-1)
    if module.bias is not None:
        beta_grad = delta.sum(spatial) if spatial else delta
        norms = norms + beta_grad.pow(2).sum(-1)
    return norms


def generic_sq_norms(module: nn.Module, inputs: tuple[Tensor, ...], delta: Tensor) -> Tensor:
    """Any module with its own parameters: per-sample VJPs through the module alone.

    This materializes per-(label, sample) gradients of this one layer, so it is kept for layer
    types that have no closed form above.
    """
    from torch.func import functional_call, vjp, vmap

    params = {name: p.detach() for name, p in module.named_parameters(recurse=False)}
    buffers = {name: b for name, b in module.named_buffers(recurse=False)}

    def one_sample(sample_inputs: tuple[Tensor, ...], sample_delta: Tensor) -> Tensor:
        def run(p: dict[str, Tensor]) -> Tensor:
            batched = tuple(t.unsqueeze(0) for t in sample_inputs)
            return functional_call(module, {**p, **buffers}, batched).squeeze(0)

        _, pullback = vjp(run, params)
        (grads,) = pullback(sample_delta)
        return sum(g.pow(2).sum() for g in grads.values())

    per_sample = vmap(one_sample, in_dims=(0, 0))  # over the batch
    per_label = vmap(per_sample, in_dims=(None, 0))  # over the labels
    return per_label(tuple(t.detach() for t in inputs), delta)


def norm_fn_for(module: nn.Module) -> LayerNormFn:
    """The exact closed form for this layer type, or the generic fallback."""
    if type(module) is nn.Linear:
        return linear_sq_norms
    if (
        type(module) is nn.Conv2d
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
    ):
        return conv2d_sq_norms
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
        return batchnorm_sq_norms
    return generic_sq_norms
