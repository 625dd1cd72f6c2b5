"""The OpenAI-compatible HTTP API end to end: the official `openai` client (and a raw HTTP client for SSE
framing) -> Serve's HTTP proxy -> the router replica -> two expert-group actors on real Ray, loopback.

One deployment for the module (tiny checkpoint, max_running 4, max_queue 4: small enough for the
burst to overflow). gRPC is served by the same replica, so HTTP and gRPC outputs are compared
directly; both are compared with ReferenceModel token for token (tokens come back as "token_id:N"
with return_tokens_as_token_ids). The last test kills an expert group: keep it last.
"""
from __future__ import annotations

import http.client
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import ray
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers.serve import Served, served
from router_service.client import InvalidArgument, MoEClient
from router_service.model.tokenizer import Tokenizer
from router_service.serving.chat_template import ChatTemplate

MODEL = "tiny-moe"
EOS = 1
PROMPT = [5, 17, 42, 99, 3]


class Service(Served):
    def client(self) -> openai.OpenAI:  # no retries: a 429 or 503 must reach the test as it is
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.http_port}/v1", api_key="unused", max_retries=0,
                             timeout=60)

    def raw(self, method: str, path: str, body=None, timeout=60) -> http.client.HTTPConnection:
        conn = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=timeout)
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        conn.request(method, path, body=data, headers={"content-type": "application/json"})
        return conn


@pytest.fixture(scope="module")
def service(tiny_checkpoint):
    router = {"metrics_port": None, "served_model_name": MODEL, "max_running": 4, "max_queue": 4}
    with served(tiny_checkpoint, router) as s:
        yield Service(s.grpc, s.http_port, s.groups)


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    return Tokenizer.from_dir(tiny_checkpoint)


def greedy(reference, prompt: list[int], n: int) -> tuple[list[int], str]:
    """The reference's tokens as the service returns them: cut before </s>, which ends generation."""
    out = reference.generate_greedy(prompt, n)
    return (out[:out.index(EOS)], "stop") if EOS in out else (out, "length")


def ids(tokens) -> list[int]:
    return [int(t.removeprefix("token_id:")) for t in tokens]


def top_k(reference, prompt, generated, k):
    """Reference log_softmax top-k after the prompt and each generated token: [(ids, values)] per position."""
    logp = torch.log_softmax(reference(torch.tensor([prompt + generated]))[0, len(prompt) - 1:-1], dim=-1)
    return [(v.topk(k).indices.tolist(), v.topk(k).values.tolist()) for v in logp]


def test_models_and_health(service):
    assert [m.id for m in service.client().models.list().data] == [MODEL]
    assert service.client().models.retrieve(MODEL).id == MODEL
    reply = service.raw("GET", "/health").getresponse()
    assert reply.status == 200 and json.loads(reply.read()) == {"status": "ok"}


def test_completions_equal_grpc_and_the_reference(service, reference, tokenizer):
    expected, reason = greedy(reference, PROMPT, 8)
    client = service.client()
    whole = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, logprobs=3,
                                      extra_body={"return_tokens_as_token_ids": True})
    (choice,) = whole.choices
    assert ids(choice.logprobs.tokens) == expected and choice.finish_reason == reason
    assert choice.text == tokenizer.decode(expected)
    with MoEClient(service.grpc, timeout_s=60) as grpc_client:
        assert grpc_client.generate(PROMPT, max_tokens=8).token_ids == expected
    for (want_ids, want_values), got in zip(top_k(reference, PROMPT, expected, 3), choice.logprobs.top_logprobs):
        assert ids(got) == want_ids and max(abs(a - b) for a, b in zip(got.values(), want_values)) <= 1e-4
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (len(PROMPT), len(expected))
    assert whole.usage.total_tokens == len(PROMPT) + len(expected) and whole.system_fingerprint == "placement-v1"
    assert whole.object == "text_completion" and whole.id.startswith("cmpl-") and whole.model == MODEL

    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks[:-1]) == choice.text
    assert chunks[-2].choices[0].finish_reason == reason and chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == len(expected) and len({c.id for c in chunks}) == 1

    text_prompt = "route every token"  # a string prompt is tokenized as gRPC's prompt field is
    expected, _ = greedy(reference, tokenizer.encode(text_prompt), 6)
    assert client.completions.create(model=MODEL, prompt=text_prompt, max_tokens=6).choices[0].text == \
        tokenizer.decode(expected)


def test_chat_equals_the_reference(service, reference, tokenizer, tiny_checkpoint):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Route every token."}]
    prompt = tokenizer.encode(ChatTemplate.from_dir(tiny_checkpoint).render(messages), add_special_tokens=False)
    expected, reason = greedy(reference, prompt, 10)
    client = service.client()
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=10, logprobs=True,
                                           top_logprobs=2, extra_body={"return_tokens_as_token_ids": True})
    (choice,) = whole.choices
    assert ids(t.token for t in choice.logprobs.content) == expected and choice.finish_reason == reason
    assert choice.message.role == "assistant" and choice.message.content == tokenizer.decode(expected)
    for (want_ids, want_values), got in zip(top_k(reference, prompt, expected, 2), choice.logprobs.content):
        assert ids(t.token for t in got.top_logprobs) == want_ids
        assert max(abs(t.logprob - v) for t, v in zip(got.top_logprobs, want_values)) <= 1e-4
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (len(prompt), len(expected))
    assert whole.object == "chat.completion" and whole.id.startswith("chatcmpl-")

    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == choice.message.content
    assert chunks[-1].choices[0].finish_reason == reason and all(c.usage is None for c in chunks)


def test_n_choices_with_seeds(service):
    client = service.client()
    ask = lambda seed, n: client.completions.create(model=MODEL, prompt=[[3, 4, 5], [9, 8]], n=n, seed=seed,  # noqa: E731
                                                    temperature=1.0, max_tokens=12)
    first, again = ask(7, 2), ask(7, 2)
    texts = [c.text for c in sorted(first.choices, key=lambda c: c.index)]
    assert [c.index for c in first.choices] == [0, 1, 2, 3] and texts == [c.text for c in again.choices]
    assert texts[0] != texts[1]  # choice j draws with seed + j
    assert ask(8, 1).choices[1].text == texts[3]  # second prompt, second choice == second prompt with seed 8
    assert first.usage.prompt_tokens == 5
    streamed = {}
    for c in client.completions.create(model=MODEL, prompt=[[3, 4, 5], [9, 8]], n=2, seed=7, temperature=1.0,
                                       max_tokens=12, stream=True):
        streamed[c.choices[0].index] = streamed.get(c.choices[0].index, "") + c.choices[0].text
    assert [streamed[i] for i in range(4)] == texts


def clean(text: str) -> bool:
    return bool(text) and text.isprintable() and text.isascii()


def test_stop_strings_split_across_tokens(service, reference, tokenizer):
    """A stop string made of the last character of one token and the first of the next: the output
    ends before it, it is never sent (streamed or not), and usage counts the tokens generated."""
    for text_prompt in ("The quick brown fox", "Elastic serving", "def forward(self", "0123456789"):
        prompt = tokenizer.encode(text_prompt)
        generated = reference.generate_greedy(prompt, 24)
        pieces = [tokenizer.decode([t]) for t in generated]
        for i in range(len(generated) - 1):
            stop = pieces[i][-1:] + pieces[i + 1][:1]
            if EOS not in generated[:i + 2] and clean(pieces[i]) and clean(pieces[i + 1]) \
                    and stop not in tokenizer.decode(generated[:i + 1]):
                break
        else:
            continue
        break
    else:
        pytest.fail("no clean token boundary in the reference outputs: change the prompts")
    full = tokenizer.decode(generated[:i + 2])
    client = service.client()
    whole = client.completions.create(model=MODEL, prompt=text_prompt, max_tokens=24, stop=["never said", stop])
    assert whole.choices[0].text == full[:full.index(stop)] and whole.choices[0].finish_reason == "stop"
    assert whole.usage.completion_tokens == i + 2
    streamed = list(client.completions.create(model=MODEL, prompt=text_prompt, max_tokens=24, stop=stop,
                                              stream=True))
    assert "".join(c.choices[0].text for c in streamed) == full[:full.index(stop)]
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_echo(service, reference, tokenizer):
    prompt_text = "route every token"
    prompt = tokenizer.encode(prompt_text)
    expected, _ = greedy(reference, prompt, 4)
    whole = service.client().completions.create(model=MODEL, prompt=prompt_text, max_tokens=4, echo=True, logprobs=0,
                                                extra_body={"return_tokens_as_token_ids": True})
    (choice,) = whole.choices
    assert choice.text == prompt_text + tokenizer.decode(expected)
    assert ids(choice.logprobs.tokens) == prompt + expected and choice.logprobs.token_logprobs[0] is None
    logp = torch.log_softmax(reference(torch.tensor([prompt]))[0], dim=-1)
    scores = choice.logprobs.token_logprobs[1:len(prompt)]
    assert max(abs(s - float(logp[j, prompt[j + 1]])) for j, s in enumerate(scores)) <= 1e-4
    first = next(iter(service.client().completions.create(model=MODEL, prompt=prompt_text, max_tokens=4, echo=True,
                                                          stream=True)))
    assert first.choices[0].text == prompt_text


def expect_error(call, status: int, param=None, contains: str = "") -> dict:
    with pytest.raises(openai.APIStatusError) as info:
        call()
    error = info.value.body if isinstance(info.value.body, dict) else {}
    assert info.value.status_code == status and error.get("param") == param, (info.value.status_code, error)
    assert contains in error["message"] and set(error) == {"message", "type", "param", "code"}
    return error


def test_errors_have_openai_shape_and_status(service):
    client = service.client()
    completion = lambda **kw: client.completions.create(**{"model": MODEL, "prompt": PROMPT, **kw})  # noqa: E731
    error = expect_error(lambda: completion(temperature=-1), 400, "temperature", "temperature must be a finite number")
    with MoEClient(service.grpc, timeout_s=60) as grpc_client, pytest.raises(InvalidArgument) as grpc_error:
        grpc_client.generate(PROMPT, temperature=-1)
    assert error["message"] == grpc_error.value.details  # one check, one message, both protocols
    expect_error(lambda: completion(max_tokens=10**6), 400, "max_tokens", f"<= {4096 - len(PROMPT)}")
    expect_error(lambda: completion(prompt=[5, 400]), 400, "prompt", "[0, 319]")
    expect_error(lambda: completion(extra_body={"foo": 1}), 400, "foo", "unknown field")
    expect_error(lambda: completion(model="gpt-4o"), 404, "model", "does not exist")
    expect_error(lambda: client.chat.completions.create(model=MODEL, messages=[{"role": "tool", "content": "x"}]),
                 400, "messages", "roles must be")
    for method, path, body, status in (("POST", "/v1/completions", b"{not json", 400),
                                       ("GET", "/v1/nothing", None, 404), ("GET", "/v1/completions", None, 405)):
        reply = service.raw(method, path, body).getresponse()
        assert reply.status == status and set(json.loads(reply.read())["error"]) == {"message", "type", "param", "code"}
    conn = http.client.HTTPConnection("127.0.0.1", service.http_port, timeout=60)
    conn.putrequest("POST", "/v1/completions")  # announces 16 MiB + 1 and sends none of it: refused unread
    conn.putheader("content-length", str(2**24 + 1))
    conn.endheaders()
    reply = conn.getresponse()
    assert reply.status == 413 and json.loads(reply.read())["error"]["code"] == "request_too_large"


JUNK = st.one_of(st.none(), st.booleans(), st.integers(-3, 5), st.floats(allow_nan=True), st.text(max_size=5),
                 st.lists(st.integers(-1, 400), max_size=3), st.dictionaries(st.text(max_size=3), st.integers()))
BODY = st.fixed_dictionaries({"max_tokens": st.one_of(st.integers(-1, 3), JUNK)}, optional={
    name: JUNK for name in ("prompt", "messages", "temperature", "top_p", "top_k", "seed", "stop", "n", "logprobs",
                            "echo", "stream", "stop_token_ids", "top_logprobs", "model", "frequency_penalty", "x")})


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.sampled_from(["/v1/completions", "/v1/chat/completions"]), BODY)
def test_bad_bodies_never_get_a_500(service, path, body):
    reply = service.raw("POST", path, json.dumps(body, allow_nan=True).encode()).getresponse()
    data = reply.read()
    assert reply.status in (200, 400, 404), (reply.status, body, data[:300])
    if reply.status != 200:
        assert json.loads(data)["error"]["message"]


def test_sse_framing(service):
    conn = service.raw("POST", "/v1/chat/completions", {"model": MODEL, "max_tokens": 5, "stream": True,
                                                        "messages": [{"role": "user", "content": "hi"}],
                                                        "stream_options": {"include_usage": True}})
    reply = conn.getresponse()
    assert reply.status == 200 and reply.getheader("content-type").startswith("text/event-stream")
    raw = reply.read().decode()
    assert raw.endswith("data: [DONE]\n\n") and raw.count("data: [DONE]") == 1
    events = raw.split("\n\n")[:-1]
    assert all(e.startswith("data: ") and "\n" not in e for e in events)
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] >= 1
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1


def served_pairs(service, fresh: bool = True) -> tuple[int, int, int]:
    """(running, KV blocks used, (token, expert) pairs the groups have served) from the gRPC Status. The
    KV figures are live; the groups' counters come from a snapshot refreshed every second (health.py):
    fresh waits for one taken after this call began."""
    asked = time.monotonic()
    with MoEClient(service.grpc, timeout_s=60) as client:
        while True:
            status = client.status()
            if not fresh or time.monotonic() - status.age_s > asked:  # one clock: the same machine
                return status.kv.running, status.kv.blocks_used, sum(e.tokens for e in status.load)
            assert time.monotonic() < asked + 30, "the groups snapshot is not refreshed"
            time.sleep(0.1)


def test_a_client_that_disconnects_frees_its_sequence(service, reference):
    """Read a few events, drop the connection: the sequence is cancelled and its KV blocks freed long
    before it could have finished (the groups' token counters stop growing)."""
    n, prompt, spec = 2000, [7, 8, 9], reference.spec
    full = (len(prompt) + n) * spec.top_k * len(spec.sparse_layers)  # pairs the whole generation would route
    _, _, before = served_pairs(service)
    conn = service.raw("POST", "/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": n,
                                                   "stream": True, "ignore_eos": True})  # runs n unless cancelled
    reply = conn.getresponse()
    for _ in range(3):
        assert reply.readline().startswith(b"data: ") and reply.readline() == b"\n"
    conn.sock.shutdown(socket.SHUT_RDWR)  # close() alone leaves the socket open while the response holds it
    reply.close()
    conn.close()
    deadline = time.monotonic() + 30
    while served_pairs(service, fresh=False)[:2] != (0, 0):
        assert time.monotonic() < deadline, "the sequence of a client that went away still runs"
        time.sleep(0.1)
    _, _, after = served_pairs(service)
    assert after - before < full / 2, (after - before, full)
    assert served_pairs(service) == (0, 0, after)  # a second later: nothing more was routed


def test_a_full_queue_is_429(service):
    client = service.client()

    def one(i):
        try:
            return client.completions.create(model=MODEL, prompt=[3 + i, 4, 5], max_tokens=32).choices[0].finish_reason
        except openai.RateLimitError as e:
            assert e.status_code == 429 and e.body["type"] == "rate_limit_error" and "queue is full" in e.body["message"]
            return 429

    with ThreadPoolExecutor(24) as pool:
        results = list(pool.map(one, range(24)))
    assert 429 in results and all(r in (429, "stop", "length") for r in results), results
    assert client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2).choices[0].text is not None


def test_bench_serving_http_against_this_service(service, capsys, tmp_path):
    """`moectl bench serving --http --address --http-address`: both paths measured, the same tokens."""
    import argparse

    from cluster.bench import serving

    parser = argparse.ArgumentParser()
    serving.add_arguments(parser)
    args = parser.parse_args(["--http", "--address", service.grpc, "--http-address", f"127.0.0.1:{service.http_port}",
                              "--streams", "3", "--new-tokens", "6", "--prompt-tokens", "5", "--repeats", "1",
                              "--json", str(tmp_path / "bench.json")])
    assert serving.run(args) == 0
    out = capsys.readouterr().out
    assert "HTTP / gRPC: tokens/s" in out and "same tokens on both paths: 100% of streams" in out, out
    result = json.loads((tmp_path / "bench.json").read_text())["http"]["3"]
    assert result["grpc"]["tokens_per_s"] > 0 and result["http"]["tokens_per_s"] > 0 and result["agreement"] == 1
    with pytest.raises(ValueError, match="loopback"):
        serving.run(parser.parse_args(["--http", "--address", "192.0.2.1:9000", "--http-address", "192.0.2.1:8000"]))


def test_no_live_replica_is_503(service):
    """Last: a group killed for good leaves its experts without a replica."""
    ray.kill(service.groups[1], no_restart=True)
    deadline = time.monotonic() + 30
    while service.raw("GET", "/health").getresponse().status != 503:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    client = service.client()
    for stream in (False, True):
        error = expect_error(lambda: client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4,
                                                               stream=stream), 503)
        assert error["code"] == "no_live_replica" and error["type"] == "service_unavailable_error"
