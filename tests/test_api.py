"""The client API core: request validation names the field, results equal the reference."""
from __future__ import annotations

import asyncio

import grpc
import pytest
from elasticmoe.v1 import serving_pb2

from router_service.api import ApiError, MoEApi
from router_service.engine import Engine, EngineConfig
from router_service.model import ReferenceModel
from router_service.scheduler import SchedulerConfig
from router_service.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def api(tiny_checkpoint):
    ref = ReferenceModel.from_pretrained(tiny_checkpoint)
    engine = Engine(ref.dense, ref.experts, EngineConfig(stop_at_eos=False))
    yield MoEApi(engine, ref.spec, Tokenizer.from_dir(tiny_checkpoint)), ref
    engine.close()


def generate(api: MoEApi, **fields):
    async def main():
        return [r async for r in api.generate(serving_pb2.GenerateRequest(**fields))]

    return asyncio.run(main())


def test_prompt_text_and_token_ids(api):
    api, ref = api
    tok = api.tokenizer
    responses = generate(api, prompt="route every token", max_tokens=5)
    ids = [t for r in responses for t in r.token_ids]
    assert ids == ref.generate_greedy(tok.encode("route every token"), 5)
    assert "".join(r.text for r in responses) == tok.decode(ids)
    assert responses[-1].finish_reason == "length" and all(not r.finish_reason for r in responses[:-1])
    by_ids = generate(api, token_ids=tok.encode("route every token"), max_tokens=5, logprobs=True)
    assert [t for r in by_ids for t in r.token_ids] == ids
    assert all(len(r.logprobs) == len(r.token_ids) for r in by_ids)


def test_score(api):
    api, ref = api
    got = asyncio.run(api.score(serving_pb2.ScoreRequest(token_ids=[5, 9, 13, 2])))
    assert len(got.logprobs) == 3


@pytest.mark.parametrize(
    "fields, message",
    [
        ({}, "prompt is empty"),
        ({"prompt": ""}, "prompt is empty"),
        ({"token_ids": [1, 320]}, r"token_ids must be in \[0, 319\], got 320"),
        ({"token_ids": [-1]}, r"token_ids must be in \[0, 319\], got -1"),
        ({"prompt": "x", "token_ids": [1]}, "exactly one of prompt and token_ids"),
        ({"token_ids": [1], "max_tokens": 0}, "max_tokens must be"),
        ({"token_ids": [1], "max_tokens": 5000}, "max_tokens must be .*<= 4095"),
        ({"token_ids": [1], "temperature": -0.5}, "temperature must be"),
        ({"token_ids": [1], "top_p": 0.0}, r"top_p must be a number in \(0, 1\]"),
        ({"token_ids": [1], "top_p": 1.5}, r"top_p must be a number in \(0, 1\]"),
        ({"token_ids": [1], "top_k": -1}, "top_k must be"),
        ({"token_ids": [1], "stop_token_ids": [999]}, r"stop_token_ids must be in \[0, 319\]"),
        ({"token_ids": [1] * 4096}, "prompt has 4096 tokens; the context holds 4096"),
    ],
)
def test_bad_requests_are_invalid_argument_naming_the_field(api, fields, message):
    api, _ = api
    with pytest.raises(ApiError, match=message) as err:
        generate(api, **fields)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_bad_score_requests(api):
    api, _ = api
    for ids, message in [([3], "at least 2 tokens"), ([3, 400], r"must be in \[0, 319\]")]:
        with pytest.raises(ApiError, match=message) as err:
            asyncio.run(api.score(serving_pb2.ScoreRequest(token_ids=ids)))
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_full_queue_is_resource_exhausted(tiny_checkpoint):
    ref = ReferenceModel.from_pretrained(tiny_checkpoint)
    config = EngineConfig(SchedulerConfig(max_running=1, max_step_tokens=1, prefill_chunk=1, max_queue=1))
    engine = Engine(ref.dense, ref.experts, config)
    api = MoEApi(engine, ref.spec, None)
    try:
        async def main():
            streams = [api.generate(serving_pb2.GenerateRequest(token_ids=[3] * 50, max_tokens=50)) for _ in range(4)]
            results = await asyncio.gather(*(s.__anext__() for s in streams), return_exceptions=True)
            for s in streams:
                await s.aclose()
            return results

        results = asyncio.run(main())
        refused = [r for r in results if isinstance(r, ApiError)]
        assert refused and all(r.code == grpc.StatusCode.RESOURCE_EXHAUSTED for r in refused)
        assert any(isinstance(r, serving_pb2.GenerateResponse) for r in results)
    finally:
        engine.close()
