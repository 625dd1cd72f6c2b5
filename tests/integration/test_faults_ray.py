"""Faults under load, with real Ray, Redis and gRPC and a real router in this process.

On 2 groups that both hold every expert:
- a slow group (5 s of injected delay per Forward): its calls are given up after
  forward_slow_s and its tokens go to the other replica; every request meets a deadline far
  below what waiting would take, and the slowness shows in the router's metrics;
- kill -9 of a group's process: no request fails and every output equals the reference; Ray
  restarts the group, the controller reloads its slots and publishes its new address, and
  health returns to SERVING;
- a group killed while it loads a new replica (LoadExperts): the rebalance fails and rolls
  back, the placement keeps the expert where it was, and no request fails.
On 2 groups that split the experts: a group lost for good (kill -9, no restarts left) fails
requests for its experts fast with UNAVAILABLE naming them; the controller then re-places
its experts on the survivor and requests succeed again.
"""
from __future__ import annotations

import contextlib
import os
import signal
import time

import pytest
import ray

from cluster.state.redis_server import EmbeddedRedis
from helpers.cluster import FAST, Cluster
from helpers.groups import group_stats
from helpers.traffic import Traffic, generate, wait_for
from router_service.serving.dispatch import DispatchError

SLOW_S = 0.5  # the router's forward_slow_s here: a group this late loses the call to a replica
DELAY_S = 5.0  # injected into every Forward of the slow group
REQUEST_DEADLINE_S = 20.0  # a request of ~6 steps x 2 MoE layers that waited for DELAY_S would need 60 s


def group(cluster: Cluster, i: int):
    return ray.get_actor(f"{cluster.name}-group-{i}")


def kill_group(cluster: Cluster, i: int) -> None:
    os.kill(ray.get(group(cluster, i).pid.remote(), timeout=10), signal.SIGKILL)




@contextlib.contextmanager
def replicated_cluster(checkpoint):
    """2 groups, every expert on both (room for all: S = E), the autoscaler idle."""
    settings = {**FAST, "spare_slots": 1.0, "enabled": False}
    with EmbeddedRedis() as redis:
        cluster = Cluster(checkpoint, redis.url, 2, settings, router={"forward_slow_s": SLOW_S})
        try:
            for layer in cluster.spec.sparse_layers:
                for expert in range(cluster.spec.num_experts):
                    ray.get(cluster.controller.scale.remote(layer, expert, 2), timeout=60)
            assert set(cluster.replica_counts().values()) == {2}
            wait_for(lambda: cluster.router.experts.pending_version == cluster.state.placement_version(), 10,
                     what="the router on the replicated placement")
            yield cluster
        finally:
            cluster.close()


@pytest.fixture(scope="module")
def shared(local_ray, tiny_checkpoint):  # noqa: F811
    with replicated_cluster(tiny_checkpoint) as cluster:
        yield cluster


@pytest.fixture
def replicated(shared):
    """The shared cluster brought back to one known state before each test, whatever ran before it
    (or in which order): no fault injected, every expert on both groups, both serving, the router on
    the latest placement. A test that changes the cluster for good makes its own (replicated_cluster)."""
    cluster = shared
    for i in range(2):
        ray.get(group(cluster, i).inject_fault.remote(), timeout=30)
    for (layer, expert), n in cluster.replica_counts().items():
        if n != 2:
            ray.get(cluster.controller.scale.remote(layer, expert, 2), timeout=60)
    assert set(cluster.replica_counts().values()) == {2}
    wait_for(cluster.router.serving, 60, what="both groups serving")
    wait_for(lambda: cluster.router.experts.pending_version == cluster.state.placement_version(), 10,
             what="the router on the latest placement")
    return cluster


def test_slow_group_loses_its_calls_to_the_other_replica(replicated, reference):  # noqa: F811
    cluster = replicated
    metrics = cluster.router.metrics.registry
    traffic = Traffic(cluster.router, reference, list(range(2, 200)), seed=7, timeout_s=REQUEST_DEADLINE_S)
    try:
        wait_for(lambda: traffic.ok >= 3, 30, what="traffic")
        ray.get(group(cluster, 0).inject_fault.remote(forward_delay_s=DELAY_S), timeout=10)
        served = traffic.ok
        wait_for(lambda: traffic.ok >= served + 6, 60, what="requests served with group 0 slow")
    finally:
        ray.get(group(cluster, 0).inject_fault.remote(), timeout=10)
        traffic.stop()
    assert traffic.failed == 0 and traffic.mismatched == 0, traffic.errors[:5]
    slow = cluster.router.experts.table.groups[0]  # metrics name a group by its address
    assert metrics.get_sample_value("elasticmoe_forward_slow_total", {"group": slow}) >= 1
    print(f"slow group: {traffic.ok} requests, latency max {max(traffic.latencies_s):.2f} s with {DELAY_S} s "
          f"injected per Forward and forward_slow_s {SLOW_S}")


def test_group_killed_with_replicas_elsewhere_fails_nothing_and_recovers(replicated, reference):  # noqa: F811
    cluster = replicated
    traffic = Traffic(cluster.router, reference, list(range(2, 200)), seed=6)
    try:
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
    finally:
        traffic.stop()
    assert traffic.failed == 0 and traffic.mismatched == 0, traffic.errors[:5]


def test_group_dying_during_load_experts_rolls_back_and_fails_nothing(replicated, reference):  # noqa: F811
    cluster = replicated
    layer, expert = cluster.spec.sparse_layers[0], 0
    ray.get(cluster.controller.scale.remote(layer, expert, 1), timeout=60)
    (holder,) = cluster.state.load_placement().replicas[(layer, expert)]
    target = 1 - holder  # the group the next scale-up loads onto; it holds a replica of every other expert
    ray.get(group(cluster, target).inject_fault.remote(load_delay_s=30.0), timeout=10)
    credentials = ray.get(cluster.controller.router_credentials.remote(), timeout=10)
    address = cluster.state.load_placement().groups[target]
    traffic = Traffic(cluster.router, reference, list(range(2, 200)), seed=8)
    try:
        wait_for(lambda: traffic.ok >= 3, 30, what="traffic")
        pending = cluster.controller.scale.remote(layer, expert, 2)
        # the target is inside LoadExperts (it waits 30 s before reading anything): kill it there
        wait_for(lambda: group_stats(address, credentials).loads_in_flight == 1, 30, what="LoadExperts under way")
        version = cluster.state.placement_version()
        killed_at = time.monotonic()
        kill_group(cluster, target)
        result = ray.get(pending, timeout=60)
        assert result["result"] == "failed" and "LoadExperts" in result["error"], result
        assert ray.get(cluster.controller.status.remote(), timeout=10)["last_rebalance"]["result"] == "failed"
        assert cluster.state.load_placement().replicas[(layer, expert)] == (holder,)  # rolled back
        # Ray restarts the target; the repair loop reloads its slots and publishes its new address
        wait_for(lambda: cluster.state.placement_version() > version, 60, what="the target re-published")
        table = cluster.state.load_placement()
        wait_for(lambda: group_stats(table.groups[target], credentials, timeout_s=2).forward_calls > 0, 60,
                 what="the restarted target serving traffic")
        recovered_s = time.monotonic() - killed_at
        held = {(s.slot.layer, s.slot.expert) for s in group_stats(table.groups[target], credentials).slots}
        assert set(table.slots_of(target)) <= held  # its slots reloaded
        print(f"group killed during LoadExperts: rebalance rolled back; the group serving again {recovered_s:.1f} s "
              f"after the kill")
    finally:
        traffic.stop()
    assert traffic.failed == 0 and traffic.mismatched == 0, traffic.errors[:5]
    assert cluster.replica_counts()[(layer, expert)] == 1


def test_replicated_group_lost_for_good_goes_and_fails_nothing(local_ray, tiny_checkpoint, reference):  # noqa: F811
    """Every expert of the lost group has a replica elsewhere: its address leaves the published
    placement (v+1 over the survivor) and no request fails. Its own cluster: it loses a group for good."""
    with replicated_cluster(tiny_checkpoint) as cluster:
        lose_a_replicated_group(cluster, reference)


def lose_a_replicated_group(cluster, reference) -> None:
    wait_for(cluster.router.serving, 60, what="both groups serving")
    traffic = Traffic(cluster.router, reference, list(range(2, 200)), seed=10)
    try:
        wait_for(lambda: traffic.ok >= 3, 30, what="traffic")
        version = cluster.state.placement_version()
        lost_at = time.monotonic()
        ray.kill(group(cluster, 1), no_restart=True)  # gone for good, like a group out of restarts
        table = wait_for(lambda: (t := cluster.state.load_placement()).version > version and len(t.groups) == 1 and t,
                         60, what="a placement without the lost group")
        table.validate(cluster.spec)
        wait_for(lambda: cluster.router.experts.pending_version == table.version, 10, what="the router on it")
        gone_s = time.monotonic() - lost_at
        served = traffic.ok
        wait_for(lambda: traffic.ok >= served + 3, 30, what="traffic on the survivor")
        assert cluster.router.serving()
        print(f"replicated group lost for good: out of the placement {gone_s:.1f} s after the kill")
    finally:
        traffic.stop()
    assert traffic.failed == 0 and traffic.mismatched == 0, traffic.errors[:5]


def test_group_lost_for_good_fails_fast_then_its_experts_move(local_ray, tiny_checkpoint, reference):  # noqa: F811
    # no restarts left, and group checks on call only, so the test sees both phases in order
    settings = {**FAST, "enabled": False}
    with EmbeddedRedis() as redis:
        cluster = Cluster(tiny_checkpoint, redis.url, 2, settings,
                          controller={"max_group_restarts": 0, "repair_interval_s": None})
        try:
            ray.get(cluster.controller.check_groups.remote(), timeout=30)
            lost = f"{cluster.name}-group-1"
            killed_at = time.monotonic()
            kill_group(cluster, 1)
            start = time.monotonic()
            with pytest.raises(DispatchError) as err:
                for _ in range(5):  # a prompt that never routes to an odd expert is unlikely; try a few
                    generate(cluster.router, list(range(2, 14)), 4, timeout_s=30)
            assert time.monotonic() - start < cluster.router.experts.timeout_s
            assert err.value.code.name == "UNAVAILABLE"
            assert "no live replica of (layer, expert)" in str(err.value)

            result = ray.get(cluster.controller.check_groups.remote(), timeout=120)
            assert lost in result["failed"], result
            table = cluster.state.load_placement()
            assert len(table.groups) == 1 and table.version == result["version"]
            table.validate(cluster.spec)  # every expert has a replica again, on the survivor
            assert list(cluster.state.groups()) == [f"{cluster.name}-group-0"]
            wait_for(cluster.router.serving, 30, what="health SERVING on the survivor")
            recovered_s = time.monotonic() - killed_at
            traffic = Traffic(cluster.router, reference, list(range(2, 200)), seed=9)
            wait_for(lambda: traffic.ok >= 5, 30, what="requests served by the survivor")
            traffic.stop()
            assert traffic.failed == 0 and traffic.mismatched == 0, traffic.errors[:5]
            print(f"group lost for good: experts re-placed on the survivor {recovered_s:.1f} s after the kill")
        finally:
            cluster.close()
