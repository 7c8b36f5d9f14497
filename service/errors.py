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
        if handler is None or not full_name.startswith(SERVICE_PREFIX):
            return handler
        method = full_name.removeprefix(SERVICE_PREFIX)
        common = {
            "request_deserializer": handler.request_deserializer,
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
                response = behavior(request, context)
            except Exception as exc:
                self._abort(method, exc, context, model)
            self._observe(method, _code_of(context), model)
            return response

        return wrapped

    def _streaming(self, method: str, behavior: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            try:
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


def _code_of(context: grpc.ServicerContext) -> grpc.StatusCode:
    return context.code() or grpc.StatusCode.OK
