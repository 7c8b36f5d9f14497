"""One exception hierarchy for the service, mapped to gRPC status codes in one place.

Servicer code raises; ``StatusInterceptor`` turns the exception into the RPC's status (in the
style of KServe's exception → status mapping). Client mistakes keep their message, since it
says what to fix (capped in length: it travels in the status trailer); anything unexpected
becomes INTERNAL with a generic message, and the traceback goes to the server log only.
"""

from __future__ import annotations

import logging
import reprlib
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from service.inputs import InvalidInput

log = logging.getLogger("gradprobe.server")

SERVICE_PREFIX = "/gradprobe.v1.Reliability/"
INTERNAL_MESSAGE = "internal error while assessing the request; see the server log"
# The message travels percent-encoded in the status trailer, which the client refuses past its
# metadata limit (by default 8 KiB, refused at random, to 16 KiB, always: it then sees
# RESOURCE_EXHAUSTED "received metadata size exceeds hard limit" in place of the status).
# Counted in UTF-8 bytes, each of which encodes to at most 3 characters, so even a message of
# non-ASCII characters or "%" stays well under it.
MAX_MESSAGE_BYTES = 1000
OUT_OF_MEMORY_MESSAGE = (
    "out of accelerator memory even for one image alone; retry later, when other work on the "
    "device has finished, or ask the server's operator for a device with more free memory"
)


class ServiceError(Exception):
    """Base of the errors a request can meet in the service."""


class NotReady(ServiceError):
    """The model is still loading or warming up, or the server is shutting down."""


class UnknownModel(ServiceError):
    """The request names a model this server does not serve."""


class Overloaded(ServiceError):
    """The queue is full: retry later, with backoff."""


class DeadlineExceeded(ServiceError):
    """The request's deadline passed before it was computed."""


class Cancelled(ServiceError):
    """The client went away before the request was computed."""


class OutOfMemory(ServiceError):
    """An image that alone does not fit in the accelerator's memory.

    The message is generic: the device's own (CUDA's names the device's memory and other
    processes' use of it) goes to the server log only.
    """

    def __init__(self) -> None:
        super().__init__(OUT_OF_MEMORY_MESSAGE)


_ECHO = reprlib.Repr()
_ECHO.maxlist = _ECHO.maxtuple = 8
_ECHO.maxstring = 80
_ECHO.maxother = 80


def echo(value: object) -> str:
    """``repr(value)`` shortened (reprlib-style: ``[7, 7, 7, ...]``, ``'mmm...mmm'``), for
    client-supplied values quoted in error messages."""
    return _ECHO.repr(value)


# Order matters only for subclasses; InvalidInput is the one shared with the CLI.
_STATUS: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),
    (UnknownModel, grpc.StatusCode.NOT_FOUND),
    (NotReady, grpc.StatusCode.UNAVAILABLE),
    (Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (OutOfMemory, grpc.StatusCode.RESOURCE_EXHAUSTED),  # even one image: the device is full
    (DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (Cancelled, grpc.StatusCode.CANCELLED),
)


class MalformedRequest:
    """What a request's deserializer gives for bytes that are not the method's message.

    gRPC answers a request that does not parse with INTERNAL ("Exception deserializing
    request!"), a server fault, for what is the client's mistake; ``StatusInterceptor`` parses
    leniently instead and refuses this with INVALID_ARGUMENT (a stream's servicer may answer
    it as one failed request and go on).
    """

    def __init__(self, reason: str) -> None:
        message = f"the request is not a valid protobuf message of this method ({reason})"
        self.message = capped(message)


def _lenient(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserialize is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as exc:  # DecodeError, invalid UTF-8 in a string field, ...
            return MalformedRequest(str(exc) or type(exc).__name__)

    return parse


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status and the client-facing message for an exception (at most
    ``MAX_MESSAGE_BYTES`` of UTF-8)."""
    for kind, code in _STATUS:
        if isinstance(exc, kind):
            return code, capped(str(exc))
    return grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE


def capped(message: str, limit: int = MAX_MESSAGE_BYTES) -> str:
    """``message`` cut to ``limit`` bytes of UTF-8, ending with "…" when cut: a backstop for
    values a message quotes without shortening them."""
    data = message.encode()
    if len(data) <= limit:
        return message
    ellipsis = "…"
    room = limit - len(ellipsis.encode())
    return data[:room].decode(errors="ignore") + ellipsis


def log_if_unexpected(exc: BaseException, method: str) -> None:
    if status_for(exc)[0] is grpc.StatusCode.INTERNAL:
        log.error("%s failed", method, exc_info=exc)


# (method, status code, the request's `model` field: "" for streams and when unset)
StatusObserver = Callable[[str, grpc.StatusCode, str], None]


class StatusInterceptor(grpc.ServerInterceptor):
    """Maps exceptions raised by Reliability methods to statuses, and reports each RPC's
    final status to ``observe(method, code)`` (the requests counter)."""

    def __init__(self, observe: StatusObserver | None = None) -> None:
        self._observe = observe or (lambda method, code, model: None)

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        full_name = handler_call_details.method
        if handler is None:
            return handler
        if not full_name.startswith(SERVICE_PREFIX):
            return _refusing_malformed(handler)  # health, reflection
        method = full_name.removeprefix(SERVICE_PREFIX)
        common = {
            "request_deserializer": _lenient(handler.request_deserializer),
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(method, handler.unary_unary), **common
            )
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                self._streaming(method, handler.stream_stream), **common
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._streaming(method, handler.unary_stream), **common
            )
        return grpc.stream_unary_rpc_method_handler(
            self._unary(method, handler.stream_unary), **common
        )

    def _unary(self, method: str, behavior: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(request: Any, context: grpc.ServicerContext) -> Any:
            model = getattr(request, "model", "")
            try:
                if isinstance(request, MalformedRequest):
                    raise InvalidInput(request.message)
                response = behavior(request, context)
            except Exception as exc:
                self._abort(method, exc, context, model)
            self._observe(method, _code_of(context), model)
            return response

        return wrapped

    def _streaming(self, method: str, behavior: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            named = _FirstModelNamed(request)
            try:
                if isinstance(request, MalformedRequest):  # a unary request, streamed answers
                    raise InvalidInput(request.message)
                yield from behavior(named.requests, context)
            except Exception as exc:
                self._abort(method, exc, context, named.model)
            self._observe(method, _code_of(context), named.model)

        return wrapped

    def _abort(
        self, method: str, exc: Exception, context: grpc.ServicerContext, model: str
    ) -> None:
        already = context.code()
        if already is not None and already is not grpc.StatusCode.OK:
            # The servicer set the status itself (context.abort raises after setting it).
            self._observe(method, already, model)
            raise exc
        log_if_unexpected(exc, method)
        code, message = status_for(exc)
        self._observe(method, code, model)
        context.abort(code, message)


class _FirstModelNamed:
    """A call's requests, passed on as they come, noting the model the first one names: the
    model a streaming call counts under (a unary request names its own)."""

    def __init__(self, request: Any) -> None:
        self.model = getattr(request, "model", "")
        self.requests = request
        if isinstance(request, Iterator):
            self.requests = self._noting(request)

    def _noting(self, requests: Iterator[Any]) -> Iterator[Any]:
        first = True
        for request in requests:
            if first:
                self.model, first = getattr(request, "model", ""), False
            yield request


# Attributes gRPC reads on a handler's behavior to decide how to run it. grpc-health sets both
# on Health.Watch: non-blocking (it answers through a callback and returns at once) on a pool
# of its own. A wrapper without them runs Watch blocking, holding a worker thread for as long
# as the stream is open: a few open Watch streams would starve every other call.
_SCHEDULING = ("experimental_non_blocking", "experimental_thread_pool")


def _scheduled_like(
    wrapper: Callable[..., Any], behavior: Callable[..., Any]
) -> Callable[..., Any]:
    for name in _SCHEDULING:
        if hasattr(behavior, name):
            setattr(wrapper, name, getattr(behavior, name))
    return wrapper


def _refusing_malformed(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """Another service's handler (health, reflection) with requests that do not parse refused
    as INVALID_ARGUMENT rather than gRPC's INTERNAL; run as gRPC would run the original."""

    def check(request: Any, context: grpc.ServicerContext) -> Any:
        if isinstance(request, MalformedRequest):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        return request

    def checked_stream(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
        for request in requests:
            yield check(request, context)

    # `*callback`: the response callback gRPC passes to a non-blocking behavior.
    def unary(behavior: Callable[..., Any]) -> Callable[..., Any]:
        def call(request: Any, context: grpc.ServicerContext, *callback: Any) -> Any:
            return behavior(check(request, context), context, *callback)

        return _scheduled_like(call, behavior)

    def streaming(behavior: Callable[..., Any]) -> Callable[..., Any]:
        def call(requests: Iterator[Any], context: grpc.ServicerContext, *callback: Any) -> Any:
            return behavior(checked_stream(requests, context), context, *callback)

        return _scheduled_like(call, behavior)

    common = {
        "request_deserializer": _lenient(handler.request_deserializer),
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(unary(handler.unary_unary), **common)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(unary(handler.unary_stream), **common)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(streaming(handler.stream_unary), **common)
    return grpc.stream_stream_rpc_method_handler(streaming(handler.stream_stream), **common)


def _code_of(context: grpc.ServicerContext) -> grpc.StatusCode:
    return context.code() or grpc.StatusCode.OK
