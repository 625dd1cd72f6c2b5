"""Routers follow placements published in Redis, and keep serving when Redis is gone."""
from __future__ import annotations

import time

import torch

from cluster.checkpoint.reader import Checkpoint
from cluster.placement.table import PlacementTable
from cluster.state.redis_server import EmbeddedRedis
from cluster.state.store import ClusterState
from helpers.groups import Groups
from router_service.serving.dispatch import RemoteExperts
from router_service.serving.placement_follower import PlacementFollower


def test_follow_publish_and_survive_redis_loss(tiny_checkpoint):
    spec = Checkpoint(tiny_checkpoint).spec
    everything = [(l, e) for l in spec.sparse_layers for e in range(spec.num_experts)]
    groups = Groups(tiny_checkpoint, [everything, everything])
    first = PlacementTable.round_robin(spec, [groups.addresses[0]])
    second = PlacementTable.round_robin(spec, [groups.addresses[1]], version=2)
    redis = EmbeddedRedis()
    state = ClusterState(redis.url)
    state.publish_placement(first)
    remote = RemoteExperts(spec, first)
    follower = PlacementFollower(remote, state, poll_s=0.05)
    x, ids, w = torch.randn(2, spec.hidden_size), torch.tensor([[0, 1], [2, 3]]), torch.full((2, 2), 0.5)
    try:
        state.publish_placement(second)
        deadline = time.monotonic() + 10
        while remote.pending_version < 2:
            assert time.monotonic() < deadline, "placement v2 was not picked up in 10 s"
            time.sleep(0.05)
        out = remote(spec.sparse_layers[0], x, ids, w)  # a step starts: v2 is adopted
        assert remote.table.version == 2

        redis.stop()  # Redis gone: serving goes on with the placement it has
        deadline = time.monotonic() + 10
        while follower.failures == 0:
            assert time.monotonic() < deadline, "the follower never noticed Redis was gone"
            time.sleep(0.05)
        assert torch.allclose(remote(spec.sparse_layers[0], x, ids, w), out)
        assert remote.table.version == 2
    finally:
        follower.close()
        remote.close()
        groups.close()
        redis.stop()
