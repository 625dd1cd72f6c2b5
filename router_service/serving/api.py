"""The client API (elasticmoe.v1.MoEService) as plain async methods over the engine.

Transport-free: the Ray Serve deployment (and tests) adapt these to gRPC. Every error a
client can cause is an ApiError carrying its gRPC status code and a message that names
the field and the allowed range; protobuf types stop here and never go deeper.

Cheap checks first: sizes and counts are bounded before anything walks, tokenizes or
copies a field (MAX_STOP_TOKEN_IDS, the context length, PROMPT_BYTES_PER_TOKEN); text is
tokenized off the event loop, which serves every other client of the replica. A failure
that is not the client's (a bug, a broken group) is INTERNAL with a fixed message and a log
line: its text never reaches the client, and it is that request's alone.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import AsyncIterator, Callable

import grpc
from elasticmoe.v1 import serving_pb2
from google.protobuf import unknown_fields

from cluster.checkpoint.spec import ModelSpec
from router_service.engine.engine import Engine, RequestTooLarge
from router_service.engine.scheduler import QueueFull
from router_service.model.sampling import SamplingError, SamplingParams
from router_service.model.tokenizer import Tokenizer
from router_service.serving.dispatch import DispatchError

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 16
MAX_STOP_TOKEN_IDS = 128  # a stop list is a handful of ids; this bound keeps one request's checks cheap
# A text prompt longer than this many bytes per context position cannot fit the context whatever
# the tokenizer (byte-level BPE tokens average 3-5 bytes): refuse it before tokenizing it.
PROMPT_BYTES_PER_TOKEN = 32


def max_request_bytes(spec: ModelSpec) -> int:
    """The largest legal client message for this model: a text prompt at its byte bound, or a context of
    token ids (a varint each, at most 5 bytes), the stop ids, the other fields and protobuf's framing."""
    context = spec.max_position_embeddings
    return max(PROMPT_BYTES_PER_TOKEN * context, 6 * context) + 6 * MAX_STOP_TOKEN_IDS + 4096


class ApiError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


def invalid(message: str) -> ApiError:
    return ApiError(grpc.StatusCode.INVALID_ARGUMENT, message)


def dispatch_failure(e: DispatchError) -> ApiError:
    """What the client is told when the expert stage failed. UNAVAILABLE (no live replica: the
    message names the experts) and DEADLINE_EXCEEDED pass through, and the SDK may retry the
    first; anything else (a group refusing this router's secret or request) is the server's
    fault, not the client's: INTERNAL. Group addresses go to the log only."""
    passed = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    log.warning("expert stage failed: %s", e)  # group addresses and their reasons: for operators, not clients
    return ApiError(e.code if e.code in passed else grpc.StatusCode.INTERNAL, e.public)


class MoEApi:
    def __init__(self, engine: Engine, spec: ModelSpec, tokenizer: Tokenizer | None,
                 status: Callable[[], serving_pb2.StatusResponse] | None = None,
                 on_tokens: Callable[[int, float, bool], None] | None = None):
        """on_tokens(num_tokens, seconds since the previous ones or the call's start, first): metrics."""
        self.engine, self.spec, self.tokenizer = engine, spec, tokenizer
        self._status = status or (lambda: serving_pb2.StatusResponse(serving=True))
        self._on_tokens = on_tokens or (lambda n, seconds, first: None)

    # ---- validation at the edge ----

    @staticmethod
    def _known_fields_only(request, name: str) -> None:
        """protobuf keeps fields it does not know, silently: a client built for a newer API would
        believe a setting took effect. Refuse them instead, by number."""
        numbers = sorted({f.field_number for f in unknown_fields.UnknownFieldSet(request)})
        if numbers:
            raise invalid(f"{name} has fields this server does not know (numbers {numbers}): it speaks "
                          f"elasticmoe.v1 as in proto/elasticmoe/v1/serving.proto; is the client newer?")

    def _token_ids(self, ids, field: str, limit: int) -> list[int]:
        if len(ids) > limit:  # counted before any id is read
            raise invalid(f"{field} holds {len(ids)} ids; it must hold at most {limit}")
        ids = list(ids)
        bad = [t for t in ids if not 0 <= t < self.spec.vocab_size]
        if bad:
            raise invalid(f"{field} must be in [0, {self.spec.vocab_size - 1}], got {bad[0]}")
        return ids

    def _prompt(self, request: serving_pb2.GenerateRequest) -> list[int]:
        if request.prompt and request.token_ids:
            raise invalid("give exactly one of prompt and token_ids, not both")
        if request.prompt:
            if self.tokenizer is None:
                raise invalid("prompt (text) needs a model with a tokenizer; this one takes token_ids only")
            self.check_prompt_size(request)
            ids = self.tokenizer.encode(request.prompt)
        else:
            ids = self._token_ids(request.token_ids, "token_ids", self.spec.max_position_embeddings)
        if not ids:
            raise invalid("prompt is empty: give a non-empty prompt or token_ids")
        return ids

    def _params(self, request: serving_pb2.GenerateRequest, prompt_len: int) -> SamplingParams:
        room = self.spec.max_position_embeddings - prompt_len
        if room < 1:
            raise invalid(f"prompt has {prompt_len} tokens; the context holds "
                          f"{self.spec.max_position_embeddings}, leaving no room to generate")
        limit = min(self.engine.config.max_new_tokens, room)
        try:
            return SamplingParams(
                temperature=request.temperature if request.HasField("temperature") else 0.0,
                top_p=request.top_p if request.HasField("top_p") else 1.0,
                top_k=request.top_k,
                max_tokens=request.max_tokens if request.HasField("max_tokens") else min(DEFAULT_MAX_TOKENS, limit),
                seed=request.seed if request.HasField("seed") else None,
                stop_token_ids=tuple(self._token_ids(request.stop_token_ids, "stop_token_ids", MAX_STOP_TOKEN_IDS)),
                logprobs=request.logprobs,
                max_tokens_limit=limit,
            )
        except SamplingError as e:
            raise invalid(str(e)) from None

    def validate_generate(self, request: serving_pb2.GenerateRequest) -> tuple[list[int], SamplingParams]:
        """The prompt's token ids and the sampling settings, or ApiError(INVALID_ARGUMENT) naming the field."""
        self._known_fields_only(request, "GenerateRequest")
        prompt = self._prompt(request)
        return prompt, self._params(request, len(prompt))

    def check_prompt_size(self, request: serving_pb2.GenerateRequest) -> None:
        """The prompt's bytes against what the context could hold, before tokenizing it."""
        limit = PROMPT_BYTES_PER_TOKEN * self.spec.max_position_embeddings
        if len(request.prompt) > limit or len(request.prompt.encode("utf-8")) > limit:
            raise invalid(f"prompt must be at most {limit} bytes of text (the context holds "
                          f"{self.spec.max_position_embeddings} tokens), got {len(request.prompt.encode('utf-8'))}")

    def validate_score(self, request: serving_pb2.ScoreRequest) -> list[int]:
        self._known_fields_only(request, "ScoreRequest")
        context = self.spec.max_position_embeddings
        if len(request.token_ids) > context:
            raise invalid(f"token_ids has {len(request.token_ids)} tokens; the context holds {context}")
        ids = self._token_ids(request.token_ids, "token_ids", context)
        if len(ids) < 2:
            raise invalid(f"token_ids must hold at least 2 tokens to score, got {len(ids)}")
        return ids

    # ---- the three calls ----

    async def generate(self, request: serving_pb2.GenerateRequest) -> AsyncIterator[serving_pb2.GenerateResponse]:
        last, first = time.monotonic(), True  # TTFT from the call reaching the replica: tokenizing, queue, prefill
        if request.prompt:
            self.check_prompt_size(request)  # on the loop: O(1) before any work
            prompt, params = await asyncio.to_thread(self.validate_generate, request)  # tokenizing is not
        else:
            prompt, params = self.validate_generate(request)
        text = self.tokenizer.stream() if self.tokenizer is not None else None
        try:
            async for event in self.engine.generate(prompt, params):
                if event.token_ids:
                    now = time.monotonic()
                    self._on_tokens(len(event.token_ids), now - last, first)
                    last, first = now, False
                yield serving_pb2.GenerateResponse(token_ids=event.token_ids,
                                                   text=text.add(event.token_ids) if text is not None else "",
                                                   logprobs=event.logprobs if params.logprobs else [],
                                                   finish_reason=event.finish_reason or "")
        except Exception as e:
            raise api_error(e) from None

    async def score(self, request: serving_pb2.ScoreRequest) -> serving_pb2.ScoreResponse:
        ids = self.validate_score(request)
        try:
            return serving_pb2.ScoreResponse(logprobs=await self.engine.score(ids))
        except Exception as e:
            raise api_error(e) from None

    def status(self, request: serving_pb2.StatusRequest | None = None) -> serving_pb2.StatusResponse:
        return self._status()


def api_error(e: Exception) -> ApiError:
    """What the client is told when its request failed past validation."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, QueueFull):
        return ApiError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
    if isinstance(e, RequestTooLarge):
        return invalid(str(e))
    if isinstance(e, DispatchError):
        return dispatch_failure(e)
    incident = uuid.uuid4().hex[:12]  # the server's own failure: its text stays in the log
    log.error("request failed with an internal error (incident %s)", incident, exc_info=e)
    return ApiError(grpc.StatusCode.INTERNAL, f"internal error (incident {incident}); the router's log has it")


