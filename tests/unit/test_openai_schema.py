"""OpenAI requests -> Plan: HTTP accepts and refuses exactly what gRPC does, and names the field it refuses."""
from __future__ import annotations

import pytest
from elasticmoe.v1 import serving_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from router_service.engine.engine import Engine, EngineConfig
from router_service.model.reference import ReferenceModel
from router_service.model.tokenizer import Tokenizer
from router_service.serving.api import ApiError, MoEApi
from router_service.serving.chat_template import ChatTemplate
from router_service.serving.openai_errors import OpenAIError
from router_service.serving.openai_schema import MAX_CHOICES, check_model, parse


@pytest.fixture(scope="module")
def api(tiny_checkpoint):
    ref = ReferenceModel.from_pretrained(tiny_checkpoint)
    engine = Engine(ref.dense, ref.experts, EngineConfig())
    yield MoEApi(engine, ref.spec, Tokenizer.from_dir(tiny_checkpoint))
    engine.close()


@pytest.fixture(scope="module")
def template(tiny_checkpoint):
    return ChatTemplate.from_dir(tiny_checkpoint)


def refused(kind, body, api, template=None) -> OpenAIError:
    with pytest.raises(OpenAIError) as info:
        parse(kind, body, api, template)
    return info.value


# Values the proto can hold (gRPC clients can send them), valid or not for the server.
INT32 = st.integers(-2**31, 2**31 - 1)
FIELDS = {"max_tokens": st.one_of(st.integers(-2, 5000), INT32),
          "temperature": st.one_of(st.floats(-1, 5, width=32), st.floats(width=32), st.integers(-3, 3)),
          "top_p": st.one_of(st.floats(-0.5, 1.5, width=32), st.floats(width=32)),
          "top_k": st.one_of(st.integers(-2, 400), INT32),
          "seed": st.integers(0, 2**64 - 1),
          "stop_token_ids": st.lists(st.one_of(st.integers(-3, 330), INT32), max_size=3)}


@settings(max_examples=300, deadline=None)
@given(st.fixed_dictionaries({}, optional=FIELDS), st.lists(st.integers(-2, 330), max_size=6))
def test_http_accepts_and_refuses_what_grpc_does(api, fields, prompt):
    try:
        expected = api.validate_generate(serving_pb2.GenerateRequest(token_ids=prompt, **fields))
    except ApiError as e:
        expected = e
    try:
        plan = parse("completion", {"prompt": prompt or "", **fields}, api, None)
    except OpenAIError as e:
        assert isinstance(expected, ApiError), (fields, e.message)
        assert e.status == 400 and e.type == "invalid_request_error"
        assert e.param in fields or e.param == "prompt", (e.param, e.message)
        assert e.message.startswith(e.param)  # names the field as this request spelled it
        return
    assert not isinstance(expected, ApiError), (fields, expected.message)
    (p,) = plan.prompts
    assert (p.ids, p.params) == expected


@pytest.mark.parametrize("name", sorted(FIELDS))
def test_values_the_proto_cannot_hold_are_400_naming_the_field(api, name):
    floats = name in ("temperature", "top_p")  # 2**70 is a float32 (a valid temperature); inf is refused later
    for bad in ("1", True, {"a": 1}, [1]) + (() if floats else (2**70, -2**70, 1.5)):
        e = refused("completion", {"prompt": "x", name: [bad] if name == "stop_token_ids" else bad}, api)
        assert e.status == 400 and e.param == name and e.message.startswith(f"{name} must be")


@pytest.mark.parametrize("body, param, match", [
    ({"prompt": "x", "frequency_penalty": 0.5}, "frequency_penalty", "not supported"),
    ({"prompt": "x", "best_of": 2}, "best_of", "not supported"),
    ({"prompt": "x", "functions": []}, "functions", "unknown field"),
    ({"prompt": "x", "messages": []}, "messages", "unknown field"),
    ({"prompt": []}, "prompt", "not empty"),
    ({"prompt": [1, "a"]}, "prompt", "list of token ids"),
    ({"prompt": [[1, 2], [3, 999]]}, "prompt", r"prompt must be in \[0, 319\], got 999"),
    ({"prompt": [2**40]}, "prompt", r"prompt token ids must be in \[0, 319\]"),
    ({"prompt": "x", "n": 0}, "n", r"n must be an integer in \[1, 16\]"),
    ({"prompt": ["x"] * 5, "n": 16}, "n", f"<= {MAX_CHOICES}"),
    ({"prompt": "x", "stop": [""]}, "stop", "1 to 256 characters"),
    ({"prompt": "x", "stop": ["a"] * 17}, "stop", "at most 16"),
    ({"prompt": "x", "logprobs": 21}, "logprobs", r"\[0, 20\]"),
    ({"prompt": "x", "echo": "yes"}, "echo", "true or false"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options", "only with stream"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens", r"max_tokens must be an integer >= 1, <= 4095, got 0"),
    ({"prompt": "x", "temperature": -1}, "temperature", "temperature must be a finite number >= 0"),
    ({"prompt": "x" * 5000}, "prompt", "prompt has"),
])
def test_completion_refusals_name_the_field(api, body, param, match):
    e = refused("completion", body, api)
    assert (e.status, e.param) == (400, param)
    assert __import__("re").search(match, e.message), e.message


@pytest.mark.parametrize("body, param, match", [
    ({"messages": []}, "messages", "non-empty list"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, "messages[0].tool_calls", "not supported"),
    ({"messages": [{"role": "", "content": "x"}]}, "messages[0].role", "non-empty string"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages[0].content",
     "text only"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages", "roles must be system, user or assistant"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 1, "max_completion_tokens": 1},
     "max_completion_tokens", "not both"),
    ({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0}, "max_completion_tokens",
     "max_completion_tokens must be an integer >= 1"),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs", "needs logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "echo": True}, "echo", "unknown field"),
])
def test_chat_refusals_name_the_field(api, template, body, param, match):
    e = refused("chat", body, api, template)
    assert (e.status, e.param) == (400, param)
    assert __import__("re").search(match, e.message), e.message


def test_chat_without_a_template_is_400_saying_so(api):
    e = refused("chat", {"messages": [{"role": "user", "content": "hi"}]}, api, None)
    assert e.status == 400 and "no chat template" in e.message and "tokenizer_config.json" in e.message


def test_prompt_forms_choices_and_seeds(api, template):
    tok = api.tokenizer
    plan = parse("completion", {"prompt": ["ab", "cd"], "n": 2, "seed": 2**64 - 1, "temperature": 1.0}, api, None)
    assert [p.ids for p in plan.prompts] == [tok.encode("ab"), tok.encode("cd")]
    assert [(i, p, params.seed) for i, p, params in plan.choices()] == [(0, 0, 2**64 - 1), (1, 0, 0),
                                                                       (2, 1, 2**64 - 1), (3, 1, 0)]
    assert [p.text for p in parse("completion", {"prompt": [[5, 6], [7]]}, api, None).prompts] == \
        [tok.decode([5, 6]), tok.decode([7])]
    chat = parse("chat", {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                    {"type": "text", "text": "b"}]}],
                          "stop": "x", "logprobs": True, "top_logprobs": 3, "ignore_eos": True}, api, template)
    (p,) = chat.prompts
    assert p.ids == tok.encode(template.render([{"role": "user", "content": "a\nb"}]), add_special_tokens=False)
    assert p.params.max_tokens == 4096 - len(p.ids) and p.params.top_logprobs == 3 and chat.stop == ("x",)
    assert p.params.ignore_eos and not plan.prompts[0].params.ignore_eos


def test_unknown_model_is_404_and_a_missing_one_is_the_served_one():
    check_model({}, "demo")
    check_model({"model": "demo"}, "demo")
    with pytest.raises(OpenAIError) as info:
        check_model({"model": "gpt-4o"}, "demo")
    assert (info.value.status, info.value.code, info.value.param) == (404, "model_not_found", "model")
    with pytest.raises(OpenAIError) as info:
        check_model({"model": ["demo"]}, "demo")
    assert (info.value.status, info.value.param) == (400, "model")
