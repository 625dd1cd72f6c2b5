"""The SDK's typed errors: MoEError and one subclass per status code a caller handles
differently, and _error, which turns every grpc.RpcError into one of them (a lost router
replica, recognised by its details, into ReplicaLost)."""
from __future__ import annotations

import re

import grpc


class MoEError(Exception):
    """A failed call; `code` is the grpc.StatusCode, `details` the server's message."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class InvalidArgument(MoEError):
    """The request is malformed or out of range: fix it, retrying will not help."""


class ResourceExhausted(MoEError):
    """The server is overloaded or a quota is used up: back off, then retry."""


class Unavailable(MoEError):
    """The server cannot be reached or is restarting; retried automatically where safe."""


class ReplicaLost(Unavailable):
    """The router replica serving the call died; Serve starts another. Retried automatically where
    safe, like Unavailable; `code` stays what the server sent (INTERNAL)."""


class Unauthenticated(MoEError):
    """The token is missing or wrong."""


class DeadlineExceeded(MoEError):
    """The call did not finish within timeout_s."""


_ERRORS: dict[grpc.StatusCode, type[MoEError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
}


# Serve's gRPC proxy answers a call whose replica process died with INTERNAL and the RayActorError's
# text as details (get_grpc_response_status in ray/serve/_private/grpc_util.py, Ray 2.60; the texts
# are ray/exceptions.py's). Observed for every call in flight at a replica's `kill -9`, streamed or
# not (tests/integration/test_router_fault_ray.py); calls arriving later wait at the proxy for the replacement.
# An error the router's own code raises also arrives as INTERNAL, with other text, and is not retried;
# nor is "The actor died because of an error raised in its creation task": a replica that cannot start.
_REPLICA_LOST = re.compile(r"The actor (died unexpectedly|experienced an error before finishing|\w+ is unavailable:)")


def _error(err: grpc.RpcError) -> MoEError:
    # A bare grpc.RpcError need not be a grpc.Call; every error raised by a call is one.
    code = err.code() if callable(getattr(err, "code", None)) else grpc.StatusCode.UNKNOWN
    details = (err.details() if callable(getattr(err, "details", None)) else str(err)) or ""
    if code == grpc.StatusCode.INTERNAL and _REPLICA_LOST.match(details):
        return ReplicaLost(code, details)
    return _ERRORS.get(code, MoEError)(code, details)
