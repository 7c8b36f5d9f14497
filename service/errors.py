"""One exception hierarchy for the service, mapped to gRPC status codes in one place.

Servicer code raises; ``StatusInterceptor`` turns the exception into the RPC's status (in the
style of KServe's exception → status mapping). Client mistakes keep their message, since it
says what to fix; anything unexpected becomes INTERNAL with a generic message, and the
traceback goes to the server log only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from service.assessor import OutOfMemory
from service.inputs import InvalidInput

log = logging.getLogger("gradprobe.server")

SERVICE_PREFIX = "/gradprobe.v1.Reliability/"
INTERNAL_MESSAGE = "internal error while assessing the request; see the server log"


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
        self.message = f"the request is not a valid protobuf message of this method ({reason})"


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
    """The gRPC status and the client-facing message for an exception."""
    for kind, code in _STATUS:
        if isinstance(exc, kind):
            return code, str(exc)
    return grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE


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
            try:
                if isinstance(request, MalformedRequest):  # a unary request, streamed answers
                    raise InvalidInput(request.message)
                yield from behavior(request, context)
            except Exception as exc:
                self._abort(method, exc, context, "")
            self._observe(method, _code_of(context), "")

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


def _refusing_malformed(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """Another service's handler (health, reflection) with requests that do not parse refused
    as INVALID_ARGUMENT rather than gRPC's INTERNAL."""

    def check(request: Any, context: grpc.ServicerContext) -> Any:
        if isinstance(request, MalformedRequest):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        return request

    def checked_stream(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
        for request in requests:
            yield check(request, context)

    def unary(behavior: Callable[..., Any]) -> Callable[..., Any]:
        return lambda request, context: behavior(check(request, context), context)

    def streaming(behavior: Callable[..., Any]) -> Callable[..., Any]:
        return lambda requests, context: behavior(checked_stream(requests, context), context)

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
