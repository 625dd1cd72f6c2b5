"""Redis is not trusted: a placement must carry this cluster's MAC before a router dials it, versions are
bounded, and every record read back is checked (real redis-server, real gRPC groups, no Ray)."""
from __future__ import annotations

import asyncio
import json
import time

import pytest
import torch

from cluster.checkpoint.reader import Checkpoint
from cluster.control.rebalance import Rebalancer
from cluster.placement.table import PlacementTable
from cluster.state.redis_server import EmbeddedRedis
from cluster.state.store import ClusterState, StaleVersionError
from cluster.state.telemetry import Telemetry
from experts.credentials import ExpertCredentials
from helpers.groups import Groups, group_stats
from router_service.serving.dispatch import RemoteExperts
from router_service.serving.placement_follower import PlacementFollower


@pytest.fixture(scope="module")
def server():
    with EmbeddedRedis() as s:
        yield s


def test_router_adopts_only_placements_signed_by_its_cluster(tiny_checkpoint, server, caplog):
    """An attacker with write access to Redis publishes v2 pointing at their own server, unsigned, then
    with a guessed MAC, then sets the version to 2**62: the router never dials them and keeps serving
    v1, each refusal logged once and counted; the controller's next publish goes through all the same."""
    spec = Checkpoint(tiny_checkpoint).spec
    everything = [(l, e) for l in spec.sparse_layers for e in range(spec.num_experts)]
    groups = Groups(tiny_checkpoint, [everything, everything])  # [0]: the cluster's, [1]: the attacker's
    ours, theirs = groups.addresses
    credentials = ExpertCredentials.generate().for_router()
    ns = "auth"
    controller = ClusterState(server.url, ns, credentials.placement_signing_key)
    attacker = ClusterState(server.url, ns)  # can write Redis, has no key
    routers_view = ClusterState(server.url, ns, credentials.placement_signing_key)
    controller.publish_placement(PlacementTable.round_robin(spec, [ours], version=1))
    remote = RemoteExperts(spec, routers_view.load_placement(), credentials=credentials)
    refusals = []
    follower = PlacementFollower(remote, routers_view, poll_s=3600, on_refused=lambda: refusals.append(1))
    x, ids, w = torch.randn(2, spec.hidden_size), torch.tensor([[0, 1], [2, 3]]), torch.full((2, 2), 0.5)
    layer = spec.sparse_layers[0]
    try:
        forged = PlacementTable.round_robin(spec, [theirs], version=2)
        with caplog.at_level("ERROR", logger="router_service.serving.placement_follower"):
            attacker.publish_placement(forged)  # unsigned
            assert not follower.poll_once() and not follower.poll_once()  # refused, and refused again
            attacker.client.set(f"{ns}:placement:mac", "00" * 32)  # a guessed MAC
            assert not follower.poll_once()
            attacker.client.set(f"{ns}:placement:version", str(2**62))
            assert not follower.poll_once()
        assert len(refusals) == 3 and follower.refused == 3  # one per distinct refusal, not per poll
        assert caplog.text.count("placement refused") == 3 and "has no MAC" in caplog.text
        assert "has a wrong MAC" in caplog.text and "not an int in [0, 2**53]" in caplog.text
        remote(layer, x, ids, w)
        assert remote.table.version == 1 and remote.table.groups == (ours,)
        assert group_stats(theirs).forward_calls == 0 and group_stats(ours).forward_calls > 0  # never dialled

        # the forged version neither blocks the controller nor moves where it starts
        assert controller.published_version() == 0  # what is there is not ours
        controller.publish_placement(PlacementTable.round_robin(spec, [ours], version=2))
        assert controller.published_version() == 2 and controller.placement_version() == 2
        assert follower.poll_once() and remote(layer, x, ids, w) is not None and remote.table.version == 2
        attacker.client.set(f"{ns}:placement:version", str(2**62))
        assert controller.published_version() == 2  # the signed table's version, not the key's
        with pytest.raises(StaleVersionError):
            controller.publish_placement(PlacementTable.round_robin(spec, [ours], version=2))
        # a table of another cluster (another secret) is refused like a forged one
        other = ClusterState(server.url, ns, ExpertCredentials.generate().placement_signing_key)
        other.publish_placement(PlacementTable.round_robin(spec, [theirs], version=3))
        assert not follower.poll_once() and remote.pending_version == 2
        for state in (other, controller, attacker, routers_view):
            state.close()
    finally:
        follower.close()
        remote.close()
        groups.close()


def test_records_read_from_redis_are_checked_and_skipped(server, caplog):
    """Heartbeats from the future or with a non-int version, malformed group registrations and autoscaler
    status: skipped with one log line each; a drain is not held up and does not raise."""
    ns = "records"
    state = ClusterState(server.url, ns)
    telemetry = Telemetry(state)
    now = time.time()
    telemetry.record_router("live", {}, version=5, now=now)
    forged = {"future": {"version": 1, "updated_at": now + 3600, "metrics": None},
              "text-version": {"version": "abc", "updated_at": now, "metrics": None},
              "float-version": {"version": 1.5, "updated_at": now, "metrics": None},
              "nan-time": {"version": 1, "updated_at": float("nan"), "metrics": None}}
    for router_id, entry in forged.items():
        state.client.hset(telemetry.routers_key, router_id, json.dumps(entry))
    state.client.hset(telemetry.routers_key, "not-json", "{")
    rebalancer = Rebalancer(state, telemetry, load_timeout_s=5, drain_timeout_s=2.0, router_poll_s=0.05)
    with caplog.at_level("WARNING", logger="cluster.state.store"):
        start = time.monotonic()
        for _ in range(2):  # a second round logs nothing new
            assert asyncio.run(rebalancer.wait_for_routers(5)) is True
        assert time.monotonic() - start < 1.0  # drained at once: no "partial" after drain_timeout_s
        assert set(telemetry.routers()) == {"live"}
        assert caplog.text.count("skipped") == len(forged) + 1
        assert "in the future" in caplog.text and "version must be an int" in caplog.text

        state.register_group("g0", "127.0.0.1:5000", [(0, 1)])
        state.client.hset(state.groups_key, "evil", json.dumps({"address": "evil host", "slots": [], "updated_at": 1}))
        state.client.hset(state.groups_key, "odd", json.dumps({"address": "10.0.0.1:1", "slots": "all",
                                                               "updated_at": 1}))
        assert set(state.groups()) == {"g0"}
        state.client.set(state.autoscaler_status_key, json.dumps({"decision": "rebalance", "groups": 2}))
        assert state.autoscaler_status() is None
        state.client.set(state.autoscaler_status_key, json.dumps({"last_rebalance": {"to_version": "x"}}))
        assert state.autoscaler_status() is None
        state.client.set(state.autoscaler_status_key, "[1, 2]")
        assert state.autoscaler_status() is None
    assert "groups['evil']" in caplog.text and "autoscaler:status" in caplog.text
    good = {"version": 3, "groups": 2, "enabled": True, "imbalance": 1.2, "decision": {"action": "hold", "reason": ""},
            "last_rebalance": {"result": "finished", "to_version": 3, "seconds": 0.5, "error": ""}}
    state.put_autoscaler_status(good)
    assert state.autoscaler_status() == good
    state.close()
