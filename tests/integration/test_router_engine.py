"""A Router (no Serve) over real gRPC groups: the cluster's one dtype is checked at start, KV usage
reaches Status and Prometheus, a request that can never fit is INVALID_ARGUMENT naming the numbers,
and extreme sampling values in one request never fail its neighbours."""
from __future__ import annotations

import asyncio
import urllib.request

import grpc
import pytest
import torch
from elasticmoe.v1 import serving_pb2

from cluster.checkpoint.reader import Checkpoint
from cluster.placement.table import PlacementTable
from helpers.groups import Groups
from router_service.model.reference import ReferenceModel
from router_service.serving.api import ApiError
from router_service.serving.router import DtypeMismatch, Router, cluster_dtype
from router_service.serving.router_config import RouterConfig, resolve_device


@pytest.fixture(scope="module")
def served(tiny_checkpoint):
    spec = Checkpoint(tiny_checkpoint).spec
    table = PlacementTable.round_robin(spec, ["pending:0", "pending:1"])
    groups = Groups(tiny_checkpoint, [table.slots_of(0), table.slots_of(1)])
    yield PlacementTable(1, tuple(groups.addresses), table.replicas).to_json()
    groups.close()


def router(checkpoint, placement, **settings) -> Router:
    return Router(RouterConfig(checkpoint=str(checkpoint), placement=placement, metrics_port=0,
                               metrics_host="127.0.0.1", **settings))


def test_a_router_in_another_dtype_than_the_groups_refuses_to_start_naming_both(tiny_checkpoint, served):
    with pytest.raises(DtypeMismatch, match=r"router dtype bfloat16 \(configured\) but expert group 127\.0\.0\.1:\d+ "
                                            r"serves float32 \(and 1 more\): a cluster has one model dtype"):
        router(tiny_checkpoint, served, dtype="bfloat16")


def test_without_a_dtype_the_router_takes_the_groups_one():
    reply = lambda d: type("Stats", (), {"dtype": d})()  # noqa: E731
    cpu = torch.device("cpu")
    assert cluster_dtype(None, cpu, {"a": reply("bfloat16"), "b": None}) == "bfloat16"
    assert cluster_dtype(None, cpu, {}) == "float32"
    assert cluster_dtype(None, torch.device("cuda"), {"a": None}) == "bfloat16"
    with pytest.raises(DtypeMismatch, match="what the first group serves"):
        cluster_dtype(None, cpu, {"a": reply("float32"), "b": reply("float16")})


def test_device_values_are_checked():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    for bad in ("gpu", "tpu", "cuda:x", ""):
        with pytest.raises(ValueError, match="device must be auto, cpu, cuda or cuda:N"):
            resolve_device(bad)


def test_kv_usage_in_status_and_prometheus_and_too_large_is_invalid_argument(tiny_checkpoint, served):
    r = router(tiny_checkpoint, served, kv_cache_bytes=32 * 16 * 512, kv_block_size=16)  # 32 blocks: 512 tokens
    try:
        assert r.engine.dense.dtype == torch.float32  # the groups' dtype
        status = r.status()
        assert (status.kv.blocks_total, status.kv.block_size, status.kv.blocks_used) == (32, 16, 0)
        metrics = urllib.request.urlopen(f"http://{r.metrics_address}/metrics", timeout=10).read().decode()
        assert 'elasticmoe_kv_blocks{state="total"} 32.0' in metrics
        assert "elasticmoe_kv_preemptions_total 0.0" in metrics and 'elasticmoe_sequences{state="running"}' in metrics

        async def generate(request):
            return [ev async for ev in r.api.generate(request)]

        request = serving_pb2.GenerateRequest(token_ids=list(range(2, 302)), max_tokens=300)
        with pytest.raises(ApiError) as info:
            asyncio.run(generate(request))
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "prompt (300) + max_tokens (300) needs 600 tokens of KV cache; this router's pool holds 512" \
            in info.value.message
    finally:
        r.close()


def test_extreme_sampling_values_never_fail_a_neighbour(tiny_checkpoint, served):
    """A subnormal temperature, a huge one, top_p at the smallest float above 0: each samples, and a
    greedy stream that shares their steps gets exactly the reference's tokens."""
    r = router(tiny_checkpoint, served)
    reference = ReferenceModel.from_pretrained(tiny_checkpoint)
    try:
        prompt = [5, 17, 42, 7]
        extremes = [dict(temperature=1e-45), dict(temperature=3e38), dict(temperature=1.0, top_p=1e-45),
                    dict(temperature=1e-38, top_k=1000000), dict(temperature=0.5, seed=2**64 - 1)]

        async def run_all():
            async def one(**sampling):
                request = serving_pb2.GenerateRequest(token_ids=prompt, max_tokens=12, **sampling)
                return [t for ev in [e async for e in r.api.generate(request)] for t in ev.token_ids]

            return await asyncio.gather(one(), *(one(**e) for e in extremes))

        greedy, *others = asyncio.run(run_all())
        assert greedy == reference.generate_greedy(prompt, 12)[:len(greedy)] and len(greedy) >= 1
        vocab = reference.spec.vocab_size
        assert all(o and all(0 <= t < vocab for t in o) for o in others)
        assert others[0] == greedy  # a subnormal temperature is greedy in effect
    finally:
        r.close()


def test_expert_stage_errors_name_experts_never_group_addresses(tiny_checkpoint, served, caplog):
    """Experts whose only replica sits on a dead address: the client hears which experts, the log where."""
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    live = PlacementTable.from_json(served)
    table = PlacementTable(1, (live.groups[0], dead), live.replicas)
    r = router(tiny_checkpoint, table.to_json(), forward_timeout_s=5.0)
    try:
        async def generate():
            return [ev async for ev in r.api.generate(serving_pb2.GenerateRequest(token_ids=[5, 17], max_tokens=2))]

        with caplog.at_level("WARNING", logger="router_service.serving.api"), pytest.raises(ApiError) as info:
            asyncio.run(generate())
        assert info.value.code == grpc.StatusCode.UNAVAILABLE, info.value.message
        assert "no live replica of (layer, expert)" in info.value.message
        assert "127.0.0.1" not in info.value.message and live.groups[0] not in info.value.message
        assert dead in caplog.text  # operators still see where
    finally:
        r.close()


def test_status_and_check_answer_at_once_with_redis_stopped_and_a_group_blackholed(tiny_checkpoint, served):
    """Status and Check read snapshots refreshed in the background (router_service/serving/health.py):
    with the router's Redis stopped (SIGSTOP: its socket hangs until the 5 s timeout) and one group
    accepting connections but never answering, both answer well within a probe's 1 s, and Status
    says what is unreachable and how old its view is."""
    import os
    import signal
    import socket
    import time

    from cluster.state.redis_server import EmbeddedRedis
    from cluster.state.store import ClusterState

    table = PlacementTable.from_json(served)
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(8)  # connections complete, nothing is ever answered
    address = f"127.0.0.1:{hole.getsockname()[1]}"
    # a third group holding second replicas of group 0's experts: serving goes on without it
    replicas = {slot: gs + (2,) if gs == (0,) else gs for slot, gs in table.replicas.items()}
    shares = {slot: (0.5, 0.5) if len(gs) == 2 else (1.0,) for slot, gs in replicas.items()}
    placement = PlacementTable(2, table.groups + (address,), replicas, shares).to_json()
    with EmbeddedRedis() as redis:
        ClusterState(redis.url).put_autoscaler_status({"enabled": True, "groups": 3})
        r = router(tiny_checkpoint, placement, redis_url=redis.url)
        try:
            deadline = time.monotonic() + 10
            while r.health.redis.autoscaler is None and time.monotonic() < deadline:  # first refresh done
                time.sleep(0.05)
            os.kill(redis.pid, signal.SIGSTOP)
            try:
                start = time.monotonic()
                checks = [r.serving() for _ in range(20)]
                status = r.status()
                elapsed = time.monotonic() - start
                assert elapsed < 1.0, f"20 Checks and a Status took {elapsed:.2f} s"
                assert all(checks) and status.serving
                assert f"group-2 {address}" in list(status.unreachable)
                assert [g.health for g in status.groups] == ["SERVING", "SERVING", "NOT_SERVING"]
                deadline = time.monotonic() + 15  # the Redis refresh times out (5 s) and says so
                while not any(u.startswith("redis:") for u in r.status().unreachable) and time.monotonic() < deadline:
                    time.sleep(0.2)
                status = r.status()
                assert any(u.startswith("redis:") for u in status.unreachable), list(status.unreachable)
                assert status.autoscaler.groups == 3  # the last status read, kept
            finally:
                os.kill(redis.pid, signal.SIGCONT)
        finally:
            r.close()
            hole.close()
