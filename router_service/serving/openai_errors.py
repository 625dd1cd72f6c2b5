"""Errors of the OpenAI-compatible HTTP API, in OpenAI's shape, with the status a client can act on.

    {"error": {"message": ..., "type": ..., "param": <field or null>, "code": ...}}

    400 a field out of range (the message names it and its range: the same check as gRPC's
        INVALID_ARGUMENT), 401 no or a wrong bearer token, 404 an unknown model or path,
    413 a body over the limit, 429 the engine's queue is full, 503 no live replica for some expert,
    504 the expert stage missed its deadline. A 500 means a bug here, never bad input.

Every error the client API core raises is an ApiError carrying a gRPC code; `from_api_error` maps
it, so HTTP and gRPC refuse the same requests for the same reasons.
"""
from __future__ import annotations

import re

import grpc

from router_service.serving.api import ApiError
from router_service.serving.auth import AuthError

# gRPC code -> (HTTP status, OpenAI error type, code). Types follow OpenAI's (invalid_request_error)
# where it has one; the rest name the condition.
_BY_GRPC = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error", None),
    grpc.StatusCode.UNAUTHENTICATED: (401, "invalid_request_error", "invalid_api_key"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error", "queue_full"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable_error", "no_live_replica"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout_error", "deadline_exceeded"),
}
_INTERNAL = (500, "internal_error", None)
_FIELD = re.compile(r"([a-z_]+)\b")  # the core's messages start with the field they are about


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        if self.status == 401:
            return {"www-authenticate": "Bearer"}  # RFC 6750
        if self.status in (429, 503):
            return {"retry-after": "1"}  # the queue drains in steps of tens of milliseconds
        return {}


def bad_request(param: str | None, message: str) -> OpenAIError:
    return OpenAIError(400, message, param=param)


def from_api_error(e: ApiError | AuthError, fields: dict[str, str] | None = None) -> OpenAIError:
    """An error of the client API core (or of auth) in OpenAI's shape. fields: the core's field names
    -> this request's (token_ids -> prompt, max_tokens -> max_completion_tokens, ...): a message that
    starts with one is rewritten to name what the caller sent, and `param` is set to it."""
    if isinstance(e, AuthError):
        status, type_, code = _BY_GRPC[grpc.StatusCode.UNAUTHENTICATED]
        return OpenAIError(status, e.message, type_, code=code)
    status, type_, code = _BY_GRPC.get(e.code, _INTERNAL)
    message, param = e.message, None
    match = _FIELD.match(message)
    if status == 400 and match and fields and match.group(1) in fields:
        param = fields[match.group(1)]
        message = param + message[match.end():]
    return OpenAIError(status, message, type_, param, code)
