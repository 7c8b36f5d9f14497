"""The gRPC reliability server: thin servicers over ``Assessor``, a micro-batcher in front of
it, health, reflection, Prometheus metrics and a graceful shutdown on SIGTERM.

Every request is decoded and validated on its own handler thread before it joins a
micro-batch, so a malformed request fails alone and never reaches the model. Errors are raised
as exceptions and mapped to statuses in one place (``service.errors.StatusInterceptor``).
"""

from __future__ import annotations

import functools
import io
import logging
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from detectors.spec import ModelSpec
from service._proto.gradprobe.v1 import reliability_pb2 as pb
from service._proto.gradprobe.v1 import reliability_pb2_grpc as pb_grpc
from service.assessor import VERDICTS, Assessment, Assessor, MemoryCap, within_memory
from service.batcher import BatchOutput, JobResult, MicroBatcher
from service.errors import (
    DeadlineExceeded,
    MalformedRequest,
    NotReady,
    OutOfMemory,
    ServiceError,
    StatusInterceptor,
    UnknownModel,
    echo,
    log_if_unexpected,
    status_for,
)
from service.inputs import InvalidInput, to_model_input
from service.metrics import ModelMetrics, ServiceMetrics
from service.security import load_security
from service.settings import Settings

log = logging.getLogger("gradprobe.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Reliability"].full_name
try:
    from PIL.Image import DecompressionBombError as _DecompressionBomb
except ImportError:  # pragma: no cover - every supported Pillow has it
    _DecompressionBomb = ValueError  # type: ignore[misc,assignment]
# A resizing model still refuses encoded images past this many times its own area, unread.
_MAX_RESIZE_FACTOR = 16
_RAW_DTYPES = {pb.RawPixels.UINT8: np.dtype(np.uint8), pb.RawPixels.FLOAT32: np.dtype("<f4")}
_ENCODED_FORMATS = ("PNG", "JPEG")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# PNG chunks Pillow inflates while opening a file, text and the colour profile: up to 64 MB
# (and half a second) from 60 KB of zTXt. The pixels never depend on them: dropped unread.
_PNG_INFLATED_CHUNKS = frozenset({b"zTXt", b"iTXt", b"iCCP"})
# Walking a PNG's chunks is a Python loop: 4 MB of empty 12-byte chunks (350,000) held the GIL
# for most of a second. Real files have a few chunks plus their image data's, which encoders
# write 8 KB (libpng) to 64 KB (Pillow) at a time; past this bound, with room for 4 KB ones, a
# file is refused before the walk goes on.
_PNG_MAX_CHUNKS = 1000
_PNG_BYTES_PER_CHUNK = 4096
# Named in the refusal of other formats; only PNG's and JPEG's parsers ever see the bytes.
_OTHER_SIGNATURES = (
    (b"GIF8", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"RIFF", "WebP or another RIFF file"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"\x00\x00\x00\x0cjP", "JPEG 2000"),
    (b"%PDF", "PDF"),
)
_VERDICT_ENUM = {name: pb.Verdict.Value(name.upper()) for name in VERDICTS}
STREAM_WINDOW = 64  # requests of one stream in flight at once (back-pressure on the reader)
STREAM_POLL_S = 0.1  # how often an idle stream checks that its client is still there


# ----------------------------------------------------------------------------- decoding


def decode_images(images: Sequence[pb.Image], max_images: int, spec: ModelSpec) -> np.ndarray:
    """A request's images as a validated float32 batch (n, C, H, W) in [0, 1]."""
    count = len(images)
    if not count:
        raise InvalidInput("the request holds no images: send at least one")
    if count > max_images:
        raise InvalidInput(
            f"{count} images in one request; this server accepts at most {max_images}: "
            "split them over several requests (or use AssessStream)"
        )
    # Each image goes straight into its slot of the batch (no per-image arrays to stack).
    batch = np.empty((count, *spec.input_shape), dtype=np.float32)
    floats = False
    for index, image in enumerate(images):
        plane = _decode_one(index, image, spec)
        if plane.dtype == np.uint8:
            # As ``to_model_input`` converts uint8 pixels: float32, divided by 255.
            np.divide(plane, np.float32(255.0), out=batch[index], dtype=np.float32)
        else:
            batch[index] = plane
            floats = True
    if floats:
        # One pass for the common case; NaN, infinities and out-of-range values all fail it,
        # and the full check then says which image is wrong and how.
        low, high = batch.min(), batch.max()
        if not (low >= 0.0 and high <= 1.0):
            to_model_input(batch, spec)
    return batch


def _decode_one(index: int, image: pb.Image, spec: ModelSpec) -> np.ndarray:
    """One image as (C, H, W) uint8 or float32, unconverted."""
    which = image.WhichOneof("content")
    if which == "raw":
        return _decode_raw(index, image.raw, spec)
    if which == "encoded":
        return _decode_encoded(index, image.encoded, spec)
    raise InvalidInput(
        f"image {index} is empty: set `raw` (pixels, shape and dtype) or `encoded` "
        "(PNG or JPEG bytes)"
    )


def _raw_shapes(spec: ModelSpec, dtype: np.dtype) -> list[list[int]]:
    """Accepted ``RawPixels.shape`` values: [C, H, W], [H, W] for one channel, and channels
    last [H, W, C] for 8-bit colour (as cameras and PIL give them)."""
    c, h, w = spec.input_shape
    shapes = [[c, h, w]]
    if c == 1:
        shapes.append([h, w])
    elif dtype == np.uint8:
        shapes.append([h, w, c])
    return shapes


def _dtype_name(value: int) -> str:
    # Enums are open in proto3: a client may send a number this server has no name for.
    if value in pb.RawPixels.DType.values():
        return pb.RawPixels.DType.Name(value)
    return f"{value} (not a DType)"


def _decode_raw(index: int, raw: pb.RawPixels, spec: ModelSpec) -> np.ndarray:
    if raw.dtype not in _RAW_DTYPES:
        raise InvalidInput(
            f"image {index}: dtype is {_dtype_name(raw.dtype)}; set it to UINT8 "
            "(pixels 0..255) or FLOAT32 (little-endian, in [0, 1])"
        )
    dtype = _RAW_DTYPES[raw.dtype]
    shape = list(raw.shape)
    accepted = _raw_shapes(spec, dtype)
    if shape not in accepted:
        kind = "grayscale" if spec.channels == 1 else "RGB"
        raise InvalidInput(
            f"image {index}: shape is {echo(shape)}; this model takes "
            f"{' or '.join(map(str, accepted))} for {pb.RawPixels.DType.Name(raw.dtype)} "
            f"pixels (one {kind} image per Image; send several Images for a batch)"
        )
    expected = spec.pixels * dtype.itemsize
    if len(raw.data) != expected:
        hint = ""
        if dtype.itemsize == 4 and len(raw.data) == 2 * expected:
            hint = " (that is float64: cast with .astype(np.float32))"
        elif dtype.itemsize == 1 and len(raw.data) == 4 * expected:
            hint = " (that looks like float32 pixels: set dtype FLOAT32)"
        raise InvalidInput(
            f"image {index}: {echo(shape)} {pb.RawPixels.DType.Name(raw.dtype)} pixels take "
            f"{expected} bytes; got {len(raw.data)}{hint}"
        )
    pixels = np.frombuffer(raw.data, dtype=dtype)
    if shape == [spec.height, spec.width, spec.channels] and shape != list(spec.input_shape):
        return pixels.reshape(shape).transpose(2, 0, 1)  # channels last
    return pixels.reshape(spec.input_shape)


def _without_inflated_chunks(data: bytes, index: int = 0) -> bytes:
    """A PNG file (image ``index`` of its request) without its compressed text and colour
    profile chunks (other bytes as they are, a broken chunk structure included: Pillow
    refuses that). ``InvalidInput`` for far more chunks than an encoder writes."""
    if not data.startswith(_PNG_SIGNATURE):
        return data
    limit = _PNG_MAX_CHUNKS + len(data) // _PNG_BYTES_PER_CHUNK
    kept, at, dropped, chunks = [data[:8]], 8, False, 0
    while at + 8 <= len(data):
        chunks += 1
        if chunks > limit:
            raise InvalidInput(
                f"image {index}: the PNG holds more than {limit} chunks; encoders write a few "
                "plus the image data's (8 KB or more each): re-encode the image"
            )
        end = at + 12 + int.from_bytes(data[at : at + 4], "big")  # length, type, data, CRC
        if data[at + 4 : at + 8] in _PNG_INFLATED_CHUNKS:
            dropped = True
        else:
            kept.append(data[at:end])
        at = end
    kept.append(data[at:])
    return b"".join(kept) if dropped else data


def _decode_encoded(index: int, data: bytes, spec: ModelSpec) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    other = next((name for magic, name in _OTHER_SIGNATURES if data.startswith(magic)), None)
    if other is not None:
        raise InvalidInput(f"image {index}: encoded images must be PNG or JPEG; got {other}")
    try:
        # Only PNG's and JPEG's parsers: Pillow would otherwise try each of its formats' on
        # the client's bytes, parsers this server never needs to expose.
        data = _without_inflated_chunks(data, index)
        with Image.open(io.BytesIO(data), formats=_ENCODED_FORMATS) as decoded:
            if decoded.format not in _ENCODED_FORMATS:
                raise InvalidInput(
                    f"image {index}: encoded images must be PNG or JPEG; got {decoded.format}"
                )
            # Checked from the header, before any pixel is decoded: a huge image is refused
            # unread, and a resizing model decodes at most a bounded number of pixels.
            width, height = decoded.size
            if (width, height) != (spec.width, spec.height) and (
                not spec.resize or width * height > _MAX_RESIZE_FACTOR * spec.height * spec.width
            ):
                allowed = " at most 16x the area" if spec.resize else ""
                raise InvalidInput(
                    f"image {index}: the {decoded.format} is {width}×{height} pixels; this model "
                    f"takes {spec.width}×{spec.height}{allowed} (resize it before sending)"
                )
            image = decoded.convert("L" if spec.channels == 1 else "RGB")
            if image.size != (spec.width, spec.height):
                image = image.resize((spec.width, spec.height), Image.Resampling.BILINEAR)
            pixels = np.asarray(image, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, _DecompressionBomb) as exc:
        if isinstance(exc, InvalidInput):
            raise
        raise InvalidInput(
            f"image {index}: the encoded bytes are not a readable PNG or JPEG ({exc})"
        ) from None
    return pixels.reshape(spec.height, spec.width, spec.channels).transpose(2, 0, 1)


# ----------------------------------------------------------------------------- responses


def _timings(job: JobResult, decode_ms: float, arrived: float) -> dict[str, float]:
    return {
        "decode": decode_ms,
        **job.timings_ms,
        "total": (time.monotonic() - arrived) * 1000,
    }


def _timings_message(timings: dict[str, float], batch_size: int) -> pb.Timings:
    return pb.Timings(
        decode_ms=timings.get("decode", 0.0),
        queue_ms=timings.get("queue", 0.0),
        forward_ms=timings.get("forward", 0.0),
        gradients_ms=timings.get("gradients", 0.0),
        detector_ms=timings.get("detector", 0.0),
        squeeze_ms=timings.get("squeeze", 0.0),
        total_ms=timings.get("total", 0.0),
        batch_size=batch_size,
    )


def _assessment_message(
    assessment: Assessment, classes: Sequence[str], timings: pb.Timings
) -> pb.ImageAssessment:
    return pb.ImageAssessment(
        predicted_class=assessment.prediction,
        predicted_name=classes[assessment.prediction],
        probabilities=assessment.probabilities.tolist(),
        verdict=_VERDICT_ENUM[assessment.verdict],
        scores=pb.Scores(**assessment.scores),
        timings=timings,
    )


# ----------------------------------------------------------------------------- threads


class _ComputeThreads:
    """The math libraries' thread pools while a server runs; ``restore`` puts them back.

    On a CPU server the gRPC threads, torch's intra-op pool and the BLAS pool that numpy uses
    (the detector's featurizer) share the same cores. Oversubscribed, the pools' spinning
    workers stall each other: on 2 cores with another process busy on one, a one-image
    Assess went from 6 ms to over 500 ms with the default pools. BLAS, whose matrices here are
    tiny, gets one thread; torch gets ``threads`` for micro-batches of ``SMALL_BATCH`` images
    or more, and one below, where the ops are too small to split and the pool's
    synchronization costs more than it gives.
    """

    SMALL_BATCH = 8

    def __init__(self, threads: int) -> None:
        import torch
        from threadpoolctl import threadpool_limits

        self.threads = threads
        self._torch_before = torch.get_num_threads()
        # Taken before torch's change: restoring it puts back every pool it saw, OpenMP too.
        self._blas = threadpool_limits(limits=1, user_api="blas")
        self._current = 1
        torch.set_num_threads(1)

    def use(self, images: int) -> None:
        """Set torch's threads for a pass over ``images`` images (from the compute thread)."""
        threads = self.threads if images >= self.SMALL_BATCH else 1
        if threads != self._current:
            import torch

            torch.set_num_threads(threads)
            self._current = threads

    def restore(self) -> None:
        import torch

        self._blas.restore_original_limits()
        torch.set_num_threads(self._torch_before)


# ----------------------------------------------------------------------------- servicer

NO_DEADLINE_S = 365 * 24 * 3600.0


def _time_remaining(context: grpc.ServicerContext) -> float | None:
    """Seconds to the client's deadline, None without one (grpc then reports ~2**63 s,
    which no timeout accepts)."""
    remaining = context.time_remaining()
    return None if remaining is None or remaining > NO_DEADLINE_S else remaining


@dataclass
class ServedModel:
    """One model of the server: its assessor and its own micro-batcher (batches never mix
    models)."""

    name: str
    assessor: Assessor
    batcher: MicroBatcher
    metrics: ModelMetrics

    @property
    def spec(self) -> ModelSpec:
        return self.assessor.spec


class ReliabilityServicer(pb_grpc.ReliabilityServicer):
    """The RPCs, over one or more served models. Until ``attach`` has run (models loaded and
    warmed up) they answer UNAVAILABLE."""

    def __init__(self, settings: Settings, metrics: ServiceMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.models: dict[str, ServedModel] = {}
        self._threads: _ComputeThreads | None = None
        # One pass at a time across models: they share the cores and the thread pools.
        self._compute_lock = threading.Lock()
        cap = settings.simulate_memory_cap
        self._memory_cap = MemoryCap(cap) if cap else None  # fault tests only

    # -- life cycle

    def attach(self, assessors: Assessor | Sequence[Assessor]) -> None:
        """Warm every model up, then start its batcher: the server is ready after this."""
        if isinstance(assessors, Assessor):
            assessors = [assessors]
        names = [a.name for a in assessors]
        if len(set(names)) != len(names):
            raise ValueError(f"two served models share a name: {names}; give each its own")
        if self._threads is None:
            self._threads = _ComputeThreads(self.settings.resolved_compute_threads())
        rng = np.random.default_rng(0)
        for assessor in assessors:
            for size in sorted({1, min(8, self.settings.max_batch_size)}):
                warm = rng.random((size, *assessor.spec.input_shape), dtype=np.float32)
                assessor.assess(warm)
                assessor.predict(warm)
        models = {}
        for assessor in assessors:
            metrics = self.metrics.add_model(
                assessor.name,
                classifier_version=assessor.classifier.model_dir.name,
                classifier_sha256=assessor.classifier.manifest.sha256,
                detector_version=assessor.detector.version,
                detector_sha256=assessor.detector.sha256,
                device=assessor.device,
            )
            batcher = MicroBatcher(
                {
                    "assess": functools.partial(self._assess_batch, assessor, metrics),
                    "predict": functools.partial(self._predict_batch, assessor, metrics),
                },
                max_batch_size=self.settings.max_batch_size,
                max_wait_ms=self.settings.max_wait_ms,
                max_queue=self.settings.max_queue,
                batching=self.settings.batching,
                observer=metrics,
            )
            batcher.start()
            models[assessor.name] = ServedModel(assessor.name, assessor, batcher, metrics)
        self.models = models

    def close(self, timeout: float | None = None) -> None:
        for model in self.models.values():
            model.batcher.stop(timeout)
        if self._threads is not None:
            self._threads.restore()
            self._threads = None

    @property
    def assessor(self) -> Assessor | None:
        """The first served model's assessor (the only one, in the common case)."""
        return next(iter(self.models.values())).assessor if self.models else None

    @property
    def batcher(self) -> MicroBatcher | None:
        return next(iter(self.models.values())).batcher if self.models else None

    def _assess_batch(
        self, assessor: Assessor, metrics: ModelMetrics, images: np.ndarray
    ) -> BatchOutput:
        assert self._threads is not None
        threads = self._threads

        def run(part: np.ndarray) -> tuple[list[Assessment], dict[str, float]]:
            threads.use(len(part))
            batch = assessor.assess(part)
            return batch.assessments, batch.timings_ms

        return self._within_memory("Assess", assessor, metrics, run, images)

    def _predict_batch(
        self, assessor: Assessor, metrics: ModelMetrics, images: np.ndarray
    ) -> BatchOutput:
        assert self._threads is not None
        threads = self._threads

        def run(part: np.ndarray) -> tuple[np.ndarray, dict[str, float]]:
            threads.use(len(part))
            start = time.perf_counter()
            probabilities = assessor.predict(part)
            return probabilities, {"forward": (time.perf_counter() - start) * 1000}

        return self._within_memory("Predict", assessor, metrics, run, images)

    def _within_memory(
        self,
        what: str,
        assessor: Assessor,
        metrics: ModelMetrics,
        run: Callable[[np.ndarray], tuple[Sequence[Any], dict[str, float]]],
        images: np.ndarray,
    ) -> BatchOutput:
        """``run`` over a micro-batch, split in halves while the accelerator runs out of
        memory; an image that does not fit even alone gets ``OutOfMemory`` in its place, which
        fails its request only (the batcher answers the others with their results)."""
        with self._compute_lock:
            done = within_memory(run, images, memory_cap=self._memory_cap)
        for _ in done.splits:
            metrics.observe_memory_split()
        if done.reason:  # once per micro-batch, however many splits it took
            log.warning(
                "%s: %s of %d images ran out of accelerator memory (%s): split %d times; "
                "images that failed even alone: %d (their requests: RESOURCE_EXHAUSTED)",
                assessor.name,
                what,
                len(images),
                done.reason,
                len(done.splits),
                done.failed,
            )
        results = [OutOfMemory() if r is None else r for r in done.results]
        return BatchOutput(results, done.timings_ms)

    # -- shared steps

    def _model(self, name: str) -> ServedModel:
        if not self.models:
            raise NotReady("the model is still loading or warming up; retry shortly")
        if not name:
            if len(self.models) == 1:
                return next(iter(self.models.values()))
            raise InvalidInput(
                f"this server serves {len(self.models)} models: name one in the request's "
                f"`model` field ({', '.join(sorted(self.models))})"
            )
        if name not in self.models:
            raise UnknownModel(
                f"no model named {echo(name)} is served here; the models are: "
                f"{', '.join(sorted(self.models))} (see ListModels)"
            )
        return self.models[name]

    def _submit(
        self,
        kind: str,
        images: Sequence[pb.Image],
        model_name: str,
        context: grpc.ServicerContext,
    ) -> tuple[ServedModel, futures.Future, float]:
        """Decode and validate, then queue; returns the model, the future and the decode
        time (ms)."""
        model = self._model(model_name)
        limit = self.settings.max_images_per_request
        if not 0 < len(images) <= limit:
            decode_images(images, limit, model.spec)  # refuses the count, allocating nothing
        with model.batcher.admitting(len(images)):
            start = time.monotonic()
            batch = decode_images(images, limit, model.spec)
            decode_ms = (time.monotonic() - start) * 1000
            remaining = _time_remaining(context)
            deadline = None if remaining is None else time.monotonic() + remaining
            future = model.batcher.submit(
                kind, batch, deadline=deadline, is_active=context.is_active
            )
        return model, future, decode_ms

    @staticmethod
    def _wait(future: futures.Future, context: grpc.ServicerContext) -> JobResult:
        try:
            return future.result(timeout=_time_remaining(context))
        except futures.TimeoutError:
            raise DeadlineExceeded("the deadline passed before the request was computed") from None

    def _assess_response(
        self, model: ServedModel, job: JobResult, decode_ms: float, arrived: float, request_id: str
    ) -> pb.AssessResponse:
        classes = model.assessor.classes
        timings = _timings(job, decode_ms, arrived)
        message = _timings_message(timings, job.batch_size)
        model.metrics.observe_stages("assess", timings)
        model.metrics.observe_assessments(job.results, classes)
        return pb.AssessResponse(
            results=[_assessment_message(a, classes, message) for a in job.results],
            request_id=request_id,
        )

    # -- RPCs

    def Assess(self, request: pb.AssessRequest, context: grpc.ServicerContext) -> pb.AssessResponse:
        arrived = time.monotonic()
        model, future, decode_ms = self._submit("assess", request.images, request.model, context)
        job = self._wait(future, context)
        return self._assess_response(model, job, decode_ms, arrived, request.request_id)

    def AssessStream(
        self, request_iterator: Iterator[pb.AssessRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.AssessResponse]:
        if not self.models:
            raise NotReady("the model is still loading or warming up; retry shortly")
        # A reader thread queues requests as they arrive, so a stream's requests batch
        # together; answers are yielded in request order.
        pending: queue.Queue[Any] = queue.Queue(maxsize=STREAM_WINDOW)
        end = object()
        reader_done = threading.Event()

        def put(item: Any) -> None:
            while context.is_active():
                try:
                    pending.put(item, timeout=0.1)
                    return
                except queue.Full:
                    continue

        def read() -> None:
            try:
                for request in request_iterator:
                    arrived = time.monotonic()
                    if isinstance(request, MalformedRequest):  # bytes that did not parse
                        put(("", arrived, InvalidInput(request.message)))
                        continue
                    try:
                        submitted: Any = self._submit(
                            "assess", request.images, request.model, context
                        )
                    except Exception as exc:
                        submitted = exc
                    put((request.request_id, arrived, submitted))
            except Exception as exc:  # the client went away mid-stream
                log.debug("AssessStream reader stopped: %s", exc)
            finally:
                reader_done.set()
                put(end)  # skipped when the client is gone: the loop below sees that itself

        threading.Thread(target=read, name="gradprobe-stream-reader", daemon=True).start()
        while True:
            try:
                item = pending.get(timeout=STREAM_POLL_S)
            except queue.Empty:
                # A client that cancels or disconnects ends the stream without `end` being
                # queued; waiting on regardless would hold this handler thread forever (and
                # the process at exit, which joins the gRPC thread pool).
                if not context.is_active() or (reader_done.is_set() and pending.empty()):
                    return
                continue
            if item is end:
                return
            request_id, arrived, submitted = item
            try:
                if isinstance(submitted, Exception):
                    raise submitted
                model, future, decode_ms = submitted
                job = self._wait(future, context)
                yield self._assess_response(model, job, decode_ms, arrived, request_id)
            except Exception as exc:
                log_if_unexpected(exc, "AssessStream")
                code, message = status_for(exc)
                yield pb.AssessResponse(
                    request_id=request_id,
                    error=pb.RequestError(code=code.value[0], message=message),
                )

    def Predict(
        self, request: pb.PredictRequest, context: grpc.ServicerContext
    ) -> pb.PredictResponse:
        arrived = time.monotonic()
        model, future, decode_ms = self._submit("predict", request.images, request.model, context)
        job = self._wait(future, context)
        classes = model.assessor.classes
        timings = _timings(job, decode_ms, arrived)
        model.metrics.observe_stages("predict", timings)
        predictions = []
        for p in job.results:
            best = int(p.argmax())
            predictions.append(
                pb.Prediction(
                    predicted_class=best,
                    predicted_name=classes[best],
                    probabilities=p.tolist(),
                )
            )
        return pb.PredictResponse(
            predictions=predictions,
            timings=_timings_message(timings, job.batch_size),
        )

    def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.ServicerContext
    ) -> pb.ModelInfo:
        return self._info(self._model(request.model))

    def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.ServicerContext
    ) -> pb.ListModelsResponse:
        if not self.models:
            raise NotReady("the models are still loading or warming up; retry shortly")
        return pb.ListModelsResponse(models=[self._info(m) for m in self.models.values()])

    def _info(self, model: ServedModel) -> pb.ModelInfo:
        assessor = model.assessor
        return pb.ModelInfo(
            name=model.name,
            classes=assessor.classes,
            input_shape=list(model.spec.input_shape),
            classifier_version=assessor.classifier.model_dir.name,
            classifier_sha256=assessor.classifier.manifest.sha256,
            detector_version=assessor.detector.version,
            detector_sha256=assessor.detector.sha256,
            verdicts=list(VERDICTS),
            max_images_per_request=self.settings.max_images_per_request,
            device=assessor.device,
            resizes_encoded=model.spec.resize,
        )


# ----------------------------------------------------------------------------- server


class ReliabilityServer:
    """A gRPC server with the Reliability, Health and reflection services.

    ``start`` listens at once (health NOT_SERVING, RPCs UNAVAILABLE); ``load`` attaches the
    model, warms it up and turns health SERVING; ``stop`` drains.
    """

    def __init__(self, settings: Settings, metrics: ServiceMetrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or ServiceMetrics()
        self.servicer = ReliabilityServicer(settings, self.metrics)
        # TLS and token files are read and checked here, once (SecurityConfigError if bad).
        self.security = load_security(settings)
        self.health = health.HealthServicer(
            experimental_non_blocking=True,
            experimental_thread_pool=futures.ThreadPoolExecutor(max_workers=1),
        )
        size = settings.max_message_bytes
        self._server = grpc.server(
            futures.ThreadPoolExecutor(
                max_workers=settings.workers, thread_name_prefix="gradprobe-rpc"
            ),
            # Access checks inside the status mapping: refused calls are counted too.
            interceptors=[
                StatusInterceptor(self.metrics.observe_request),
                *self.security.interceptors(),
            ],
            options=[
                ("grpc.max_receive_message_length", size),
                ("grpc.max_send_message_length", size),
                ("grpc.so_reuseport", 0),  # a busy port is an error, not a shared one
            ],
        )
        pb_grpc.add_ReliabilityServicer_to_server(self.servicer, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server
        )
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.health_port: int | None = None
        self._health_server: grpc.Server | None = None

    @property
    def target(self) -> str:
        return f"{self.settings.host}:{self.port}"

    def start(self) -> None:
        address = f"{self.settings.host}:{self.settings.port}"
        self.port = _listen(self._server, address, self.security.credentials, "gRPC", "--port")
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self._server.start()
        if self.settings.health_port >= 0:
            # Health alone, in plaintext, for probes that cannot do TLS: it tells only the
            # status of "" and of the Reliability service (other names: unknown).
            self._health_server = grpc.server(
                futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="gradprobe-health"),
                options=[("grpc.so_reuseport", 0)],
            )
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self._health_server)
            address = f"{self.settings.host}:{self.settings.health_port}"
            try:
                self.health_port = _listen(
                    self._health_server, address, None, "health checks", "--health-port"
                )
            except OSError:
                self._server.stop(0)
                raise
            self._health_server.start()
        if self.settings.metrics_port >= 0:
            host, port = self.settings.host, self.settings.metrics_port
            try:
                self.metrics_port = self.metrics.serve(port, host)
            except OSError as exc:
                self.stop(grace=0)
                address, reason = f"{host}:{port}", exc.strerror or str(exc)
                raise PortUnavailable(address, "metrics", "--metrics-port", reason) from None

    def load(
        self,
        assessor: Assessor | Sequence[Assessor] | Callable[[], Assessor | Sequence[Assessor]],
    ) -> None:
        """Attach the models (loading them first when given a loader), warm up, then
        SERVING."""
        if callable(assessor) and not isinstance(assessor, Assessor):
            assessor = assessor()
        self.servicer.attach(assessor)
        self._set_health(health_pb2.HealthCheckResponse.SERVING)

    def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING, refuse new RPCs, let in-flight ones finish within ``grace`` seconds."""
        grace = self.settings.grace_s if grace is None else grace
        # grpc-health sends NOT_SERVING to every open Watch while holding its lock, and a
        # send to a watcher that stopped reading (or is being cancelled) can block until the
        # server stops: the shutdown must not wait on a client, so it goes on after a second.
        announce = threading.Thread(
            target=self.health.enter_graceful_shutdown, name="gradprobe-health-stop", daemon=True
        )
        announce.start()
        announce.join(timeout=1.0)
        self._server.stop(grace).wait()
        announce.join(timeout=1.0)
        if self._health_server is not None:
            self._health_server.stop(0).wait()
        self.servicer.close(timeout=grace)
        self.metrics.stop()

    def _set_health(self, status: int) -> None:
        for name in ("", SERVICE_NAME):
            self.health.set(name, status)


class PortUnavailable(OSError):
    """A port the server was told to listen on cannot be bound; the message names the flag
    that sets it (the CLI reports it in one line)."""

    def __init__(self, address: str, what: str, flag: str, reason: str) -> None:
        super().__init__(
            f"cannot listen on {address} for {what} ({reason}): another process may hold the "
            f"port; stop it, or choose another port with {flag} (0: any free port)"
        )


def _listen(
    server: grpc.Server,
    address: str,
    credentials: grpc.ServerCredentials | None,
    what: str,
    flag: str,
) -> int:
    """Bind ``address`` (TLS with ``credentials``); returns the port. ``what`` and ``flag``
    name the port in the error."""
    try:
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError:
        port = 0  # gRPC's message only says to turn on its debug logs
    if port == 0:
        raise PortUnavailable(address, what, flag, "the address is in use or not available")
    return port


def load_assessors(settings: Settings) -> list[Assessor]:
    """The settings' model dirs (or the built-in example) on the settings' device, each with
    its detector H; nothing is trained here."""
    from service.registry import load_assessors as load

    return load(settings.model_dirs, settings.resolved_device(), quiet=settings.quiet)


def serve(
    settings: Settings,
    assessor: Assessor | Sequence[Assessor] | Callable[[], Assessor | Sequence[Assessor]],
) -> int:
    """Run a server until SIGTERM or SIGINT, then drain and return 0.

    Prints ``gradprobe serve: ready on HOST:PORT`` to stderr once health is SERVING.
    """
    logging.basicConfig(
        level=logging.WARNING if settings.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    stopping = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopping.set())
    server = ReliabilityServer(settings)
    server.start()
    log.info(
        "listening on %s (%s; metrics port %s, health port %s); loading the model",
        server.target,
        server.security.describe(),
        server.metrics_port,
        server.health_port,
    )
    try:
        server.load(assessor)
    except Exception:
        server.stop(grace=0)
        raise
    metrics = f", metrics on {settings.host}:{server.metrics_port}" if server.metrics_port else ""
    print(f"gradprobe serve: ready on {server.target}{metrics}", file=sys.stderr, flush=True)
    while not stopping.wait(0.5):
        pass
    log.info("shutting down: draining in-flight requests (grace %.1fs)", settings.grace_s)
    server.stop()
    log.info("stopped")
    return 0


__all__ = [
    "PortUnavailable",
    "ReliabilityServer",
    "ReliabilityServicer",
    "ServiceError",
    "decode_images",
    "load_assessors",
    "serve",
]
