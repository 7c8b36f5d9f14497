"""TorchServe handler: the classifier's predictions, with GradProbe's reliability verdict.

Serves the exported classifier (``classifier.pt2``, checked against ``manifest.json``) as
usual, and sends each batch to the GradProbe sidecar over gRPC:

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
        gpu_id = context.system_properties.get("gpu_id")
        use_cuda = torch.cuda.is_available() and gpu_id is not None
        self.device = torch.device(f"cuda:{gpu_id}" if use_cuda else "cpu")
        self.model = torch.export.load(path).module().to(self.device)
        self.classes: list[str] = manifest["classes"]
        yaml_config = getattr(context, "model_yaml_config", None) or {}
        self.config = HandlerConfig.from_sources(yaml_config.get("gradprobe"))
        self.link = ReliabilityLink(self.config, manifest["sha256"])
        if self.config.mode == "monitor":
            self.monitor = MonitorWorker(self.link, self.config.monitor_queue)
        log.info(
            "GradProbe handler ready: mode=%s target=%s timeout_ms=%g on_unreliable=%s "
            "on_unavailable=%s device=%s",
            self.config.mode,
            self.config.target,
            self.config.timeout_ms,
            self.config.on_unreliable,
            self.config.on_unavailable,
            self.device,
        )
        self.initialized = True

    def handle(self, data: list[Any], context: Any) -> list[dict[str, Any]]:
        responses: list[dict[str, Any]] = [{} for _ in data]
        images, valid = [], []
        for index, row in enumerate(data):
            try:
                images.append(decode_request(row))
                valid.append(index)
            except BadInput as exc:
                _set_status(context, BAD_INPUT, str(exc), index)
                responses[index] = {"error": str(exc)}
        if not valid:
            return responses
        batch = np.stack(images)
        with torch.inference_mode():
            logits = self.model(torch.from_numpy(batch).to(self.device))
            probabilities = torch.softmax(logits, dim=1).cpu().numpy()
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
