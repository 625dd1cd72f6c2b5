"""The controller on a real local Ray with a real redis-server and real gRPC groups.

Start 2 groups -> Redis holds placement v1 whose addresses serve every expert; kill a
group's process -> check_groups() restarts it and publishes v2 with its new address;
shutdown() -> no group actor left.
"""
from __future__ import annotations

import time
import uuid

import grpc
import pytest
import ray
import torch
from elasticmoe.v1 import expert_pb2, expert_pb2_grpc

from cluster.checkpoint.reader import Checkpoint
from cluster.control.controller import ControllerActor, ControllerConfig, ControllerError
from cluster.state.redis_server import EmbeddedRedis
from cluster.state.store import ClusterState
from experts.credentials import CredentialsError, ExpertCredentials, call_metadata
from experts.wire import encode
from helpers.groups import group_stats

RESTART_TIMEOUT_S = 40


@pytest.fixture(scope="module")
def redis_server():
    with EmbeddedRedis() as server:
        yield server




def forward_one_token(address: str, credentials, spec) -> expert_pb2.ForwardResponse:
    request = expert_pb2.ForwardRequest(layer=spec.sparse_layers[0], hidden=encode(torch.zeros(1, spec.hidden_size)),
                                        expert_ids=encode(torch.tensor([[0]], dtype=torch.int32)),
                                        weights=encode(torch.ones(1, 1)))
    with grpc.insecure_channel(address) as channel:
        return expert_pb2_grpc.ExpertServiceStub(channel).Forward(request, timeout=10,
                                                                  metadata=call_metadata(credentials))


def held_slots(address: str, credentials) -> list[tuple[int, int]]:
    """The (layer, expert) slots the group at address serves, asked over gRPC."""
    return sorted((s.slot.layer, s.slot.expert) for s in group_stats(address, credentials).slots)


def test_controller_starts_repairs_and_shuts_down_groups(local_ray, redis_server, tiny_checkpoint):
    name = f"test-controller-{uuid.uuid4().hex[:8]}"  # unique: named actors outlive a failed test run's module
    # repairs on call only: this test calls check_groups() itself and checks what it returns
    config = ControllerConfig(checkpoint=str(tiny_checkpoint), num_groups=2, redis_url=redis_server.url,
                              group_device="cpu", name=name, repair_interval_s=None,
                              autoscaler={"metrics_port": 0})
    controller = ControllerActor.options(name=name).remote(config)
    state = ClusterState(redis_server.url)
    state.client.set(state.version_key, str(2**62))  # forged: must neither block nor move the first publish
    try:
        summary = ray.get(controller.start.remote(), timeout=120)
        assert ray.get(controller.start.remote(), timeout=30) == summary  # idempotent

        # Redis holds v1, whose addresses serve every expert of every MoE layer
        spec = Checkpoint(tiny_checkpoint).spec
        table = state.load_placement()
        assert table.version == summary["version"] == 1
        assert list(table.groups) == [g["address"] for g in summary["groups"]]
        assert ray.get(controller.placement.remote()) == table.to_json()
        table.validate(spec)  # every (layer, expert) has a replica on an existing group
        credentials = ray.get(controller.router_credentials.remote(), timeout=30)
        served = {}
        for g, address in enumerate(table.groups):
            assert held_slots(address, credentials) == table.slots_of(g)
            served.update({slot: g for slot in held_slots(address, credentials)})
        assert set(served) == {(l, e) for l in spec.sparse_layers for e in range(spec.num_experts)}

        # a caller without the cluster secret, or with a wrong one, is refused and nothing is computed
        impostor = ExpertCredentials("a-guess-at-the-cluster-secret")
        for creds in (None, impostor):
            with pytest.raises(grpc.RpcError) as err:
                forward_one_token(table.groups[0], creds, spec)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, err.value
            assert credentials.data_secret not in err.value.details()
        with pytest.raises(grpc.RpcError, match="UNAUTHENTICATED"):
            group_stats(table.groups[0], None)
        seen = group_stats(table.groups[0], credentials)
        assert seen.forward_calls == 0 and seen.refused_calls == 3
        assert credentials.data_secret not in repr(credentials)
        # what routers get may call Forward and Stats, never load or unload: that is the controller's alone
        with pytest.raises(CredentialsError, match="control-plane"):
            call_metadata(credentials, "LoadExperts")
        with grpc.insecure_channel(table.groups[0]) as ch:
            stub = expert_pb2_grpc.ExpertServiceStub(ch)
            for call, request in ((stub.LoadExperts, expert_pb2.LoadExpertsRequest),
                                  (stub.UnloadExperts, expert_pb2.UnloadExpertsRequest)):
                with pytest.raises(grpc.RpcError) as err:
                    call(request(slots=[expert_pb2.Slot(layer=spec.sparse_layers[0], expert=0)]), timeout=30,
                         metadata=call_metadata(credentials))  # the data-plane secret
                assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, err.value
        assert held_slots(table.groups[0], credentials) == table.slots_of(0)  # nothing unloaded
        # the placement is signed: a router's key verifies it
        signed = ClusterState(redis_server.url, signing_key=credentials.placement_signing_key)
        assert signed.load_placement() == table
        signed.close()
        groups = ray.get(controller.groups.remote(), timeout=30)
        assert [g["health"] for g in groups] == ["SERVING", "SERVING"]
        assert {n: g["address"] for n, g in state.groups().items()} == {g["name"]: g["address"] for g in groups}

        # kill group 0's process: Ray restarts it, serving nothing until check_groups() starts it
        sub = state.subscribe_placement()
        ray.kill(ray.get_actor(f"{name}-group-0"), no_restart=False)
        deadline = time.monotonic() + RESTART_TIMEOUT_S
        while True:
            # the dying process may still answer with its old address for a moment: keep checking
            result = ray.get(controller.check_groups.remote(), timeout=RESTART_TIMEOUT_S)
            if result["version"] > 1 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert result["version"] == 2 and result["refreshed"] == [f"{name}-group-0"], result
        new = state.load_placement()
        assert new.version == 2 and new.replicas == table.replicas
        assert new.groups[1] == table.groups[1]
        # a fresh process listens on a new port (port 0 picks one): the moved address is published
        assert new.groups[0] != table.groups[0]
        assert held_slots(new.groups[0], credentials) == table.slots_of(0)
        assert state.groups()[f"{name}-group-0"]["address"] == new.groups[0]
        msg = sub.get_message(timeout=5)
        assert msg is not None and msg["data"] == "2"
        sub.close()
        assert [g["health"] for g in ray.get(controller.groups.remote(), timeout=30)] == ["SERVING", "SERVING"]

        ray.get(controller.shutdown.remote(), timeout=60)
        assert not [a for a in ray.util.list_named_actors() if a.startswith(f"{name}-group-")]
        assert state.groups() == {}
        for address in new.groups:  # nothing serves on the old addresses
            with pytest.raises(grpc.RpcError):
                group_stats(address, credentials, timeout_s=2)
    finally:
        ray.kill(controller)
        state.close()


def test_failed_start_leaves_no_group_behind(local_ray, redis_server, tiny_checkpoint):
    # num_gpus_per_group=0 hides every GPU from the actor, so device="cuda" fails inside start() on any machine
    name = f"test-controller-{uuid.uuid4().hex[:8]}"
    config = ControllerConfig(checkpoint=str(tiny_checkpoint), num_groups=2, redis_url=redis_server.url,
                              redis_namespace="failing", group_device="cuda", num_gpus_per_group=0, name=name)
    controller = ControllerActor.options(name=name).remote(config)
    try:
        with pytest.raises(ray.exceptions.RayTaskError, match="failed to start") as e:
            ray.get(controller.start.remote(), timeout=120)
        assert isinstance(e.value.as_instanceof_cause(), ControllerError)
        assert "device='cuda'" in str(e.value)  # the group's own message reaches the caller
        assert not [a for a in ray.util.list_named_actors() if a.startswith(f"{name}-group-")]
        state = ClusterState(redis_server.url, "failing")
        assert state.load_placement() is None  # nothing was published
        state.close()
    finally:
        ray.kill(controller)


def test_config_is_validated_and_rejects_unknown_keys():
    base = dict(checkpoint="/ckpt", num_groups=2, redis_url="redis://127.0.0.1:6379/0")
    assert ControllerConfig.from_dict(base).num_gpus_per_group is None
    with pytest.raises(ValueError, match="unknown ControllerConfig key 'num_group'"):
        ControllerConfig.from_dict({**base, "num_group": 2})
    for bad, field in [({"num_groups": 0}, "num_groups"), ({"num_groups": True}, "num_groups"),
                       ({"redis_url": "http://x"}, "redis_url"), ({"group_device": "tpu"}, "group_device"),
                       ({"dtype": "fp8"}, "dtype"), ({"num_gpus_per_group": -1}, "num_gpus_per_group"),
                       ({"max_group_restarts": -2}, "max_group_restarts"), ({"name": ""}, "name"),
                       ({"group_coalesce_window_s": 0.5}, r"group_coalesce_window_s must be .* \[0, 0.1\]"),
                       ({"group_coalesce_window_s": True}, "group_coalesce_window_s")]:
        with pytest.raises(ValueError, match=field):
            ControllerConfig.from_dict({**base, **bad})
    with pytest.raises(ValueError) as e:  # a bad URL is shown without its password
        ControllerConfig.from_dict({**base, "redis_url": "http://:s3cret@host"})
    assert "s3cret" not in str(e.value)
