"""The reliability core: classifier + gradient features + detector H → one verdict per image.

It knows nothing of gRPC, HTTP or the command line; the servicers, the CLI and the TorchServe
handler are thin layers over ``Assessor``. Inputs reaching it are already validated float32
(B, C, H, W) in [0, 1] at the model's input shape (see ``service.inputs``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

import numpy as np
import torch

from detectors.gradients import GradientFeatures, GradientSignals
from detectors.model_dir import LoadedClassifier

VERDICTS = ("in_distribution", "ood", "corrupted", "adversarial")
T = TypeVar("T")


class Detector(Protocol):
    """What the core needs of a detector H."""

    version: str
    sha256: str
    # Whether its signals include the squeezed views' logits (``detectors.stability``).
    needs_squeezed_logits: bool

    def predict_proba(self, signals: GradientSignals, images: np.ndarray) -> np.ndarray:
        """Calibrated probabilities (B, 4), columns in ``VERDICTS`` order, from the signals
        and the images (B, C, H, W) they were computed from."""
        ...

    def verdict_indices(self, probs: np.ndarray) -> np.ndarray:
        """Index into ``VERDICTS`` per image, at the detector's operating point."""
        ...


@dataclass
class Assessment:
    prediction: int
    probabilities: np.ndarray  # (N,) softmax of the classifier
    verdict: str
    scores: dict[str, float]


@dataclass
class BatchAssessment:
    assessments: list[Assessment]
    # forward, gradients, squeeze (with the stability signals), detector
    timings_ms: dict[str, float] = field(default_factory=dict)


class Assessor:
    """Assess batches of images with one classifier and one detector.

    Args:
        classifier: a loaded, hash-checked classifier artifact.
        detector: the trained detector H for that classifier.
        device: where the forward and gradient pass run ("cpu" or "cuda").
        name: what requests call this model (default: its model dir's name).
    """

    def __init__(
        self,
        classifier: LoadedClassifier,
        detector: Detector,
        device: str = "cpu",
        name: str | None = None,
    ) -> None:
        self.classifier = classifier
        self.name = name or classifier.name
        self.spec = classifier.spec
        self.detector = detector
        self.device = device
        self.module = classifier.module.to(device)
        squeeze = bool(getattr(detector, "needs_squeezed_logits", False))
        self.engine = GradientFeatures(self.module, squeeze=squeeze)

    @property
    def classes(self) -> list[str]:
        return list(self.classifier.manifest.classes)

    def assess(self, images: np.ndarray) -> BatchAssessment:
        """Verdicts for a validated batch (float32 (B, C, H, W) in [0, 1])."""
        signals = self.engine.signals(torch.from_numpy(images))
        start = time.perf_counter()
        scores = self.detector.predict_proba(signals, images)
        detector_ms = (time.perf_counter() - start) * 1000
        verdicts = self.detector.verdict_indices(scores)
        probabilities = torch.softmax(signals.logits, dim=-1).cpu().numpy()
        assessments = [
            Assessment(
                prediction=int(p.argmax()),
                probabilities=p,
                verdict=VERDICTS[int(v)],
                scores={name: float(x) for name, x in zip(VERDICTS, s, strict=True)},
            )
            for p, s, v in zip(probabilities, scores, verdicts, strict=True)
        ]
        return BatchAssessment(assessments, {**signals.timings_ms, "detector": detector_ms})

    @torch.no_grad()
    def predict(self, images: np.ndarray) -> np.ndarray:
        """The classifier alone (softmax (B, N)): the path reliability is measured against."""
        logits = self.classifier.exported(torch.from_numpy(images).to(self.device))
        return torch.softmax(logits, dim=-1).cpu().numpy()


# ----------------------------------------------------------------------------- accelerator memory


@dataclass(frozen=True)
class MemoryCap:
    """Fault injection: an accelerator that holds at most ``images`` images in one pass.

    ``within_memory`` checks it before each pass and, above the cap, raises
    ``torch.cuda.OutOfMemoryError`` as CUDA does, so that the split-and-retry path runs (and is
    tested) on a CPU. Only ``gradprobe serve --simulate-memory-cap N`` sets one.
    """

    images: int

    def check(self, images: int) -> None:
        if images > self.images:
            raise torch.cuda.OutOfMemoryError(
                f"simulated: {images} images exceed the memory cap of {self.images} "
                "(--simulate-memory-cap)"
            )


def release_accelerator_memory() -> None:
    """Give the CUDA caching allocator's free blocks back, so a retry starts from a clean
    slate (a no-op without CUDA)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


@dataclass
class WithinMemory(Generic[T]):
    """What ``within_memory`` computed: one result per image, in order, None for an image
    that alone did not fit in the accelerator's memory."""

    results: list[T | None]
    timings_ms: dict[str, float]  # summed over the passes
    splits: list[int] = field(default_factory=list)  # sizes of the batches split, in order
    reason: str = ""  # the device's first out-of-memory message (for the server's log)

    @property
    def failed(self) -> int:
        return sum(result is None for result in self.results)


Compute = Callable[[np.ndarray], tuple[Sequence[T], dict[str, float]]]


def within_memory(
    compute: Compute[T], images: np.ndarray, *, memory_cap: MemoryCap | None = None
) -> WithinMemory[T]:
    """``compute(images)`` (per-image results and stage timings); when the accelerator runs
    out of memory, the cache is emptied and the batch computed in halves, recursively down to
    single images.

    Every image's result is its own (per-sample gradients), so the halves' results, in order,
    are the batch's. A single image that still does not fit gets None in its place; the other
    images' results are kept, never recomputed.
    """
    out: WithinMemory[T] = WithinMemory([], {})
    _compute_into(out, compute, images, memory_cap)
    return out


def _compute_into(
    out: WithinMemory[T], compute: Compute[T], images: np.ndarray, memory_cap: MemoryCap | None
) -> None:
    try:
        if memory_cap is not None:
            memory_cap.check(len(images))
        results, timings = compute(images)
    except torch.cuda.OutOfMemoryError as exc:
        reason = str(exc).splitlines()[0] if str(exc) else "CUDA out of memory"
    else:
        out.results.extend(results)
        for stage, ms in timings.items():
            out.timings_ms[stage] = out.timings_ms.get(stage, 0.0) + ms
        return
    # Emptied outside the except block: its traceback holds the failed pass's tensors.
    release_accelerator_memory()
    out.reason = out.reason or reason
    if len(images) == 1:
        out.results.append(None)
        return
    out.splits.append(len(images))
    half = (len(images) + 1) // 2
    for part in (images[:half], images[half:]):
        _compute_into(out, compute, part, memory_cap)
