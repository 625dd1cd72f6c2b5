"""MoEClient (blocking) and AsyncMoEClient (asyncio): the calls themselves, each retried under
its own _Attempts, on a channel built from `tls=`; the two mirror each other."""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator, Sequence

import grpc
import grpc.aio
from elasticmoe.v1 import serving_pb2, serving_pb2_grpc

from router_service.client.channel import _channel_args
from router_service.client.messages import Chunk, Completion, _chunk, _completion, _generate_request, _score_request
from router_service.client.retry import _Attempts


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
