"""Bearer tokens through the real path: SDK -> Serve gRPC ingress -> router replica, real Ray.

The replica gets its tokens from all three sources at once: SHA-256 digests in its config
(what `moectl serve` passes), a token file it reads at start, and an environment variable.
"""
from __future__ import annotations

import os

import grpc
import pytest
from elasticmoe.v1 import serving_pb2, serving_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cluster.bench.overload import local_service
from router_service.client import MoEClient, Unauthenticated
from router_service.serving.auth import digest

BY_DIGEST, BY_FILE, BY_ENV = "digest-token-0123456789abcdef", "file-token-0123456789abcdef", "env-token-0123456789ab"
ENV = "ELASTICMOE_TEST_API_TOKENS"
WRONG = "wrong-token-0123456789abcdef"
PROMPT = [5, 17, 42, 99, 3]


@pytest.fixture(scope="module")
def address(tiny_checkpoint, tmp_path_factory):
    token_file = tmp_path_factory.mktemp("auth") / "tokens"
    token_file.write_text(f"# client API tokens\n{BY_FILE}\n")
    token_file.chmod(0o600)
    router = {"api_token_sha256": [digest(BY_DIGEST)], "api_tokens_file": str(token_file), "api_tokens_env": ENV}
    os.environ[ENV] = BY_ENV  # the local Ray started next, and so the replica, inherits it
    try:
        with local_service(str(tiny_checkpoint), 2, router, num_cpus=2) as address:
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
