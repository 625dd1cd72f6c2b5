"""The client SDK against a fake MoEService on a real gRPC server (the SDK is the unit under test)."""
from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from elasticmoe.v1 import serving_pb2, serving_pb2_grpc

from helpers.pki import make_pki
from router_service.client import (
    AsyncMoEClient,
    Chunk,
    Completion,
    DeadlineExceeded,
    InvalidArgument,
    MoEClient,
    MoEError,
    ReplicaLost,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)

TOKENS = [5, 6, 7]  # what the fake generates, one token per chunk
LOGPROBS = [-0.5, -1.0, -1.5]  # exact in float32
FAST = dict(max_attempts=3, backoff_s=0.01)


class FakeMoE(serving_pb2_grpc.MoEServiceServicer):
    """Streams canned tokens and records what it received; knobs make it fail on purpose."""

    def __init__(self):
        self.requests: list = []
        self.metadata: list[dict[str, str]] = []
        self.lock = threading.Lock()
        self.fail_first = 0  # abort this many calls with fail_code, then behave
        self.fail_code, self.fail_details = grpc.StatusCode.UNAVAILABLE, "warming up"
        self.fail_after_chunks: int | None = None  # Generate: abort with mid_stream_status after this many chunks
        self.mid_stream_status = grpc.StatusCode.UNAVAILABLE, "replica lost mid-stream"
        self.required_token: str | None = None
        self.hang = False  # block until the client gives up
        self.endless = False  # Generate: stream until cancelled
        self.stopped = threading.Event()  # the endless stream saw its call end

    @property
    def calls(self) -> int:
        return len(self.requests)

    def _enter(self, request, context):
        metadata = dict(context.invocation_metadata())
        with self.lock:
            self.requests.append(request)
            self.metadata.append(metadata)
            n = len(self.requests)
        if self.required_token and metadata.get("authorization") != f"Bearer {self.required_token}":
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")
        if n <= self.fail_first:
            context.abort(self.fail_code, self.fail_details)
        if self.hang:
            ended = threading.Event()
            context.add_callback(ended.set)  # fires when the client's deadline ends the call
            ended.wait(10)

    def Generate(self, request, context):
        self._enter(request, context)
        if self.endless:
            # Ends only by cancellation (or the 60 s deadline). The callback, not code after the
            # loop: once a send fails on a cancelled call, grpc stops pulling from this generator.
            context.add_callback(self.stopped.set)
            while context.is_active():
                yield serving_pb2.GenerateResponse(token_ids=[1], text="x")
                time.sleep(0.005)
            return
        for i, token in enumerate(TOKENS):
            if self.fail_after_chunks == i:
                context.abort(*self.mid_stream_status)
            last = i == len(TOKENS) - 1
            yield serving_pb2.GenerateResponse(token_ids=[token], text=f"<{token}>",
                                               logprobs=[LOGPROBS[i]] if request.logprobs else [],
                                               finish_reason="length" if last else "")

    def Score(self, request, context):
        self._enter(request, context)
        return serving_pb2.ScoreResponse(logprobs=[-float(i) for i in range(1, len(request.token_ids))])

    def Status(self, request, context):
        self._enter(request, context)
        return serving_pb2.StatusResponse(
            serving=True, placement_version=3, model="fake-moe",
            groups=[serving_pb2.GroupStatus(name="g0", address="10.0.0.1:7000", health="SERVING",
                                            experts=[serving_pb2.ExpertRef(layer=0, expert=1)])])


@pytest.fixture
def fake():
    servicer = FakeMoE()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    serving_pb2_grpc.add_MoEServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    servicer.address = f"127.0.0.1:{port}"
    yield servicer
    server.stop(grace=None).wait()


@pytest.fixture
def client(fake):
    with MoEClient(fake.address, **FAST) as c:
        yield c


def test_generate_with_prompt_sends_every_field(fake, client):
    completion = client.generate("hello", max_tokens=3, temperature=0.5, top_p=0.9, top_k=4, seed=7,
                                 stop_token_ids=(2, 9), logprobs=True)
    assert completion == Completion(token_ids=TOKENS, text="<5><6><7>", logprobs=LOGPROBS, finish_reason="length")
    (request,) = fake.requests
    assert request.prompt == "hello" and list(request.token_ids) == []
    assert (request.max_tokens, request.top_k, request.seed, list(request.stop_token_ids)) == (3, 4, 7, [2, 9])
    assert request.temperature == 0.5 and request.top_p == pytest.approx(0.9) and request.logprobs


def test_generate_with_token_ids_leaves_defaults_to_the_server(fake, client):
    completion = client.generate([1, 2, 3])
    assert completion.logprobs is None and completion.token_ids == TOKENS
    (request,) = fake.requests
    assert request.prompt == "" and list(request.token_ids) == [1, 2, 3]
    assert request.max_tokens == 16 and request.HasField("temperature") and request.temperature == 0
    assert not request.HasField("top_p") and not request.HasField("seed") and not request.logprobs


def test_stream_yields_chunks_as_sent(client):
    chunks = list(client.stream([1], logprobs=True))
    assert chunks == [Chunk([5], "<5>", [-0.5], None), Chunk([6], "<6>", [-1.0], None),
                      Chunk([7], "<7>", [-1.5], "length")]
    assert [c.logprobs for c in client.stream([1])] == [None, None, None]


def test_closing_a_stream_early_cancels_the_call(fake, client):
    fake.endless = True
    stream = client.stream([1])
    assert next(stream).token_ids == [1]
    stream.close()
    assert fake.stopped.wait(5), "the server kept generating after the client stopped reading"


def test_score_and_status(fake, client):
    assert client.score([4, 5, 6, 7]) == [-1.0, -2.0, -3.0]
    assert list(fake.requests[0].token_ids) == [4, 5, 6, 7]
    status = client.status()
    assert status.serving and status.placement_version == 3 and status.model == "fake-moe"
    assert status.groups[0].experts[0].expert == 1


def test_bearer_token_is_sent_as_metadata(fake):
    with MoEClient(fake.address, token="s3cret") as c:
        c.status()
    with MoEClient(fake.address) as c:
        c.status()
    assert fake.metadata[0]["authorization"] == "Bearer s3cret"
    assert "authorization" not in fake.metadata[1]
    fake.required_token = "s3cret"
    with MoEClient(fake.address, token="wrong") as c, pytest.raises(Unauthenticated) as info:
        c.generate([1])
    assert info.value.code == grpc.StatusCode.UNAUTHENTICATED and "bearer token" in info.value.details


@pytest.mark.parametrize("code,error", [
    (grpc.StatusCode.INVALID_ARGUMENT, InvalidArgument), (grpc.StatusCode.RESOURCE_EXHAUSTED, ResourceExhausted),
    (grpc.StatusCode.UNAUTHENTICATED, Unauthenticated), (grpc.StatusCode.NOT_FOUND, MoEError),
    (grpc.StatusCode.INTERNAL, MoEError),
])
@pytest.mark.parametrize("method", ["generate", "score", "status"])
def test_status_codes_map_to_typed_errors_without_retry(fake, client, code, error, method):
    fake.fail_first, fake.fail_code, fake.fail_details = 99, code, f"details of {code.name}"
    call = {"generate": lambda: client.generate([1]), "score": lambda: client.score([1, 2]),
            "status": client.status}[method]
    with pytest.raises(MoEError) as info:
        call()
    assert type(info.value) is error and not isinstance(info.value, grpc.RpcError)
    assert info.value.code == code and info.value.details == f"details of {code.name}"
    assert code.name in str(info.value) and fake.calls == 1  # only UNAVAILABLE is retried


def test_bad_argument_types_raise_invalid_argument_without_a_call(fake, client):
    with pytest.raises(InvalidArgument, match="cannot encode"):
        client.generate([1], max_tokens="lots")
    with pytest.raises(InvalidArgument):
        client.generate([1], seed=-1)  # uint64
    with pytest.raises(InvalidArgument):
        client.score(["a"])
    assert fake.calls == 0


@pytest.mark.parametrize("method", ["generate", "score", "status"])
def test_unavailable_is_retried_until_success(fake, client, method):
    fake.fail_first = 2
    result = {"generate": lambda: client.generate([1]).token_ids, "score": lambda: client.score([1, 2]),
              "status": lambda: client.status().model}[method]()
    assert result in (TOKENS, [-1.0], "fake-moe") and fake.calls == 3


def test_unavailable_gives_up_after_max_attempts(fake, client):
    fake.fail_first = 3
    with pytest.raises(Unavailable, match="warming up"):
        client.generate([1])
    assert fake.calls == 3


def test_no_retry_once_a_chunk_was_streamed(fake, client):
    fake.fail_after_chunks = 1
    chunks = []
    with pytest.raises(Unavailable, match="mid-stream"):
        for chunk in client.stream([1]):
            chunks.append(chunk)
    assert [c.token_ids for c in chunks] == [[5]] and fake.calls == 1
    with pytest.raises(Unavailable):
        client.generate([1])
    assert fake.calls == 2


# What Serve's proxy sends for a call in flight when the router replica's process dies (Ray 2.60,
# seen in tests/integration/test_router_fault_ray.py): INTERNAL with the ActorDiedError's text.
REPLICA_DIED = ("The actor died unexpectedly before finishing this task.\n\tclass_name: ServeReplica:moe:router\n"
                "\tactor_id: 1e14ff76e04536f7a92b419b01000000\n\tpid: 16353\n"
                "The actor is dead because its worker process has died. Worker exit type: SYSTEM_ERROR")


@pytest.mark.parametrize("method", ["generate", "score", "status"])
def test_a_lost_serve_replica_is_retried_until_success(fake, client, method):
    fake.fail_first, fake.fail_code, fake.fail_details = 2, grpc.StatusCode.INTERNAL, REPLICA_DIED
    result = {"generate": lambda: client.generate([1]).token_ids, "score": lambda: client.score([1, 2]),
              "status": lambda: client.status().model}[method]()
    assert result in (TOKENS, [-1.0], "fake-moe") and fake.calls == 3


def test_a_lost_serve_replica_mid_stream_raises_replica_lost_without_retry(fake, client):
    fake.fail_after_chunks, fake.mid_stream_status = 1, (grpc.StatusCode.INTERNAL, REPLICA_DIED)
    chunks = []
    with pytest.raises(ReplicaLost) as info:
        for chunk in client.stream([1]):
            chunks.append(chunk)
    assert [c.token_ids for c in chunks] == [[5]] and fake.calls == 1
    assert isinstance(info.value, Unavailable) and info.value.code == grpc.StatusCode.INTERNAL
    assert info.value.details == REPLICA_DIED


@pytest.mark.parametrize("details", [
    "The actor died because of an error raised in its creation task, ray::ServeReplica...",  # cannot start
    "ray::ServeReplica:moe:router.handle_request() ... ZeroDivisionError",  # the router's own bug
    "details of INTERNAL",
])
def test_other_internal_errors_are_not_retried(fake, client, details):
    fake.fail_first, fake.fail_code, fake.fail_details = 99, grpc.StatusCode.INTERNAL, details
    with pytest.raises(MoEError) as info:
        client.score([1, 2])
    assert type(info.value) is MoEError and fake.calls == 1


def test_async_client_retries_a_lost_serve_replica(fake):
    fake.fail_first, fake.fail_code, fake.fail_details = 2, grpc.StatusCode.INTERNAL, REPLICA_DIED

    async def main():
        async with AsyncMoEClient(fake.address, **FAST) as c:
            return (await c.generate([1])).token_ids

    assert asyncio.run(main()) == TOKENS and fake.calls == 3


def test_unreachable_server_is_unavailable():
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with MoEClient(f"127.0.0.1:{port}", timeout_s=5, **FAST) as c, pytest.raises(Unavailable) as info:
        c.status()
    assert info.value.code == grpc.StatusCode.UNAVAILABLE


def test_timeout_raises_deadline_exceeded(fake):
    fake.hang = True
    start = time.monotonic()
    with MoEClient(fake.address, timeout_s=0.3) as c:
        with pytest.raises(DeadlineExceeded) as info:
            c.generate([1])
        with pytest.raises(DeadlineExceeded):
            c.score([1, 2])
    assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - start < 3


def test_client_config_is_validated():
    with pytest.raises(ValueError, match="max_attempts"):
        MoEClient("127.0.0.1:1", max_attempts=0)
    with pytest.raises(ValueError, match="timeout_s"):
        MoEClient("127.0.0.1:1", timeout_s=0)


# --- asyncio --------------------------------------------------------------------------------------

def test_async_generate_stream_score_status(fake):
    async def main():
        async with AsyncMoEClient(fake.address, token="t0k", **FAST) as c:
            completion = await c.generate("hi", max_tokens=3, seed=1, logprobs=True)
            chunks = [chunk async for chunk in c.stream([1, 2])]
            return completion, chunks, await c.score([1, 2, 3]), await c.status()

    completion, chunks, scores, status = asyncio.run(main())
    assert completion == Completion(TOKENS, "<5><6><7>", LOGPROBS, "length")
    assert [c.token_ids for c in chunks] == [[5], [6], [7]] and chunks[-1].finish_reason == "length"
    assert scores == [-1.0, -2.0] and status.model == "fake-moe"
    first, second = fake.requests[:2]
    assert first.prompt == "hi" and first.seed == 1 and list(second.token_ids) == [1, 2]
    assert all(m["authorization"] == "Bearer t0k" for m in fake.metadata)


def test_async_errors_retries_and_timeout(fake):
    async def main():
        async with AsyncMoEClient(fake.address, **FAST) as c:
            fake.fail_first = 2  # retried before the first chunk
            assert (await c.generate([1])).token_ids == TOKENS and fake.calls == 3
            fake.fail_first, fake.fail_code = 4, grpc.StatusCode.INVALID_ARGUMENT
            with pytest.raises(InvalidArgument) as info:
                await c.score([1])
            assert info.value.details == "warming up" and fake.calls == 4
            fake.fail_after_chunks, seen = 1, []  # not retried after a chunk
            with pytest.raises(Unavailable):
                async for chunk in c.stream([1]):
                    seen.append(chunk)
            assert len(seen) == 1 and fake.calls == 5
            fake.fail_first, fake.fail_code = 99, grpc.StatusCode.UNAVAILABLE
            with pytest.raises(Unavailable):
                await c.status()
            assert fake.calls == 8
        fake.fail_first, fake.hang = 0, True
        async with AsyncMoEClient(fake.address, timeout_s=0.3) as c:
            with pytest.raises(DeadlineExceeded):
                await c.generate([1])

    asyncio.run(main())


def test_async_closing_a_stream_early_cancels_the_call(fake):
    fake.endless = True

    async def main():
        async with AsyncMoEClient(fake.address) as c:
            async with contextlib.aclosing(c.stream([1])) as stream:
                async for _ in stream:
                    break

    asyncio.run(main())
    assert fake.stopped.wait(5)


def test_client_imports_without_torch_or_ray():
    code = ("import router_service.client, sys; "
            "assert 'torch' not in sys.modules and 'ray' not in sys.modules, "
            "sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'ray'))")
    repo = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], cwd=repo, check=True, timeout=60)


# --- TLS: a self-signed CA, a server certificate for 127.0.0.1 / localhost / moe.test, a client one --

@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    return make_pki(tmp_path_factory.mktemp("pki"))


@contextlib.contextmanager
def tls_server(pki: Path, require_client_cert: bool = False):
    servicer = FakeMoE()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    serving_pb2_grpc.add_MoEServiceServicer_to_server(servicer, server)
    credentials = grpc.ssl_server_credentials([((pki / "server.key").read_bytes(), (pki / "server.pem").read_bytes())],
                                              root_certificates=(pki / "ca.pem").read_bytes(),
                                              require_client_auth=require_client_cert)
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    servicer.address = f"127.0.0.1:{port}"
    try:
        yield servicer
    finally:
        server.stop(grace=None).wait()


def test_tls_with_a_ca_bundle_carries_calls_and_the_token(pki):
    with tls_server(pki) as fake:
        with MoEClient(fake.address, token="over-tls-token", tls=pki / "ca.pem", **FAST) as c:
            assert c.generate([1]).token_ids == TOKENS and c.status().model == "fake-moe"
        with MoEClient(fake.address, tls=str(pki / "ca.pem"), tls_server_name="moe.test", **FAST) as c:
            assert c.score([1, 2]) == [-1.0]  # the certificate checked for another name than the one dialled
        assert fake.metadata[0]["authorization"] == "Bearer over-tls-token"


def test_tls_refuses_an_untrusted_server_and_plaintext(pki):
    with tls_server(pki) as fake:
        with MoEClient(fake.address, tls=True, timeout_s=10, **FAST) as c, pytest.raises(Unavailable):
            c.status()  # the system roots do not know the test CA
        with MoEClient(fake.address, tls=pki / "ca.pem", tls_server_name="other.test", timeout_s=10, **FAST) as c, \
                pytest.raises(Unavailable):
            c.status()  # a name the certificate does not carry
        with MoEClient(fake.address, timeout_s=10, **FAST) as c, pytest.raises(Unavailable):
            c.status()  # plaintext to a TLS port
        assert fake.calls == 0


def test_mutual_tls_needs_the_client_certificate(pki):
    with tls_server(pki, require_client_cert=True) as fake:
        mtls = (pki / "ca.pem", pki / "client.pem", pki / "client.key")
        with MoEClient(fake.address, tls=mtls, **FAST) as c:
            assert c.generate([1]).finish_reason == "length"
        with MoEClient(fake.address, tls=pki / "ca.pem", timeout_s=10, **FAST) as c, pytest.raises(Unavailable):
            c.status()
        assert fake.calls == 1


def test_async_client_over_mutual_tls(pki):
    async def main(address):
        mtls = (str(pki / "ca.pem"), str(pki / "client.pem"), str(pki / "client.key"))
        async with AsyncMoEClient(address, token="async-tls-token", tls=mtls, **FAST) as c:
            return (await c.generate([1])).token_ids, await c.score([1, 2, 3])

    with tls_server(pki, require_client_cert=True) as fake:
        assert asyncio.run(main(fake.address)) == (TOKENS, [-1.0, -2.0])
        assert fake.metadata[0]["authorization"] == "Bearer async-tls-token"


def test_tls_and_token_settings_are_validated(tmp_path):
    with pytest.raises(ValueError, match="cannot read the CA bundle"):
        MoEClient("127.0.0.1:1", tls=tmp_path / "missing.pem")
    (tmp_path / "client.pem").write_text("a certificate")
    with pytest.raises(ValueError, match="cannot read the client key"):
        MoEClient("127.0.0.1:1", tls=(None, tmp_path / "client.pem", tmp_path / "missing.key"))
    with pytest.raises(ValueError, match="tls must be"):
        MoEClient("127.0.0.1:1", tls=("only-a-ca",))
    with pytest.raises(ValueError, match="tls_server_name needs tls"):
        MoEClient("127.0.0.1:1", tls_server_name="moe.test")
    with pytest.raises(ValueError, match="token must be") as info:
        MoEClient("127.0.0.1:1", token="has a space")
    assert "has a space" not in str(info.value)
    with MoEClient("127.0.0.1:1", token="do-not-print-me") as c:
        assert "do-not-print-me" not in repr(c) and "***" in repr(c)
