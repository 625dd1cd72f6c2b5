"""The OpenAI-compatible HTTP API of a router replica: FastAPI routes over the same engine as gRPC.

    client --HTTP--> Serve HTTP proxy (port 8000) --ASGI--> RouterDeployment replica (serve.ingress)
      GET  /health                 open, like gRPC health: 200 while every expert has a live replica, else 503
      GET  /v1/models              the one served model
      POST /v1/completions         }  bearer token (same tokens as gRPC) -> body (bounded) -> model -> Plan
      POST /v1/chat/completions    }  (openai_schema) -> Choices on the engine (openai_choices) -> JSON or
                                      server-sent events `data: {...}\\n\\n` ... `data: [DONE]\\n\\n`

No second server: Serve's own HTTP proxy carries it, as Ray Serve's LLM app does. Errors are OpenAI's
shape with the status a client acts on (openai_errors.py); an error after a stream has started comes
as one `data: {"error": ...}` event before [DONE], the status being already sent.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from router_service.serving.api import ApiError, MoEApi
from router_service.serving.auth import AuthError, TokenAuth
from router_service.serving.chat_template import ChatTemplate
from router_service.serving.openai_choices import Choices
from router_service.serving.openai_errors import OpenAIError, from_api_error
from router_service.serving.openai_responses import Responses
from router_service.serving.openai_schema import check_model, parse

log = logging.getLogger(__name__)

SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}  # no proxy may hold events back


def sse(obj) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def error_response(e: OpenAIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers())


def as_openai_error(e: Exception) -> OpenAIError:
    if isinstance(e, OpenAIError):
        return e
    if isinstance(e, (ApiError, AuthError)):
        return from_api_error(e)
    log.exception("internal error in the OpenAI API", exc_info=e)
    return OpenAIError(500, f"internal error ({type(e).__name__}); see the router's log", "internal_error")


def build_openai_app(api: MoEApi, template: ChatTemplate | None, auth: TokenAuth | None, model: str,
                     placement_version: Callable[[], int], serving: Callable[[], bool],
                     max_body_bytes: int) -> FastAPI:
    """The ASGI app of one replica. placement_version and serving are read per request (they change)."""
    # No /docs or /openapi.json: the API is OpenAI's, documented there and in the README.
    app = FastAPI(title="elastic-moe OpenAI-compatible API", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())

    @app.exception_handler(OpenAIError)
    async def _openai_error(request: Request, e: OpenAIError):
        return error_response(e)

    @app.exception_handler(HTTPException)  # unknown paths and methods, in OpenAI's shape too
    async def _http_error(request: Request, e: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return error_response(OpenAIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}",
                                          code=code))

    def authenticate(request: Request) -> None:
        if auth is not None:
            try:
                auth.check(request.headers.items())
            except AuthError as e:
                raise from_api_error(e) from None

    async def read_json(request: Request):
        """The body as JSON, read no further than max_body_bytes; the fields' own bounds (prompt bytes, ids)
        are the gRPC path's, checked in parse."""
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_body_bytes:
            raise OpenAIError(413, f"request body of {declared} bytes is over the limit of {max_body_bytes}",
                              code="request_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body_bytes:
                raise OpenAIError(413, f"request body is over the limit of {max_body_bytes} bytes",
                                  code="request_too_large")
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks))
        except ValueError as e:
            raise OpenAIError(400, f"request body is not valid JSON: {e}") from None

    @app.get("/health")
    def health():  # serving() reads the background snapshot (health.py): it never waits on a group
        if serving():
            return {"status": "ok"}
        return error_response(OpenAIError(503, "not serving: some expert has no live replica",
                                          "service_unavailable_error", code="no_live_replica"))

    def model_card() -> dict:
        return {"id": model, "object": "model", "created": created, "owned_by": "elasticmoe",
                "max_model_len": api.spec.max_position_embeddings}

    @app.get("/v1/models")
    def models(request: Request):
        authenticate(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    def one_model(name: str, request: Request):
        authenticate(request)
        check_model({"model": name}, model)
        return model_card()

    async def generate(kind: str, request: Request):
        authenticate(request)
        body = await read_json(request)
        check_model(body if isinstance(body, dict) else {}, model)
        plan = await asyncio.to_thread(parse, kind, body, api, template)  # tokenizing: off the event loop
        choices = Choices(api.engine, api.tokenizer, plan)
        try:
            await choices.start()
        except BaseException as e:  # a refusal (429, 400, 503) or the client gone: nothing may keep running
            await choices.close()
            if isinstance(e, Exception):
                raise as_openai_error(e) from None
            raise
        out = Responses(plan, model, placement_version(), api.tokenizer, choices.prompt_logprobs)
        if plan.stream:
            return StreamingResponse(events(choices, out), media_type="text/event-stream", headers=SSE_HEADERS)
        try:
            async for delta in choices.deltas():
                out.add(delta)
        except Exception as e:
            raise as_openai_error(e) from None
        finally:
            await choices.close()
        return JSONResponse(out.whole(choices.usage()))

    async def events(choices: Choices, out: Responses):
        """The stream. A client that disconnects cancels this generator: close() cancels the sequences."""
        try:
            for chunk in out.opening_chunks():
                yield sse(chunk)
            async for delta in choices.deltas():
                yield sse(out.chunk(delta))
            if out.plan.include_usage:
                yield sse(out.usage_chunk(choices.usage()))
        except Exception as e:  # the status is sent already: the error goes in the stream
            yield sse(as_openai_error(e).body())
        finally:
            await choices.close()
        yield "data: [DONE]\n\n"

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate("completion", request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate("chat", request)

    return app
