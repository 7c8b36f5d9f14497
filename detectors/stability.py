"""Core: how much the classifier's answer moves when the image is squeezed (feature squeezing).

An adversarial perturbation is tuned, pixel by pixel, to carry the image just across a decision
boundary; a tiny smoothing that keeps what the image shows (a Gaussian blur of half a pixel, a
2×2 median) undoes much of it, so the softmax moves far, while a clean image's barely moves.
The signal is the L1 distance between the softmax of the image and of each squeezed view
(Xu et al., "Feature Squeezing", NDSS 2018). The squeezes work at the scale of one pixel, as
perturbations do, so they need no knowledge of the image's size, channels or content; each is
one extra forward pass, with no gradient.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

# The squeezed views, in the order of ``squeezed_logits``' second axis.
SQUEEZES = ("blur", "median")
STABILITY_COLUMNS = ("squeeze_l1_blur", "squeeze_l1_median", "squeeze_l1_max")
_BLUR_SIGMA = 0.5  # pixels


def _blur(x: Tensor, sigma: float = _BLUR_SIGMA) -> Tensor:
    """Gaussian blur, 3×3 (±2σ at σ = 0.5 px), edges replicated: one grouped convolution."""
    t = torch.arange(-1, 2, device=x.device, dtype=x.dtype)
    g = torch.exp(-(t**2) / (2 * sigma * sigma))
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :]).expand(x.shape[1], 1, 3, 3)
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel, groups=x.shape[1])


def _median(x: Tensor) -> Tensor:
    """2×2 median (the lower of the middle two), edges replicated. In closed form: the second
    smallest of four values is min(max(min(a, b), min(c, d)), min(max(a, b), max(c, d))),
    many times faster than sorting unfolded windows."""
    p = F.pad(x, (1, 0, 1, 0), mode="replicate")
    a, b, c, d = p[..., :-1, :-1], p[..., :-1, 1:], p[..., 1:, :-1], p[..., 1:, 1:]
    low = torch.maximum(torch.minimum(a, b), torch.minimum(c, d))
    high = torch.minimum(torch.maximum(a, b), torch.maximum(c, d))
    return torch.minimum(low, high)


def squeezed_views(x: Tensor) -> list[Tensor]:
    """Each squeeze of a batch (B, C, H, W), in ``SQUEEZES`` order, same shape and range."""
    if x.dim() != 4:
        raise ValueError(f"squeezing needs images (B, C, H, W), got shape {tuple(x.shape)}")
    return [_blur(x), _median(x)]


@torch.no_grad()
def squeezed_logits(model: nn.Module, x: Tensor) -> Tensor:
    """The model's logits on each squeezed view: (B, len(SQUEEZES), N), from one forward of
    all views together. ``model`` in eval mode."""
    views = squeezed_views(x)
    logits = model(torch.cat(views))
    return logits.reshape(len(views), x.shape[0], -1).transpose(0, 1)


def stability_columns(logits: np.ndarray, squeezed: np.ndarray) -> np.ndarray:
    """(B, 3): log L1 distance between the softmax of the image (logits (B, N)) and of each
    squeezed view (``squeezed`` (B, K, N)), and of the farther of them."""

    def softmax(z: np.ndarray) -> np.ndarray:
        z = z.astype(np.float64)
        e = np.exp(z - z.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    p = softmax(logits)[:, None, :]
    distances = np.abs(softmax(squeezed) - p).sum(-1)  # (B, K)
    columns = np.column_stack([distances, distances.max(1)])
    return np.log(columns + 1e-6)
