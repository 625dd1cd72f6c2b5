"""Faults under load, with real Ray, Redis and gRPC and a real router in this process.

kill -9 of an expert group's process: with another replica of every expert, no request
fails and every output equals the reference; Ray restarts the group, the controller
reloads its slots and publishes its new address, and health returns to SERVING. With no
other replica, requests fail fast with UNAVAILABLE naming the missing experts.
"""
from __future__ import annotations

import os
import signal
import time

import pytest
import ray
from test_autoscaler_ray import FAST, Cluster, local_ray, reference  # noqa: F401  (fixtures)
from traffic import Traffic, generate, wait_for

from cluster.redis_server import EmbeddedRedis
from router_service.dispatch import DispatchError


def kill_group(cluster: Cluster, i: int) -> None:
    actor = ray.get_actor(f"{cluster.name}-group-{i}")
    os.kill(ray.get(actor.pid.remote(), timeout=10), signal.SIGKILL)


def test_group_killed_with_replicas_elsewhere_fails_nothing_and_recovers(local_ray, tiny_checkpoint, reference):
    # room for every expert on both groups (S = E), the autoscaler otherwise idle
    settings = {**FAST, "spare_slots": 1.0, "enabled": False}
    with EmbeddedRedis() as redis:
        cluster = Cluster(tiny_checkpoint, redis.url, 2, settings)
        traffic = None
        try:
            for layer in cluster.spec.sparse_layers:
                for expert in range(cluster.spec.num_experts):
                    ray.get(cluster.controller.scale.remote(layer, expert, 2), timeout=60)
            assert set(cluster.replica_counts().values()) == {2}
            wait_for(lambda: cluster.router.experts.pending_version == cluster.state.placement_version(), 10,
                     what="the router on the replicated placement")
            traffic = Traffic(cluster.router, reference, list(range(2, 200)), seed=6)
            wait_for(lambda: traffic.ok >= 3, 30, what="traffic")
            version = cluster.state.placement_version()
            killed_at = time.monotonic()
            kill_group(cluster, 0)
            served = traffic.ok
            wait_for(lambda: traffic.ok >= served + 5, 30, what="requests served with group 0 dead")
            # Ray restarts it; the controller's repair loop reloads its slots and publishes the new address
            wait_for(lambda: cluster.state.placement_version() > version, 60, what="group 0 re-published")
            wait_for(cluster.router.serving, 30, what="health back to SERVING")
            recovered_s = time.monotonic() - killed_at
            print(f"kill -9 of a group with replicas elsewhere: recovered (new address serving) in {recovered_s:.1f} s")
            table = cluster.state.load_placement()
            assert set(cluster.replica_counts().values()) == {2}  # its slots are back
            wait_for(lambda: cluster.router.experts.pending_version == table.version, 10, what="router switched")
            traffic.stop()
            assert traffic.failed == 0 and traffic.mismatched == 0, traffic.errors[:5]
        finally:
            if traffic is not None:
                traffic.stop()
            cluster.close()


def test_group_killed_without_replicas_fails_fast_with_unavailable(local_ray, tiny_checkpoint, reference):
    settings = {**FAST, "enabled": False}
    with EmbeddedRedis() as redis:
        cluster = Cluster(tiny_checkpoint, redis.url, 2, settings)
        try:
            ray.get(cluster.controller.check_groups.remote(), timeout=30)
            actor = ray.get_actor(f"{cluster.name}-group-1")
            ray.kill(actor, no_restart=True)  # gone for good: nothing holds the odd experts now
            time.sleep(1.0)
            start = time.monotonic()
            with pytest.raises(DispatchError) as err:
                for _ in range(5):  # a prompt that never routes to an odd expert is unlikely; try a few
                    generate(cluster.router, list(range(2, 14)), 4, timeout_s=30)
            assert time.monotonic() - start < cluster.router.experts.timeout_s
            assert err.value.code.name == "UNAVAILABLE"
            assert "no live replica of (layer, expert)" in str(err.value)
        finally:
            cluster.close()
