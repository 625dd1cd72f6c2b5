"""The client API core: request validation names the field, results equal the reference."""
from __future__ import annotations

import asyncio
import math

import grpc
import pytest
from elasticmoe.v1 import serving_pb2
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from router_service.engine.engine import Engine, EngineConfig
from router_service.engine.scheduler import SchedulerConfig
from router_service.model.reference import ReferenceModel
from router_service.model.tokenizer import Tokenizer
from router_service.serving.api import MAX_STOP_TOKEN_IDS, PROMPT_BYTES_PER_TOKEN, ApiError, MoEApi


@pytest.fixture(scope="module")
def api(tiny_checkpoint):
    ref = ReferenceModel.from_pretrained(tiny_checkpoint)
    engine = Engine(ref.dense, ref.experts, EngineConfig(stop_at_eos=False))
    yield MoEApi(engine, ref.spec, Tokenizer.from_dir(tiny_checkpoint)), ref
    engine.close()


def generate_request(api: MoEApi, request):
    async def main():
        return [r async for r in api.generate(request)]

    return asyncio.run(main())


def generate(api: MoEApi, **fields):
    return generate_request(api, serving_pb2.GenerateRequest(**fields))


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


def with_unknown_field(message, number: int = 127):
    """message re-parsed with one extra varint field `number`, as a newer client would send it."""
    tag = bytes([((number << 3) & 0x7F) | 0x80, number >> 4])  # a two-byte varint tag, wire type 0
    return type(message).FromString(message.SerializeToString() + tag + b"\x01")


def test_unknown_fields_are_refused_by_number(api):
    api, _ = api
    request = with_unknown_field(serving_pb2.GenerateRequest(token_ids=[3, 4], max_tokens=2))
    with pytest.raises(ApiError, match=r"GenerateRequest has fields this server does not know \(numbers \[127\]\)") \
            as err:
        generate_request(api, request)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(ApiError, match=r"ScoreRequest .*numbers \[100\]"):
        asyncio.run(api.score(with_unknown_field(serving_pb2.ScoreRequest(token_ids=[3, 4]), 100)))
    assert len(generate(api, token_ids=[3, 4], max_tokens=2)) >= 1  # the same request without it is served


def test_expert_stage_failures_map_to_what_the_client_can_do():
    from router_service.serving.api import dispatch_failure
    from router_service.serving.dispatch import DispatchError

    code = grpc.StatusCode
    for inner, outer in [(code.UNAVAILABLE, code.UNAVAILABLE), (code.DEADLINE_EXCEEDED, code.DEADLINE_EXCEEDED),
                         (code.UNAUTHENTICATED, code.INTERNAL), (code.INVALID_ARGUMENT, code.INTERNAL)]:
        error = dispatch_failure(DispatchError("10.0.0.7:4321", inner, "why at 10.0.0.7:4321", public="(0, 3)"))
        assert error.code == outer and error.message == "(0, 3)"  # the experts, never a group's address
        error = dispatch_failure(DispatchError("10.0.0.7:4321", inner, "failed to connect to 10.0.0.7:4321"))
        assert "10.0.0.7" not in error.message and inner.name in error.message


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


# ---- property-based: validation agrees with a plain, obviously-correct reference ---------------

VOCAB, CONTEXT = 320, 4096  # the tiny checkpoint's
INT32 = st.integers(-2**31, 2**31 - 1)
EDGE_TOKEN = st.sampled_from([-1, 0, VOCAB - 1, VOCAB])
TOKEN = st.one_of(st.integers(0, VOCAB - 1), EDGE_TOKEN, INT32)
TOKENS = st.one_of(st.lists(TOKEN, max_size=8),
                   st.tuples(st.lists(st.integers(0, VOCAB - 1), max_size=4), EDGE_TOKEN).map(lambda t: t[0] + [t[1]]),
                   st.sampled_from([CONTEXT - 2, CONTEXT - 1, CONTEXT, CONTEXT + 1]).map(lambda n: [3] * n))
EDGES = st.sampled_from([0.0, -0.0, 1.0, 1.0000001, 1e-45, -1e-45, math.inf, -math.inf, math.nan])
ANY_VALUE = {  # per field: in range, at its edges, or anything protobuf can carry
    "prompt": st.text(max_size=12),
    "token_ids": TOKENS,
    "max_tokens": st.one_of(st.integers(1, 6), st.sampled_from([-1, 0, CONTEXT - 9, CONTEXT - 8, CONTEXT - 1, CONTEXT]),
                            INT32),
    "temperature": st.one_of(st.floats(0, 2, width=32), EDGES, st.floats(width=32)),
    "top_p": st.one_of(st.floats(0, 1, width=32), EDGES, st.floats(width=32)),
    "top_k": st.one_of(st.integers(-2, 4), INT32),
    "stop_token_ids": TOKENS,
    "seed": st.integers(0, 2**64 - 1),
    "logprobs": st.booleans(),
}
VALID_VALUE = {
    "max_tokens": st.integers(1, 6), "temperature": st.floats(0, 2, width=32),
    "top_p": st.floats(0.0625, 1, width=32), "top_k": st.integers(0, 4),
    "stop_token_ids": st.lists(st.integers(0, VOCAB - 1), max_size=3), "seed": st.integers(0, 2**64 - 1),
    "logprobs": st.booleans(),
}


@st.composite
def one_field_off(draw) -> dict:
    """A valid request with one field redrawn from anything: where a single missed check shows."""
    fields = draw(st.fixed_dictionaries({"token_ids": st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=8)},
                                        optional=VALID_VALUE))
    name = draw(st.sampled_from(sorted(ANY_VALUE)))
    fields[name] = draw(ANY_VALUE[name])
    if name == "prompt" and draw(st.booleans()):
        del fields["token_ids"]
    return fields


GENERATE_FIELDS = st.one_of(one_field_off(), st.fixed_dictionaries({}, optional=ANY_VALUE))


def invalid_generate_fields(request: serving_pb2.GenerateRequest, tokenizer, max_new_tokens: int) -> set[str]:
    """Every field the request gets wrong, read back from the message (so float32 rounding counts)."""
    bad = set()
    in_vocab = lambda ids: all(0 <= t < VOCAB for t in ids)  # noqa: E731
    if request.prompt and request.token_ids:
        bad |= {"prompt", "token_ids"}
        prompt = []
    elif request.prompt:
        if len(request.prompt.encode()) > PROMPT_BYTES_PER_TOKEN * CONTEXT:
            return {"prompt"}  # refused before it is tokenized
        prompt = tokenizer.encode(request.prompt)
    else:
        prompt = list(request.token_ids)
        if not in_vocab(prompt) or len(prompt) > CONTEXT:
            bad.add("token_ids")
    if not prompt and not bad:
        bad.add("prompt")  # empty
    if len(prompt) >= CONTEXT:
        bad.add("prompt")  # no room to generate
    if not in_vocab(request.stop_token_ids) or len(request.stop_token_ids) > MAX_STOP_TOKEN_IDS:
        bad.add("stop_token_ids")
    if request.HasField("temperature") and not (math.isfinite(request.temperature) and request.temperature >= 0):
        bad.add("temperature")
    if request.HasField("top_p") and not (math.isfinite(request.top_p) and 0 < request.top_p <= 1):
        bad.add("top_p")
    if request.top_k < 0:
        bad.add("top_k")
    limit = min(max_new_tokens, CONTEXT - len(prompt))
    if request.HasField("max_tokens") and not 1 <= request.max_tokens <= limit:
        bad.add("max_tokens")
    return bad


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fields=GENERATE_FIELDS)
@example(fields={"token_ids": [VOCAB - 1], "stop_token_ids": [VOCAB - 1], "max_tokens": CONTEXT - 1})  # all edges, valid
@example(fields={"token_ids": [VOCAB]})
@example(fields={"token_ids": [1], "stop_token_ids": [VOCAB]})
@example(fields={"token_ids": [1], "max_tokens": CONTEXT})
def test_generate_validation_matches_the_reference(api, fields):
    api, _ = api
    request = serving_pb2.GenerateRequest(**fields)
    bad = invalid_generate_fields(request, api.tokenizer, api.engine.config.max_new_tokens)
    try:
        prompt, params = api.validate_generate(request)
    except ApiError as e:
        assert e.code == grpc.StatusCode.INVALID_ARGUMENT
        assert bad, f"refused a valid request: {e.message}"
        assert any(field in e.message for field in bad), (e.message, bad)  # names a field it got wrong
        assert any(word in e.message for word in ("must be", "context holds", "exactly one", "is empty",
                                                  "must hold"))
    else:
        assert not bad, f"accepted a request wrong in {bad}"
        assert 1 <= params.max_tokens <= CONTEXT - len(prompt) and all(0 <= t < VOCAB for t in prompt)


@settings(max_examples=200, deadline=None)
@given(ids=st.one_of(st.lists(TOKEN, max_size=6), st.sampled_from([CONTEXT, CONTEXT + 1]).map(lambda n: [4] * n)))
def test_score_validation_matches_the_reference(api, ids):
    api, _ = api
    valid = 2 <= len(ids) <= CONTEXT and all(0 <= t < VOCAB for t in ids)
    try:
        assert api.validate_score(serving_pb2.ScoreRequest(token_ids=ids)) == ids and valid
    except ApiError as e:
        assert not valid and e.code == grpc.StatusCode.INVALID_ARGUMENT and "token_ids" in e.message


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(token_ids=st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=6), max_tokens=st.integers(1, 4),
       temperature=st.floats(0, 2, width=32), top_p=st.floats(0.0625, 1, width=32), top_k=st.integers(0, 5),
       seed=st.integers(0, 2**64 - 1))
def test_valid_requests_stream_to_a_finish(api, token_ids, max_tokens, temperature, top_p, top_k, seed):
    api, _ = api
    responses = generate(api, token_ids=token_ids, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                         top_k=top_k, seed=seed, logprobs=True)
    tokens = [t for r in responses for t in r.token_ids]
    assert 1 <= len(tokens) <= max_tokens and all(0 <= t < VOCAB for t in tokens)
    assert responses[-1].finish_reason in ("stop", "length") and not any(r.finish_reason for r in responses[:-1])
    assert all(len(r.logprobs) == len(r.token_ids) and all(lp <= 0 for lp in r.logprobs) for r in responses)


# ---- sizes before work, off the event loop, text streamed incrementally, internal errors contained ----

def test_sizes_are_checked_before_anything_is_walked_or_tokenized(api, monkeypatch):
    api, _ = api
    calls = []
    monkeypatch.setattr(api.tokenizer, "encode", lambda text: calls.append(len(text)) or [5])
    limit = PROMPT_BYTES_PER_TOKEN * CONTEXT
    with pytest.raises(ApiError, match=f"prompt must be at most {limit} bytes"):
        api.validate_generate(serving_pb2.GenerateRequest(prompt="é" * (limit // 2 + 1)))  # 2 bytes a character
    assert calls == []  # never tokenized
    with pytest.raises(ApiError, match=f"stop_token_ids holds {MAX_STOP_TOKEN_IDS + 1} ids; it must hold at most"):
        api.validate_generate(serving_pb2.GenerateRequest(token_ids=[5], stop_token_ids=[VOCAB + 7] * (MAX_STOP_TOKEN_IDS + 1)))
    with pytest.raises(ApiError, match=f"token_ids has {CONTEXT + 1} tokens; the context holds {CONTEXT}"):
        api.validate_score(serving_pb2.ScoreRequest(token_ids=[VOCAB + 1] * (CONTEXT + 1)))  # counted, not walked


def test_text_is_tokenized_off_the_event_loop(api, monkeypatch):
    import threading

    api, _ = api
    threads = []
    encode = api.tokenizer.encode
    monkeypatch.setattr(api.tokenizer, "encode", lambda text: threads.append(threading.current_thread()) or encode(text))

    async def main():
        loop_thread = threading.current_thread()
        out = [r async for r in api.generate(serving_pb2.GenerateRequest(prompt="Mixture", max_tokens=2))]
        return loop_thread, out

    loop_thread, out = asyncio.run(main())
    assert threads and all(t is not loop_thread for t in threads) and out


def test_streamed_text_is_incremental_and_equals_the_whole_decode(api):
    api, _ = api
    stream = api.tokenizer.stream()
    ids = api.tokenizer.encode("héllo wörld — ok 😀 done")
    pieces = [stream.add([i]) for i in ids]
    assert "".join(pieces) == api.tokenizer.decode(ids)
    assert "" in pieces  # a multi-byte character waits for the token that completes it


def test_an_internal_failure_is_internal_with_no_detail_and_fails_no_neighbour(api, monkeypatch):
    api, ref = api
    real_append = api.engine._append

    def append(seq, token, logprob, *top):  # one request's postprocessing breaks on the engine thread
        if seq.prompt == [9, 9, 9]:
            raise RuntimeError("secret internal detail")
        real_append(seq, token, logprob, *top)

    monkeypatch.setattr(api.engine, "_append", append)

    async def main():
        async def one(ids):
            try:
                return [t for r in [r async for r in api.generate(serving_pb2.GenerateRequest(
                    token_ids=ids, max_tokens=6))] for t in r.token_ids]
            except ApiError as e:
                return e

        return await asyncio.gather(one([9, 9, 9]), one([5, 6, 7]))

    broken, fine = asyncio.run(main())
    assert isinstance(broken, ApiError) and broken.code == grpc.StatusCode.INTERNAL
    assert "secret" not in broken.message and "incident" in broken.message
    assert fine == ref.generate_greedy([5, 6, 7], 6)[:len(fine)] and fine


F32 = st.sampled_from([0.0, -0.0, 1e-45, 1.4e-45, 1.17e-38, 1e-30, 0.5, 1.0, 1.0000001, 2.0, 1e30, 3.4e38,
                       float("nan"), float("inf"), float("-inf"), -1e-45, -1.0])
EXTREMES = st.fixed_dictionaries({}, optional={
    "temperature": F32, "top_p": F32,
    "top_k": st.sampled_from([0, 1, 2, 2**31 - 1, -1, -2**31]),
    "seed": st.sampled_from([0, 1, 2**63, 2**64 - 1]),
    "max_tokens": st.sampled_from([1, 2, 3, 0, -1, 2**31 - 1, -2**31]),
})


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(extremes=st.lists(EXTREMES, min_size=1, max_size=4))
def test_numeric_extremes_sample_or_are_refused_and_never_fail_a_neighbour(api, extremes):
    """Every numeric field at its extremes (subnormal, huge, -0.0, NaN, infinities, int bounds),
    through validation and the real engine, several at once beside a greedy stream: each is refused
    INVALID_ARGUMENT naming its field or samples to a finish; the greedy stream equals the reference."""
    api, ref = api
    prompt = [5, 17, 42]

    async def main():
        async def one(fields):
            try:
                out = [r async for r in api.generate(serving_pb2.GenerateRequest(token_ids=prompt, **fields))]
                return [t for r in out for t in r.token_ids], out[-1].finish_reason
            except ApiError as e:
                return e

        return await asyncio.gather(one({"max_tokens": 4}), *(one(f) for f in extremes))

    greedy, *others = asyncio.run(main())
    assert not isinstance(greedy, ApiError) and greedy[0] == ref.generate_greedy(prompt, 4)[:len(greedy[0])]
    for fields, result in zip(extremes, others):
        if isinstance(result, ApiError):
            assert result.code == grpc.StatusCode.INVALID_ARGUMENT, (fields, result.message)
            assert any(name in result.message for name in fields), (fields, result.message)
        else:
            tokens, reason = result
            assert reason in ("stop", "length") and all(0 <= t < VOCAB for t in tokens), (fields, result)


def test_the_largest_legal_request_fits_the_message_cap_and_little_more(api):
    """moectl serve caps client messages at max_request_bytes(spec): every request validation accepts
    fits under it, and it is far below the 16 MiB general cap for a model of this context."""
    from router_service.serving.api import max_request_bytes

    api, _ = api
    cap = max_request_bytes(api.spec)
    largest_text = serving_pb2.GenerateRequest(prompt="a" * (PROMPT_BYTES_PER_TOKEN * CONTEXT), max_tokens=1,
                                               stop_token_ids=[VOCAB - 1] * MAX_STOP_TOKEN_IDS, temperature=1.0,
                                               top_p=0.5, top_k=2**31 - 1, seed=2**64 - 1, logprobs=True)
    largest_ids = serving_pb2.GenerateRequest(token_ids=[2**31 - 1] * CONTEXT, stop_token_ids=[2**31 - 1] * MAX_STOP_TOKEN_IDS,
                                              max_tokens=2**31 - 1, temperature=1.0, top_p=0.5, seed=2**64 - 1)
    assert max(largest_text.ByteSize(), largest_ids.ByteSize()) <= cap < 16 * 2**20
