"""Adversarial examples against the deployed classifier, made with torchattacks.

Only images the clean model classifies correctly are attacked (an attack on a misclassified
image says nothing), and every result records their indices into the input. Attacks are
untargeted; models take float (B, C, H, W) in [0, 1] and return logits, as torchattacks needs.

Attacks and strength levels (``ATTACKS`` holds the exact values):

* ``fgsm``, ``bim``, ``pgd``: white-box L∞ with eps 0.05, 0.1, 0.2 (default 0.1). Pixels lie
  in [0, 1]: 0.05 (≈ 13/255) is barely visible on 28×28 Fashion-MNIST, 0.1 is the usual
  Fashion-MNIST budget in the robustness literature, 0.2 is strong but below MNIST's 0.3.
  Smaller budgets (0.02) fool this model on only ~20-30 % of images even with PGD.
  BIM and PGD take 10 steps of eps / 4 (2.5 eps of travel: enough to reach any corner of
  the ball from either start); PGD starts from a random point in the ball, BIM from the
  image.
* ``cw``: white-box Carlini-Wagner L2 (``torchattacks.CW``, kappa 0, 100 Adam steps, lr
  0.05). Its strength is the trade-off constant c (one level, 2.0): c = 1 leaves ~1 % of
  the images unfooled, c = 2 none, for a mean L2 of ~0.85, below FGSM's ~1.2 at eps 0.05.
  torchattacks optimises in tanh space from atanh(2x - 1), so pixels exactly 0 or 1 (the
  black background) never move: C&W perturbs the garment only.
* ``square``: black-box L∞ Square Attack (random search on the margin loss, logits only),
  at most 500 queries per image, at the same eps levels as the white-box L∞ attacks. The
  model is queried under ``torch.no_grad``: no gradient can reach it. Its cost is about
  (images not yet fooled) × (queries), so it dominates the runtime at eps 0.05; 1000
  queries would add ~10 points of success there (45 → 55 %) for twice the time.

Measured on the 1,840 images the default model gets right among 2,000 random Fashion-MNIST
test images, success rates at eps 0.05 / 0.1 / 0.2: FGSM 48 / 76 / 94 %, BIM and PGD
73 / 98 / 100 %, Square 45 / 84 / 100 %; C&W 100 % (mean L2 0.86). All of it takes about
3 minutes on 2 idle CPU cores, two thirds of it Square and C&W.

For CW and Square, torchattacks returns an image it failed to fool unchanged (the clean
image); FGSM, BIM and PGD return it perturbed. ``AttackResult.success`` selects the images
that do fool the model.

For a given seed, the output is deterministic and depends on the batch size and the position
of an image in its batch (random draws are made per batch), not on anything else. The caller's
random state, the model's train/eval flags, ``requires_grad`` flags and ``.grad`` are left as
they were.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn

from detectors.fit.challenge._checks import clipped_unit_range

if TYPE_CHECKING:
    from torchattacks.attack import Attack

_EPS_LEVELS = (0.05, 0.1, 0.2)
_DEFAULT_EPS = 0.1
_ITER_STEPS = 10
_ITER_STEP_FRACTION = 0.25  # step size alpha = eps / 4
# C&W: c = 1 reaches ~99 % in 100 steps, c = 2 ~100 %; larger c only adds L2 (c = 5: ~1.1).
_CW_C = 2.0
_CW_KAPPA = 0.0
_CW_STEPS = 100
_CW_LR = 0.05
# Square: queries bound the runtime (each is a forward pass of the images not yet fooled).
_SQUARE_QUERIES = 500
_SQUARE_P_INIT = 0.8  # initial share of pixels in a square (the paper's and library's default)


@dataclass(frozen=True)
class AttackSpec:
    """One attack: its threat model, its strength levels and its fixed hyperparameters."""

    name: str
    norm: str  # "Linf" or "L2"
    access: str  # "white-box" (gradients) or "black-box" (logits only)
    strength: str  # what the strength number means
    strengths: tuple[float, ...]  # the levels the challenge data uses
    default_strength: float  # used for strength=None
    params: Mapping[str, float] = field(compare=False)
    summary: str = ""


def _spec(
    name: str,
    norm: str,
    access: str,
    strength: str,
    strengths: tuple[float, ...],
    default: float,
    params: dict[str, float],
    summary: str,
) -> AttackSpec:
    return AttackSpec(
        name, norm, access, strength, strengths, default, MappingProxyType(params), summary
    )


# Read-only: a module-level constant, not shared mutable state.
ATTACKS: Mapping[str, AttackSpec] = MappingProxyType(
    {
        "fgsm": _spec(
            "fgsm",
            "Linf",
            "white-box",
            "eps (L∞ bound)",
            _EPS_LEVELS,
            _DEFAULT_EPS,
            {},
            "one signed-gradient step of size eps",
        ),
        "bim": _spec(
            "bim",
            "Linf",
            "white-box",
            "eps (L∞ bound)",
            _EPS_LEVELS,
            _DEFAULT_EPS,
            {"steps": _ITER_STEPS, "alpha_over_eps": _ITER_STEP_FRACTION},
            "iterative FGSM from the clean image, projected on the eps ball",
        ),
        "pgd": _spec(
            "pgd",
            "Linf",
            "white-box",
            "eps (L∞ bound)",
            _EPS_LEVELS,
            _DEFAULT_EPS,
            {"steps": _ITER_STEPS, "alpha_over_eps": _ITER_STEP_FRACTION},
            "iterative FGSM from a uniform random start in the eps ball",
        ),
        "cw": _spec(
            "cw",
            "L2",
            "white-box",
            "c (weight of the misclassification loss against L2)",
            (_CW_C,),
            _CW_C,
            {"kappa": _CW_KAPPA, "steps": _CW_STEPS, "lr": _CW_LR},
            "Carlini-Wagner L2: Adam on tanh-box variables, smallest fooling image kept",
        ),
        "square": _spec(
            "square",
            "Linf",
            "black-box",
            "eps (L∞ bound)",
            _EPS_LEVELS,
            _DEFAULT_EPS,
            {"n_queries": _SQUARE_QUERIES, "p_init": _SQUARE_P_INIT},
            "Square Attack: score-based random search with square updates (logits only)",
        ),
    }
)


@dataclass(frozen=True)
class AttackResult:
    """Adversarial versions of the input images the clean model classified correctly."""

    name: str
    strength: float  # the level used (eps, or c for cw)
    seed: int
    images: np.ndarray  # float32 (k, C, H, W) in [0, 1]
    indices: np.ndarray  # int64 (k,): rows of the input that were attacked, ascending
    clean_pred: np.ndarray  # int64 (k,): equal to the labels of those rows
    adv_pred: np.ndarray  # int64 (k,): the model's predictions on ``images``
    linf: np.ndarray  # float32 (k,): L∞ norm of each perturbation
    l2: np.ndarray  # float32 (k,): L2 norm of each perturbation

    @property
    def n(self) -> int:
        return len(self.indices)

    @property
    def success(self) -> np.ndarray:
        """bool (k,): the attack changed the prediction."""
        return self.adv_pred != self.clean_pred

    @property
    def success_rate(self) -> float:
        """Share of attacked images whose prediction changed (NaN when none was attacked)."""
        return float(self.success.mean()) if self.n else math.nan


def attack(
    model: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    name: str,
    strength: float | None,
    seed: int,
    batch_size: int = 256,
    progress: bool = False,
) -> AttackResult:
    """Attack the images ``model`` classifies correctly with attack ``name`` at ``strength``.

    ``images`` is float (n, C, H, W) in [0, 1], ``labels`` int (n,). ``strength`` is eps for
    the L∞ attacks and c for ``cw``; ``None`` takes the attack's default level.
    """
    spec = _get_spec(name)
    level = _check_strength(spec, strength)
    x = _check_images(images)
    y = _check_labels(labels, len(x))
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    from tqdm import tqdm  # lazy, as elsewhere in the project

    device = _device_of(model)
    with _attack_state(model, device):
        clean_pred = _predict(model, x, batch_size, device)
        if len(x) and not 0 <= y.min() <= y.max() < _num_classes(model, x[:1], device):
            raise ValueError("labels must be class indices of the model's logits")
        indices = np.flatnonzero(clean_pred == y).astype(np.int64)
        adv = np.empty((len(indices), *x.shape[1:]), dtype=np.float32)
        # eval() too: torchattacks puts back train mode on a model it found training
        target = model if spec.access == "white-box" else _QueryOnly(model).eval()
        atk = _make_attack(spec, target, level, device)
        batches = range(0, len(indices), batch_size)
        for b, lo in enumerate(
            tqdm(
                batches,
                desc=f"{name} {level:g}",
                unit="batch",
                disable=not progress,
                file=sys.stderr,
            )
        ):
            rows = indices[lo : lo + batch_size]
            # A seed per batch: a batch's draws do not depend on the batches before it.
            batch_seed = int(np.random.SeedSequence([int(seed), b]).generate_state(1)[0])
            torch.manual_seed(batch_seed)
            if spec.name == "square":
                atk.seed = batch_seed  # Square reseeds torch itself from this
            xb = torch.from_numpy(x[rows]).to(device)
            yb = torch.from_numpy(y[rows]).to(device)
            # white-box attacks need autograd even where the caller turned it off
            with torch.enable_grad():
                out = atk(xb, yb)
            adv[lo : lo + len(rows)] = out.detach().clamp_(0.0, 1.0).cpu().numpy()
        adv_pred = _predict(model, adv, batch_size, device)

    delta = (adv - x[indices]).reshape(len(indices), int(np.prod(x.shape[1:])))
    return AttackResult(
        name=spec.name,
        strength=level,
        seed=int(seed),
        images=adv,
        indices=indices,
        clean_pred=clean_pred[indices],
        adv_pred=adv_pred,
        linf=np.abs(delta).max(axis=1, initial=0.0).astype(np.float32),
        l2=np.linalg.norm(delta, axis=1).astype(np.float32),
    )


def success_report(results: Sequence[AttackResult]) -> str:
    """Markdown table: attack, strength, n, success rate, mean L∞ and L2 of the fooling images."""
    lines = [
        "| attack | strength | n | success rate | mean L∞ (fooled) | mean L2 (fooled) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        fooled = r.success
        linf = f"{r.linf[fooled].mean():.4f}" if fooled.any() else "–"
        l2 = f"{r.l2[fooled].mean():.4f}" if fooled.any() else "–"
        rate = f"{r.success_rate:.1%}" if r.n else "–"
        strength = f"{ATTACKS[r.name].strength.split()[0]}={r.strength:g}"
        lines.append(f"| {r.name} | {strength} | {r.n} | {rate} | {linf} | {l2} |")
    return "\n".join(lines) + "\n"


class _QueryOnly(nn.Module):
    """Exposes only the logits of a model: forward runs without autograd, so a black-box
    attack cannot take gradients through it even by mistake."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            return self.model(x)


def _make_attack(spec: AttackSpec, model: nn.Module, level: float, device: torch.device) -> Attack:
    import torchattacks  # lazy: only the challenge-data build needs it

    match spec.name:
        case "fgsm":
            atk = torchattacks.FGSM(model, eps=level)
        case "bim":
            atk = torchattacks.BIM(
                model, eps=level, alpha=level * _ITER_STEP_FRACTION, steps=_ITER_STEPS
            )
        case "pgd":
            atk = torchattacks.PGD(
                model,
                eps=level,
                alpha=level * _ITER_STEP_FRACTION,
                steps=_ITER_STEPS,
                random_start=True,
            )
        case "cw":
            atk = torchattacks.CW(model, c=level, kappa=_CW_KAPPA, steps=_CW_STEPS, lr=_CW_LR)
        case "square":
            atk = torchattacks.Square(
                model,
                norm="Linf",
                eps=level,
                n_queries=_SQUARE_QUERIES,
                n_restarts=1,
                p_init=_SQUARE_P_INIT,
                loss="margin",
                verbose=False,
            )
        case _:  # pragma: no cover - ATTACKS and this match are kept in step
            raise AssertionError(spec.name)
    atk.set_device(device)
    return atk


def _get_spec(name: str) -> AttackSpec:
    if not isinstance(name, str) or name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; expected one of: {', '.join(ATTACKS)}")
    return ATTACKS[name]


def _check_strength(spec: AttackSpec, strength: float | None) -> float:
    if strength is None:
        return spec.default_strength
    if isinstance(strength, bool) or not isinstance(strength, int | float | np.number):
        raise ValueError(f"strength must be a number or None, got {strength!r}")
    value = float(strength)
    upper = 1.0 if spec.norm == "Linf" else math.inf
    if not (math.isfinite(value) and 0.0 < value <= upper):
        bound = "in (0, 1]" if spec.norm == "Linf" else "positive and finite"
        raise ValueError(f"{spec.name} strength ({spec.strength}) must be {bound}, got {value}")
    return value


def _check_images(images: np.ndarray) -> np.ndarray:
    arr = np.asarray(images)
    if arr.ndim != 4:
        raise ValueError(
            f"images must have shape (n, C, H, W), e.g. (n, 1, 28, 28), got {arr.shape}"
        )
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(
            f"images must be floating point in [0, 1] (e.g. float32), got dtype {arr.dtype}; "
            "convert uint8 images with detectors.fit.fashion_mnist.to_float"
        )
    return clipped_unit_range(np.ascontiguousarray(arr, dtype=np.float32))


def _check_labels(labels: np.ndarray, n: int) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.shape != (n,) or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"labels must be integers of shape ({n},), got {arr.dtype} {arr.shape}")
    return arr.astype(np.int64)


def _device_of(model: nn.Module) -> torch.device:
    first = next(itertools.chain(model.parameters(), model.buffers()), None)
    return first.device if first is not None else torch.device("cpu")


@contextlib.contextmanager
def _attack_state(model: nn.Module, device: torch.device) -> Iterator[None]:
    """Eval mode and frozen parameters while attacking; the caller's RNG and the model's flags
    restored afterwards. Frozen parameters keep C&W's ``backward`` from writing ``.grad``."""
    training = [(m, m.training) for m in model.modules()]
    requires = [(p, p.requires_grad) for p in model.parameters()]
    if device.type == "cuda":
        cuda = [device.index if device.index is not None else torch.cuda.current_device()]
    else:
        cuda = []
    with torch.random.fork_rng(devices=cuda):
        try:
            model.eval()
            for p, _ in requires:
                p.requires_grad_(False)
            yield
        finally:
            for m, flag in training:
                m.training = flag
            for p, flag in requires:
                p.requires_grad_(flag)


@torch.no_grad()
def _predict(model: nn.Module, x: np.ndarray, batch_size: int, device: torch.device) -> np.ndarray:
    preds = [
        model(torch.from_numpy(x[lo : lo + batch_size]).to(device)).argmax(1).cpu()
        for lo in range(0, len(x), batch_size)
    ]
    return torch.cat(preds).numpy().astype(np.int64) if preds else np.zeros(0, dtype=np.int64)


@torch.no_grad()
def _num_classes(model: nn.Module, probe: np.ndarray, device: torch.device) -> int:
    return int(model(torch.from_numpy(probe).to(device)).shape[1])
