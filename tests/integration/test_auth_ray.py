"""Bearer tokens through the real path: SDK -> Serve gRPC ingress -> router replica, real Ray; and the
same tokens on the OpenAI-compatible HTTP API of the same replica (the official openai client).

The replica gets its tokens from all three sources at once: SHA-256 digests in its config
(what `moectl serve` passes), a token file it reads at start, and an environment variable.
"""
from __future__ import annotations

import json
import os
import urllib.error
import urllib.request

import grpc
import openai
import pytest
from elasticmoe.v1 import serving_pb2, serving_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cluster.bench.overload import local_service
from cluster.state.redis_server import free_port
from router_service.client import MoEClient, Unauthenticated
from router_service.serving.auth import digest

BY_DIGEST, BY_FILE, BY_ENV = "digest-token-0123456789abcdef", "file-token-0123456789abcdef", "env-token-0123456789ab"
ENV = "ELASTICMOE_TEST_API_TOKENS"
WRONG = "wrong-token-0123456789abcdef"
PROMPT = [5, 17, 42, 99, 3]


HTTP_PORT = free_port()


@pytest.fixture(scope="module")
def address(tiny_checkpoint, tmp_path_factory):
    token_file = tmp_path_factory.mktemp("auth") / "tokens"
    token_file.write_text(f"# client API tokens\n{BY_FILE}\n")
    token_file.chmod(0o600)
    router = {"api_token_sha256": [digest(BY_DIGEST)], "api_tokens_file": str(token_file), "api_tokens_env": ENV}
    os.environ[ENV] = BY_ENV  # the local Ray started next, and so the replica, inherits it
    try:
        with local_service(str(tiny_checkpoint), 2, router, num_cpus=2, http_port=HTTP_PORT) as address:
            yield address
    finally:
        os.environ.pop(ENV, None)


@pytest.mark.parametrize("token", [None, WRONG])
def test_missing_or_wrong_token_is_unauthenticated_on_every_call(address, token):
    with MoEClient(address, token=token, timeout_s=60) as client:
        for call in (lambda: client.generate(PROMPT, max_tokens=2), lambda: client.score(PROMPT), client.status):
            with pytest.raises(Unauthenticated) as info:
                call()
            assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
            assert "bearer token" in info.value.details and WRONG not in info.value.details


def test_unauthenticated_stream_carries_no_tokens(address):
    """Without the SDK: the status is UNAUTHENTICATED and the one message before it is empty."""
    with grpc.insecure_channel(address) as channel:
        call = serving_pb2_grpc.MoEServiceStub(channel).Generate(
            serving_pb2.GenerateRequest(token_ids=PROMPT, max_tokens=4), timeout=60,
            metadata=(("authorization", f"Bearer {WRONG}"),))
        received = []
        with pytest.raises(grpc.RpcError) as info:
            for response in call:
                received.append(response)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert all(not r.token_ids and not r.finish_reason for r in received)


@pytest.mark.parametrize("token", [BY_DIGEST, BY_FILE, BY_ENV])
def test_each_configured_token_is_accepted(address, token):
    with MoEClient(address, token=token, timeout_s=60) as client:
        completion = client.generate(PROMPT, max_tokens=3)
        assert completion.finish_reason in ("length", "stop") and len(client.score(PROMPT)) == len(PROMPT) - 1
        assert client.status().serving


def test_health_check_needs_no_token(address):
    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=60)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def openai_client(token: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{HTTP_PORT}/v1", api_key=token, max_retries=0, timeout=60)


@pytest.mark.parametrize("token", ["not one token", WRONG])
def test_http_without_a_valid_token_is_401(address, token):
    client = openai_client(token)  # "Bearer not one token" is malformed; WRONG is a wrong token
    for call in (client.models.list, lambda: client.completions.create(model="x", prompt=PROMPT, max_tokens=2),
                 lambda: client.chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}])):
        with pytest.raises(openai.AuthenticationError) as info:
            call()
        assert info.value.status_code == 401 and info.value.body["code"] == "invalid_api_key"
        assert "bearer" in info.value.body["message"].lower() and token not in info.value.body["message"]
        assert info.value.response.headers["www-authenticate"] == "Bearer"
    try:  # no Authorization header at all
        urllib.request.urlopen(f"http://127.0.0.1:{HTTP_PORT}/v1/models", timeout=60)
        raise AssertionError("served without a token")
    except urllib.error.HTTPError as e:
        assert e.code == 401 and json.loads(e.read())["error"]["message"].startswith("missing bearer token")


@pytest.mark.parametrize("token", [BY_DIGEST, BY_FILE, BY_ENV])
def test_http_accepts_the_same_tokens_as_grpc(address, token):
    client = openai_client(token)
    (model,) = client.models.list().data
    completion = client.completions.create(model=model.id, prompt=PROMPT, max_tokens=3)
    with MoEClient(address, token=token, timeout_s=60) as grpc_client:
        assert completion.choices[0].text == grpc_client.generate(PROMPT, max_tokens=3).text


def test_http_health_needs_no_token(address):
    reply = urllib.request.urlopen(f"http://127.0.0.1:{HTTP_PORT}/health", timeout=60)
    assert reply.status == 200 and json.loads(reply.read()) == {"status": "ok"}
