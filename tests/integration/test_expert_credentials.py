"""The internal expert API's credentials: the cluster secret and mutual TLS, over real gRPC on
loopback without Ray (the controller's groups are checked in test_controller_ray.py)."""
from __future__ import annotations

import asyncio
import contextlib

import grpc
import pytest
import torch
from elasticmoe.v1 import expert_pb2, expert_pb2_grpc

from cluster.control.controller import ControllerConfig
from experts.config import ExpertGroupConfig
from experts.credentials import SECRET_METADATA, CredentialsError, ExpertCredentials, ExpertTLS, call_metadata, channel
from experts.group import serve_group
from experts.servicer import ExpertServicer
from experts.wire import GRPC_OPTIONS, encode
from helpers.pki import make_pki

SECRET = "cluster-secret-for-the-test-0123456789"
H = 64  # the tiny preset


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, a certificate for 127.0.0.1 / moe.test and a client one (tests/helpers/pki.py)."""
    return make_pki(tmp_path_factory.mktemp("pki"))


@contextlib.asynccontextmanager
async def serving(checkpoint, credentials):
    config = ExpertGroupConfig(checkpoint=str(checkpoint), slots=[(0, 0)], device="cpu", backend="torch", name="t",
                               credentials=credentials)
    servicer = await ExpertServicer.create(config)
    server, address = await serve_group(config, servicer)
    try:
        yield servicer, address
    finally:
        await server.stop(None)


def one_token() -> expert_pb2.ForwardRequest:
    return expert_pb2.ForwardRequest(layer=0, hidden=encode(torch.randn(1, H)),
                                     expert_ids=encode(torch.tensor([[0]], dtype=torch.int32)),
                                     weights=encode(torch.ones(1, 1)), placement_version=1)


async def forward(address, dial_with, send) -> expert_pb2.ForwardResponse:
    """Forward over a channel made from `dial_with`, carrying the secret of `send` (None: no secret)."""
    async with channel(address, dial_with) as ch:
        return await expert_pb2_grpc.ExpertServiceStub(ch).Forward(one_token(), timeout=10,
                                                                   metadata=call_metadata(send))


async def refused(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


def test_no_or_wrong_secret_is_unauthenticated_and_computes_nothing(tiny_checkpoint):
    right = ExpertCredentials(SECRET)
    wrong = ExpertCredentials(SECRET[:-1] + "X")  # one character off

    async def body():
        async with serving(tiny_checkpoint, right) as (servicer, address):
            for send in (None, wrong):
                err = await refused(forward(address, None, send))
                assert err.code() == grpc.StatusCode.UNAUTHENTICATED
                assert SECRET not in err.details() and SECRET[:-1] not in err.details()
            async with channel(address, None) as ch:  # every method, not only Forward
                stub = expert_pb2_grpc.ExpertServiceStub(ch)
                twice = ((SECRET_METADATA, right.data_secret), (SECRET_METADATA, right.data_secret))
                for call in (stub.Stats(expert_pb2.StatsRequest(), timeout=10),
                             stub.LoadExperts(expert_pb2.LoadExpertsRequest(slots=[expert_pb2.Slot(layer=0, expert=1)]),
                                              timeout=10),
                             stub.Stats(expert_pb2.StatsRequest(), timeout=10, metadata=twice)):
                    assert (await refused(call)).code() == grpc.StatusCode.UNAUTHENTICATED
            # 2 MiB without the secret: refused before the request is read; past the largest legitimate
            # Forward of this model (wire.server_options: ~3 MiB for the tiny one), refused by gRPC itself
            big = expert_pb2.ForwardRequest(layer=0, hidden=expert_pb2.Tensor(dtype="float32", shape=[2**13, H],
                                                                              data=bytes(2**21)))
            huge = expert_pb2.ForwardRequest(layer=0, hidden=expert_pb2.Tensor(dtype="float32", shape=[2**16, H],
                                                                               data=bytes(2**24)))
            async with channel(address, None, GRPC_OPTIONS) as ch:
                err = await refused(expert_pb2_grpc.ExpertServiceStub(ch).Forward(big, timeout=30))
                assert err.code() == grpc.StatusCode.UNAUTHENTICATED
                err = await refused(expert_pb2_grpc.ExpertServiceStub(ch).Forward(huge, timeout=30,
                                                                                  metadata=call_metadata(right)))
                assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert servicer._forward_calls == 0 and servicer.slots == [(0, 0)]  # nothing computed, nothing loaded
            reply = await forward(address, None, right)
            assert list(reply.output.shape) == [1, H]
            async with channel(address, None) as ch:
                stats = await expert_pb2_grpc.ExpertServiceStub(ch).Stats(expert_pb2.StatsRequest(), timeout=10,
                                                                           metadata=call_metadata(right))
            assert stats.forward_calls == 1 and stats.refused_calls == 6  # the huge one never reached the check

    asyncio.run(body())


def test_control_calls_need_the_controllers_secret_and_slot_lists_are_capped(tiny_checkpoint):
    """A router's share (data plane) may call Forward and Stats, never LoadExperts/UnloadExperts; the
    controller's control secret opens only those; slot lists longer than the model's are refused."""
    cluster = ExpertCredentials(SECRET)
    router = cluster.for_router()
    slot = [expert_pb2.Slot(layer=0, expert=1)]
    limit = 2 * 8  # the tiny preset: 2 MoE layers x 8 experts

    async def body():
        async with serving(tiny_checkpoint, cluster) as (servicer, address):
            async with channel(address, None) as ch:
                stub = expert_pb2_grpc.ExpertServiceStub(ch)
                for call in (stub.LoadExperts(expert_pb2.LoadExpertsRequest(slots=slot), timeout=10,
                                              metadata=call_metadata(router)),
                             stub.UnloadExperts(expert_pb2.UnloadExpertsRequest(slots=slot), timeout=10,
                                                metadata=call_metadata(router)),
                             stub.Forward(one_token(), timeout=10, metadata=call_metadata(cluster, "LoadExperts"))):
                    err = await refused(call)
                    assert err.code() == grpc.StatusCode.PERMISSION_DENIED, err
                    assert router.data_secret not in err.details() and cluster.control_secret not in err.details()
                assert servicer.slots == [(0, 0)] and servicer._forward_calls == 0
                with pytest.raises(CredentialsError, match="control-plane"):
                    call_metadata(router, "LoadExperts")
                control = call_metadata(cluster, "LoadExperts")
                loaded = await stub.LoadExperts(expert_pb2.LoadExpertsRequest(slots=slot), timeout=30, metadata=control)
                assert [(s.layer, s.expert) for s in loaded.slots] == [(0, 0), (0, 1)]
                too_many = [expert_pb2.Slot(layer=0, expert=0)] * (limit + 1)
                for call in (stub.LoadExperts(expert_pb2.LoadExpertsRequest(slots=too_many), timeout=10,
                                              metadata=control),
                             stub.UnloadExperts(expert_pb2.UnloadExpertsRequest(slots=too_many), timeout=10,
                                                metadata=control)):
                    err = await refused(call)
                    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and f"at most {limit}" in err.details()
                assert servicer.slots == [(0, 0), (0, 1)]
                assert list((await forward(address, None, router)).output.shape) == [1, H]

    asyncio.run(body())
    group = cluster.for_group()  # what a group is given: digests, no secret that could call anything
    assert not {SECRET, cluster.data_secret, cluster.control_secret} & {str(v) for v in vars(group).values()}
    assert cluster.placement_signing_key not in (cluster.data_secret.encode(), SECRET.encode())


def test_mutual_tls_needs_the_cluster_certificate_and_the_secret(tiny_checkpoint, pki):
    tls = ExpertTLS(ca_file=str(pki / "ca.pem"), cert_file=str(pki / "server.pem"), key_file=str(pki / "server.key"),
                    server_name="moe.test")
    right = ExpertCredentials(SECRET, tls)
    # the client certificate: same CA, another identity
    other_cert = ExpertTLS(ca_file=str(pki / "ca.pem"), cert_file=str(pki / "client.pem"),
                           key_file=str(pki / "client.key"), server_name="moe.test")

    async def body():
        async with serving(tiny_checkpoint, right) as (servicer, address):
            assert list((await forward(address, right, right)).output.shape) == [1, H]
            assert list((await forward(address, ExpertCredentials(SECRET, other_cert), right)).output.shape) == [1, H]
            # plaintext to the TLS port: the handshake fails, the call never reaches the servicer
            assert (await refused(forward(address, None, right))).code() == grpc.StatusCode.UNAVAILABLE
            # TLS without a client certificate: refused by the server (mutual TLS)
            no_cert = grpc.ssl_channel_credentials(root_certificates=(pki / "ca.pem").read_bytes())
            async with grpc.aio.secure_channel(address, no_cert,
                                               options=[("grpc.ssl_target_name_override", "moe.test")]) as ch:
                err = await refused(expert_pb2_grpc.ExpertServiceStub(ch).Forward(
                    one_token(), timeout=10, metadata=call_metadata(right)))
                assert err.code() == grpc.StatusCode.UNAVAILABLE
            # the right certificate but no secret: still refused
            err = await refused(forward(address, right, None))
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED
            assert servicer._forward_calls == 2

    asyncio.run(body())


def test_settings_are_validated_without_echoing_the_secret(tmp_path, monkeypatch):
    for bad in ("short", "has a space in it, sixteen+", "tab\there-and-more-chars", "é" * 20):
        with pytest.raises(CredentialsError) as err:
            ExpertCredentials(bad)
        assert bad not in str(err.value)
    creds = ExpertCredentials(SECRET)
    assert SECRET not in repr(creds) and "hidden" in repr(creds)
    assert ExpertCredentials.generate().secret != ExpertCredentials.generate().secret  # per cluster, random
    assert len(ExpertCredentials.generate().secret) >= 32

    with pytest.raises(ValueError, match="unknown ExpertTLS key 'ca'"):
        ExpertTLS.from_dict({"ca": "x", "cert_file": "y", "key_file": "z"})
    missing = ExpertTLS(ca_file=str(tmp_path / "nope.pem"), cert_file="c", key_file="k")
    with pytest.raises(CredentialsError, match=r"expert_tls.ca_file .*nope.pem cannot be read"):
        ExpertCredentials(SECRET, missing).tls.channel_credentials()

    base = dict(checkpoint="/ckpt", num_groups=1, redis_url="redis://127.0.0.1:6379/0")
    with pytest.raises(ValueError) as err:
        ControllerConfig(**base, expert_secret="tiny-secret")
    assert "tiny-secret" not in str(err.value)
    assert "tiny-secret" not in repr(ControllerConfig(**base, expert_secret=SECRET + "-" + "tiny-secret"))
    assert ControllerConfig(**base, expert_secret=SECRET).expert_credentials().secret == SECRET
    generated = ControllerConfig(**base).expert_credentials()
    assert generated.secret != ControllerConfig(**base).expert_credentials().secret
    env = ControllerConfig(**base, expert_secret_env="MOE_TEST_SECRET")
    monkeypatch.delenv("MOE_TEST_SECRET", raising=False)
    with pytest.raises(ValueError, match=r"\$MOE_TEST_SECRET is unset"):
        env.expert_credentials()
    monkeypatch.setenv("MOE_TEST_SECRET", SECRET)
    assert env.expert_credentials().secret == SECRET
    with pytest.raises(ValueError, match="expert_tls"):
        ControllerConfig(**base, expert_tls={"ca_file": "a"})


def test_config_reprs_hold_no_secret():
    from router_service.serving.router_config import RouterConfig

    url = f"rediss://:{SECRET}@127.0.0.1:6380/0"
    controller = ControllerConfig(checkpoint="/ckpt", num_groups=1, redis_url=url, expert_secret=SECRET)
    router = RouterConfig(checkpoint="/ckpt", placement='{"version": 0, "groups": [], "replicas": []}', redis_url=url)
    group = ExpertGroupConfig(checkpoint="/ckpt", credentials=ExpertCredentials(SECRET))
    for config in (controller, router, group):
        assert SECRET not in repr(config), type(config).__name__
