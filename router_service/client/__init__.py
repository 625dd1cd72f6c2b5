"""Python SDK of elastic-moe (router_service/client/clients.py); the public API, importable from here."""
from router_service.client.clients import (
    AsyncMoEClient,
    Chunk,
    Completion,
    DeadlineExceeded,
    InvalidArgument,
    MoEClient,
    MoEError,
    ReplicaLost,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
