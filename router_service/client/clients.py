"""Python SDK of elastic-moe: typed results and typed errors over the MoEService gRPC API.

Imports only grpc, protobuf and the generated elasticmoe.v1 modules, so an application can
install and import it without torch or Ray (tests/unit/test_client.py checks this).

    with MoEClient("host:50051", token="...") as client:
        completion = client.generate("Hello", max_tokens=8)          # consumes the stream
        for chunk in client.stream([1, 2, 3], temperature=0.7):      # tokens as they arrive
            ...

Errors: every grpc.RpcError becomes a MoEError, subclassed by status code; no raw gRPC error
leaves this module. Requests are validated by the server only (one source of truth); a value
protobuf cannot even encode (a str max_tokens, a negative seed) raises InvalidArgument locally.

Retries: only on UNAVAILABLE or a lost router replica (ReplicaLost), and only where repeating
cannot be seen by the caller: Score, Status, and a Generate that has not yielded a chunk yet (all
three are reads: running one twice changes nothing). A stream that already yielded tokens raises
instead: a retry would restart the generation and deliver tokens twice.

Credentials: `token=` sends `authorization: Bearer <token>` with every call (a wrong or
missing one raises Unauthenticated, never retried). `tls=` True verifies the server against
the system roots, a path against that CA bundle, a (ca, cert, key) tuple adds a client
certificate (mutual TLS); see _credentials. Serve's gRPC ingress itself speaks plaintext
(Ray 2.60), so TLS reaches a proxy in front of it: README, "Security".

Deadline: `timeout_s` bounds a whole call: every attempt, the backoff between them, and for a
stream every chunk up to the last.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import re
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.aio
from elasticmoe.v1 import serving_pb2, serving_pb2_grpc


@dataclass
class Completion:
    token_ids: list[int]
    text: str  # empty when the model has no tokenizer
    logprobs: list[float] | None  # one per token when asked for, else None
    finish_reason: str  # "stop" | "length"


@dataclass
class Chunk:
    token_ids: list[int]  # the new tokens of this chunk
    text: str
    logprobs: list[float] | None
    finish_reason: str | None  # set on the last chunk only


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


@contextlib.contextmanager
def _encoding():
    """Protobuf's own type and range errors, as the InvalidArgument the server would send."""
    try:
        yield
    except (TypeError, ValueError) as err:
        raise InvalidArgument(grpc.StatusCode.INVALID_ARGUMENT, f"cannot encode the request: {err}") from None


def _generate_request(prompt: str | Sequence[int], max_tokens: int, temperature: float, top_p: float | None,
                      top_k: int, seed: int | None, stop_token_ids: Sequence[int],
                      logprobs: bool) -> serving_pb2.GenerateRequest:
    with _encoding():
        request = serving_pb2.GenerateRequest(max_tokens=max_tokens, temperature=temperature, top_k=top_k,
                                              stop_token_ids=stop_token_ids, logprobs=logprobs)
        if isinstance(prompt, str):
            request.prompt = prompt
        else:
            request.token_ids.extend(prompt)
        if top_p is not None:  # unset: the server's default (1.0)
            request.top_p = top_p
        if seed is not None:
            request.seed = seed
    return request


def _score_request(token_ids: Sequence[int]) -> serving_pb2.ScoreRequest:
    with _encoding():
        return serving_pb2.ScoreRequest(token_ids=token_ids)


def _chunk(response: serving_pb2.GenerateResponse, logprobs: bool) -> Chunk:
    return Chunk(token_ids=list(response.token_ids), text=response.text,
                 logprobs=list(response.logprobs) if logprobs else None,
                 finish_reason=response.finish_reason or None)


def _completion(chunks: list[Chunk], logprobs: bool) -> Completion:
    if not chunks or chunks[-1].finish_reason is None:
        raise MoEError(grpc.StatusCode.INTERNAL, "the server ended the stream without a finish_reason")
    return Completion(token_ids=[t for c in chunks for t in c.token_ids], text="".join(c.text for c in chunks),
                      logprobs=[x for c in chunks for x in c.logprobs] if logprobs else None,
                      finish_reason=chunks[-1].finish_reason)


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


def _read(path: str | os.PathLike, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise ValueError(f"tls: cannot read the {what} {str(path)!r}: {err.strerror or err}") from None


def _credentials(tls) -> grpc.ChannelCredentials | None:
    """`tls=` as channel credentials; None means plaintext.

    False / None: plaintext.  True: TLS, server verified against the system's roots.
    a path: TLS, server verified against this CA bundle (PEM; e.g. a private CA's).
    (ca, cert, key): mutual TLS: ca as above (None: system roots), plus this client's
    certificate chain and private key (PEM paths).  grpc.ChannelCredentials: used as given.
    """
    if tls is None or tls is False:
        return None
    if tls is True:
        return grpc.ssl_channel_credentials()
    if isinstance(tls, grpc.ChannelCredentials):
        return tls
    if isinstance(tls, (str, os.PathLike)):
        return grpc.ssl_channel_credentials(root_certificates=_read(tls, "CA bundle"))
    if isinstance(tls, tuple) and len(tls) == 3 and tls[1] and tls[2]:
        ca, cert, key = tls
        return grpc.ssl_channel_credentials(root_certificates=_read(ca, "CA bundle") if ca else None,
                                            private_key=_read(key, "client key"),
                                            certificate_chain=_read(cert, "client certificate"))
    raise ValueError(f"tls must be True, False, a CA bundle path, a (ca, cert, key) tuple of paths "
                     f"or grpc.ChannelCredentials, got {type(tls).__name__}")


def _channel_args(tls, tls_server_name: str | None) -> tuple[grpc.ChannelCredentials | None, list]:
    credentials = _credentials(tls)
    if tls_server_name is None:
        return credentials, []
    if credentials is None:
        raise ValueError("tls_server_name needs tls: it names the host the server's certificate is checked for")
    # The name checked against the certificate, when it differs from the dialled address
    # (an IP, a port-forward, an ingress reached by another name).
    return credentials, [("grpc.ssl_target_name_override", tls_server_name)]


class _Base:
    def __init__(self, address: str, token: str | None, timeout_s: float, max_attempts: int, backoff_s: float):
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
        if not max_attempts >= 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts!r}")
        if not backoff_s >= 0:
            raise ValueError(f"backoff_s must be >= 0, got {backoff_s!r}")
        if token is not None and (not isinstance(token, str) or not token.isprintable() or not token.strip()
                                  or not token.isascii() or " " in token):
            raise ValueError("token must be a non-empty printable ASCII string without spaces")  # never echoed
        self.address, self.timeout_s, self.max_attempts, self.backoff_s = address, timeout_s, max_attempts, backoff_s
        # Plain call metadata rather than call credentials: those refuse insecure channels,
        # and a cluster-internal plaintext deployment still wants its token checked.
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()

    def __repr__(self) -> str:  # never the token
        return f"{type(self).__name__}({self.address!r}, token={'***' if self._metadata else None})"

    def _attempts(self) -> _Attempts:
        return _Attempts(self.timeout_s, self.max_attempts, self.backoff_s)


class MoEClient(_Base):
    """Blocking client. Thread-safe: calls may run concurrently on one instance."""

    def __init__(self, address: str, token: str | None = None, timeout_s: float = 60.0, tls=False,
                 max_attempts: int = 3, backoff_s: float = 0.1, tls_server_name: str | None = None):
        super().__init__(address, token, timeout_s, max_attempts, backoff_s)
        credentials, options = _channel_args(tls, tls_server_name)
        self._channel = (grpc.secure_channel(address, credentials, options) if credentials
                         else grpc.insecure_channel(address))
        self._stub = serving_pb2_grpc.MoEServiceStub(self._channel)

    def generate(self, prompt: str | Sequence[int], max_tokens: int = 16, temperature: float = 0.0,
                 top_p: float | None = None, top_k: int = 0, seed: int | None = None,
                 stop_token_ids: Sequence[int] = (), logprobs: bool = False) -> Completion:
        """Generate to the end. A str prompt goes in `prompt` (needs a tokenizer), token ids in `token_ids`."""
        chunks = list(self.stream(prompt, max_tokens, temperature, top_p, top_k, seed, stop_token_ids, logprobs))
        return _completion(chunks, logprobs)

    def stream(self, prompt: str | Sequence[int], max_tokens: int = 16, temperature: float = 0.0,
               top_p: float | None = None, top_k: int = 0, seed: int | None = None,
               stop_token_ids: Sequence[int] = (), logprobs: bool = False) -> Iterator[Chunk]:
        """Yield chunks as the server sends them; closing the iterator early cancels the call."""
        request = _generate_request(prompt, max_tokens, temperature, top_p, top_k, seed, stop_token_ids, logprobs)
        attempts = self._attempts()
        while True:
            call = self._stub.Generate(request, timeout=attempts.start(), metadata=self._metadata)
            delivered = False
            try:
                for response in call:
                    if not response.token_ids and not response.finish_reason:
                        continue  # carries nothing (the router sends one before an error status)
                    delivered = True
                    yield _chunk(response, logprobs)
                return
            except grpc.RpcError as err:
                wait_s = attempts.backoff_s(err, delivered)
            finally:
                call.cancel()  # no-op once finished; else stops the server generating for nobody, now
                # rather than whenever the call object is garbage-collected
            time.sleep(wait_s)

    def score(self, token_ids: Sequence[int]) -> list[float]:
        """log p(token_i | tokens before it) for i = 1..n-1."""
        return list(self._unary(self._stub.Score, _score_request(token_ids)).logprobs)

    def status(self) -> serving_pb2.StatusResponse:
        return self._unary(self._stub.Status, serving_pb2.StatusRequest())

    def _unary(self, method, request):
        attempts = self._attempts()
        while True:
            try:
                return method(request, timeout=attempts.start(), metadata=self._metadata)
            except grpc.RpcError as err:
                wait_s = attempts.backoff_s(err)
            time.sleep(wait_s)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> MoEClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncMoEClient(_Base):
    """asyncio client on grpc.aio; build it inside the event loop that uses it.

    Stop a stream early with `async with contextlib.aclosing(client.stream(...))` so the call
    is cancelled at once rather than when the generator is garbage-collected.
    """

    def __init__(self, address: str, token: str | None = None, timeout_s: float = 60.0, tls=False,
                 max_attempts: int = 3, backoff_s: float = 0.1, tls_server_name: str | None = None):
        super().__init__(address, token, timeout_s, max_attempts, backoff_s)
        credentials, options = _channel_args(tls, tls_server_name)
        self._channel = (grpc.aio.secure_channel(address, credentials, options) if credentials
                         else grpc.aio.insecure_channel(address))
        self._stub = serving_pb2_grpc.MoEServiceStub(self._channel)

    async def generate(self, prompt: str | Sequence[int], max_tokens: int = 16, temperature: float = 0.0,
                       top_p: float | None = None, top_k: int = 0, seed: int | None = None,
                       stop_token_ids: Sequence[int] = (), logprobs: bool = False) -> Completion:
        chunks = [c async for c in self.stream(prompt, max_tokens, temperature, top_p, top_k, seed,
                                               stop_token_ids, logprobs)]
        return _completion(chunks, logprobs)

    async def stream(self, prompt: str | Sequence[int], max_tokens: int = 16, temperature: float = 0.0,
                     top_p: float | None = None, top_k: int = 0, seed: int | None = None,
                     stop_token_ids: Sequence[int] = (), logprobs: bool = False) -> AsyncIterator[Chunk]:
        request = _generate_request(prompt, max_tokens, temperature, top_p, top_k, seed, stop_token_ids, logprobs)
        attempts = self._attempts()
        while True:
            call = self._stub.Generate(request, timeout=attempts.start(), metadata=self._metadata)
            delivered = False
            try:
                async for response in call:
                    if not response.token_ids and not response.finish_reason:
                        continue  # carries nothing (the router sends one before an error status)
                    delivered = True
                    yield _chunk(response, logprobs)
                return
            except grpc.RpcError as err:  # grpc.aio.AioRpcError subclasses it
                wait_s = attempts.backoff_s(err, delivered)
            finally:
                call.cancel()
            await asyncio.sleep(wait_s)

    async def score(self, token_ids: Sequence[int]) -> list[float]:
        return list((await self._unary(self._stub.Score, _score_request(token_ids))).logprobs)

    async def status(self) -> serving_pb2.StatusResponse:
        return await self._unary(self._stub.Status, serving_pb2.StatusRequest())

    async def _unary(self, method, request):
        attempts = self._attempts()
        while True:
            try:
                return await method(request, timeout=attempts.start(), metadata=self._metadata)
            except grpc.RpcError as err:
                wait_s = attempts.backoff_s(err)
            await asyncio.sleep(wait_s)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncMoEClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
