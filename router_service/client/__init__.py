"""Python SDK of elastic-moe: typed results and typed errors over the MoEService gRPC API.

Imports only grpc, protobuf and the generated elasticmoe.v1 modules, so an application can
install and import it without torch or Ray (tests/unit/test_client.py checks this).

    with MoEClient("host:50051", token="...") as client:
        completion = client.generate("Hello", max_tokens=8)          # consumes the stream
        for chunk in client.stream([1, 2, 3], temperature=0.7):      # tokens as they arrive
            ...

Errors: every grpc.RpcError becomes a MoEError, subclassed by status code; no raw gRPC error
leaves this package. Requests are validated by the server only (one source of truth); a value
protobuf cannot even encode (a str max_tokens, a negative seed) raises InvalidArgument locally.

Retries: only on UNAVAILABLE or a lost router replica (ReplicaLost), and only where repeating
cannot be seen by the caller: Score, Status, and a Generate that has not yielded a chunk yet (all
three are reads: running one twice changes nothing). A stream that already yielded tokens raises
instead: a retry would restart the generation and deliver tokens twice.

Credentials: `token=` sends `authorization: Bearer <token>` with every call (a wrong or
missing one raises Unauthenticated, never retried). `tls=` True verifies the server against
the system roots, a path against that CA bundle, a (ca, cert, key) tuple adds a client
certificate (mutual TLS); see channel._credentials. Serve's gRPC ingress itself speaks plaintext
(Ray 2.60), so TLS reaches a proxy in front of it: README, "Security".

Deadline: `timeout_s` bounds a whole call: every attempt, the backoff between them, and for a
stream every chunk up to the last.

Modules: errors (the typed errors), messages (requests, Chunk, Completion), retry (attempts
and deadline), channel (TLS), clients (MoEClient, AsyncMoEClient). Import from here: the
names below are the public API; the modules are how it is laid out.
"""
from router_service.client.clients import AsyncMoEClient, MoEClient
from router_service.client.errors import (
    DeadlineExceeded,
    InvalidArgument,
    MoEError,
    ReplicaLost,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from router_service.client.messages import Chunk, Completion

__all__ = ["AsyncMoEClient", "Chunk", "Completion", "DeadlineExceeded", "InvalidArgument", "MoEClient", "MoEError",
           "ReplicaLost", "ResourceExhausted", "Unauthenticated", "Unavailable"]

# Named by the path users import them from, as before the split: tracebacks print
# `router_service.client.InvalidArgument`, and pickles refer to this module's names.
for _name in __all__:
    globals()[_name].__module__ = __name__
del _name
