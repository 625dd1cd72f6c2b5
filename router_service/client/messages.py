"""What goes over the wire and what comes back: requests built from the caller's arguments
(a value protobuf cannot encode raises InvalidArgument locally), and GenerateResponses as
Chunk, a finished stream as Completion."""
from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from elasticmoe.v1 import serving_pb2

from router_service.client.errors import InvalidArgument, MoEError


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
