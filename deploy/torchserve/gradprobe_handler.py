"""TorchServe handler: the classifier's predictions, with GradProbe's reliability verdict.

Serves the archive's classifier as usual, as its ``manifest.json`` describes it (format,
sha256, input shape and channels, classes, normalization), and sends each batch to the
GradProbe sidecar over gRPC:

- ``monitor``: the prediction is answered at once; the verdict is computed in the background
  and lands in GradProbe's Prometheus metrics and in this model's log (``GRADPROBE_VERDICT``).
- ``gate``: the response carries the verdict; an input GradProbe does not judge
  ``in_distribution`` is flagged (``"reliable": false``) or refused (HTTP 422), per config.

GradProbe down or slower than ``timeout_ms`` never stops predictions: monitor mode goes on,
gate mode answers ``"status": "unavailable"`` with the reason (or 503 if configured to refuse).

TorchServe instantiates the one class this module defines; the rest is in gradprobe_sidecar.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gradprobe_sidecar import (
    BAD_INPUT,
    REFUSED_UNRELIABLE,
    RELIABILITY_UNAVAILABLE,
    BadInput,
    HandlerConfig,
    InputSpec,
    MonitorWorker,
    ReliabilityLink,
    ReliabilityUnavailable,
    decode_request,
)

log = logging.getLogger("gradprobe.torchserve")


def _set_status(context: Any, code: int, message: str, index: int) -> None:
    # TorchServe 0.12 frames the reason phrase by its length in characters, not bytes: one
    # non-ASCII character desynchronises the worker protocol and kills the worker.
    phrase = message.encode("ascii", "replace").decode("ascii")
    context.set_response_status(code, phrase, idx=index)


def load_model(path: Path, fmt: str, device: torch.device) -> Callable[..., Any]:
    """The classifier file, read as the manifest's ``format`` says it was saved."""
    if fmt == "torch.export":
        # An exported program's module refuses .eval(): it runs as it was exported.
        return torch.export.load(str(path)).module().to(device)
    if fmt == "torchscript":
        with warnings.catch_warnings():
            # torch.jit.load warns that TorchScript is deprecated: a supported format here.
            warnings.simplefilter("ignore", FutureWarning)
            return torch.jit.load(str(path), map_location=device).eval()
    raise RuntimeError(
        f"manifest.json: classifier format {fmt!r} is not torch.export or torchscript"
    )


class GradProbeHandler:
    """``initialize(context)`` once per worker, then ``handle(batch, context)`` per batch."""

    def __init__(self) -> None:
        self.initialized = False
        self.monitor: MonitorWorker | None = None

    def initialize(self, context: Any) -> None:
        model_dir = Path(context.system_properties["model_dir"])
        manifest = json.loads((model_dir / "manifest.json").read_text())
        path = model_dir / manifest["file"]
        actual = hashlib.sha256(path.read_bytes()).hexdigest()
        if actual != manifest["sha256"]:
            raise RuntimeError(
                f"{path.name} has sha256 {actual} but manifest.json says {manifest['sha256']}: "
                "the archive was altered; rebuild it with `gradprobe archive`"
            )
        self.spec = InputSpec.from_manifest(manifest)
        self.classes: list[str] = list(manifest["classes"])
        gpu_id = context.system_properties.get("gpu_id")
        use_cuda = torch.cuda.is_available() and gpu_id is not None
        self.device = torch.device(f"cuda:{gpu_id}" if use_cuda else "cpu")
        self.model = load_model(path, manifest["format"], self.device)
        # One forward pass now: a model that does not take the manifest's input, or answers
        # another number of classes, fails the worker's start rather than every request.
        answered = self._probabilities(np.zeros((1, *self.spec.shape), np.float32)).shape
        if answered != (1, len(self.classes)):
            raise RuntimeError(
                f"{path.name} answers shape {list(answered)} for one {list(self.spec.shape)} "
                f"image; manifest.json lists {len(self.classes)} classes"
            )
        yaml_config = getattr(context, "model_yaml_config", None) or {}
        self.config = HandlerConfig.from_sources(yaml_config.get("gradprobe"))
        self.link = ReliabilityLink(self.config, manifest["sha256"])
        if self.config.mode == "monitor":
            self.monitor = MonitorWorker(self.link, self.config.monitor_queue)
        log.info(
            "GradProbe handler ready: mode=%s target=%s model=%r timeout_ms=%g "
            "on_unreliable=%s on_unavailable=%s input=%s device=%s",
            self.config.mode,
            self.config.target,
            self.config.model,
            self.config.timeout_ms,
            self.config.on_unreliable,
            self.config.on_unavailable,
            list(self.spec.shape),
            self.device,
        )
        self.initialized = True

    def _probabilities(self, batch: np.ndarray) -> np.ndarray:
        """Softmax of the classifier for a float32 (n, C, H, W) batch in [0, 1]."""
        inputs = torch.from_numpy(self.spec.normalize(batch)).to(self.device)
        with torch.inference_mode():
            logits = self.model(inputs)
            if isinstance(logits, tuple | list):  # some TorchScript models return (logits, ...)
                logits = logits[0]
            return torch.softmax(logits, dim=1).cpu().numpy()

    def handle(self, data: list[Any], context: Any) -> list[dict[str, Any]]:
        responses: list[dict[str, Any]] = [{} for _ in data]
        images, valid = [], []
        for index, row in enumerate(data):
            try:
                images.append(decode_request(row, self.spec))
                valid.append(index)
            except BadInput as exc:
                _set_status(context, BAD_INPUT, str(exc), index)
                responses[index] = {"error": str(exc)}
        if not valid:
            return responses
        # GradProbe gets these [0, 1] pixels; only the classifier's own input is normalized.
        batch = np.stack(images)
        probabilities = self._probabilities(batch)
        for index, p in zip(valid, probabilities, strict=True):
            predicted = int(p.argmax())
            responses[index] = {
                "prediction": predicted,
                "class_name": self.classes[predicted],
                "probabilities": [round(float(v), 6) for v in p],
            }
        request_ids = [str(context.get_request_id(i) or i) for i in valid]
        if self.monitor is not None:
            status = self.monitor.submit(request_ids, batch)
            for index in valid:
                responses[index]["reliability"] = {"mode": "monitor", "status": status}
        else:
            self._gate(batch, valid, responses, context)
        return responses

    def _gate(
        self, batch: np.ndarray, valid: list[int], responses: list[dict[str, Any]], context: Any
    ) -> None:
        try:
            results = self.link.assess(batch)
        except ReliabilityUnavailable as exc:
            log.warning("reliability unavailable (gate mode): %s", exc)
            for index in valid:
                responses[index]["reliability"] = {
                    "mode": "gate",
                    "status": "unavailable",
                    "reason": str(exc),
                }
                if self.config.on_unavailable == "refuse":
                    message = f"reliability unavailable, prediction withheld: {exc}"
                    _set_status(context, RELIABILITY_UNAVAILABLE, message, index)
                    responses[index]["error"] = message
            return
        for index, result in zip(valid, results, strict=True):
            reliable = result["verdict"] == "in_distribution"
            responses[index]["reliability"] = {
                "mode": "gate",
                "status": "ok",
                "reliable": reliable,
                **result,
            }
            if not reliable and self.config.on_unreliable == "refuse":
                score = result["scores"][result["verdict"]]
                message = (
                    f"input refused: GradProbe judged it {result['verdict']} "
                    f"(score {score:.3f}), so the prediction is not reliable"
                )
                _set_status(context, REFUSED_UNRELIABLE, message, index)
                responses[index]["error"] = message
