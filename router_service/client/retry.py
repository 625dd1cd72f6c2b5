"""When a call is tried again: one deadline shared by all attempts and the backoff between them,
exponential backoff, and only an Unavailable (ReplicaLost included) that nothing was delivered
before is retried (the "Retries" and "Deadline" notes of router_service.client)."""
from __future__ import annotations

import time

import grpc

from router_service.client.errors import DeadlineExceeded, Unavailable, _error


class _Attempts:
    """Attempt bookkeeping of one call: a deadline shared by all attempts, exponential backoff."""

    def __init__(self, timeout_s: float, max_attempts: int, backoff_s: float):
        self.timeout_s, self.max_attempts, self.backoff_base_s = timeout_s, max_attempts, backoff_s
        self.deadline = time.monotonic() + timeout_s
        self.attempt = 0

    def start(self) -> float:
        """Begin an attempt; return the seconds it may take."""
        self.attempt += 1
        left_s = self.deadline - time.monotonic()
        if left_s <= 0:
            raise DeadlineExceeded(grpc.StatusCode.DEADLINE_EXCEEDED,
                                   f"timeout_s={self.timeout_s} ran out after {self.attempt - 1} attempts")
        return left_s

    def backoff_s(self, err: grpc.RpcError, delivered: bool = False) -> float:
        """Seconds to wait before retrying after `err`; raises the typed error if it must not be retried."""
        error = _error(err)
        if delivered or not isinstance(error, Unavailable) or self.attempt >= self.max_attempts:
            raise error from None
        return min(self.backoff_base_s * 2 ** (self.attempt - 1), max(0.0, self.deadline - time.monotonic()))
