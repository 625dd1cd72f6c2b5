"""The autoscaler end to end: real Ray (controller and group actors), a real redis-server,
real gRPC, and a real router in this process (engine, RemoteExperts, placement follower,
telemetry reporter; Serve's ingress is tested elsewhere).

Under traffic skewed to some experts, replicas of exactly those experts appear and
the imbalance falls; when the skew moves, replicas follow; when traffic stops, the
extra replicas (and groups) go away. Every request succeeds, with the reference's
tokens, throughout. Redis stopped under load for 10 s fails nothing.
"""
from __future__ import annotations

import numpy as np

from cluster.state.redis_server import EmbeddedRedis
from cluster.state.store import ClusterState
from cluster.state.telemetry import Telemetry
from helpers.cluster import FAST, Cluster
from helpers.traffic import Traffic, hot_tokens, wait_for


def hot_experts(state: ClusterState, spec, window_s: float) -> set[tuple[int, int]]:
    """(layer, expert) pairs with more load than their layer's mean in the last window."""
    load = Telemetry(state).expert_load(window_s)
    hot = set()
    for layer in spec.sparse_layers:
        row = np.array([load.get((layer, e), 0) for e in range(spec.num_experts)], dtype=float)
        hot |= {(layer, e) for e in range(spec.num_experts) if row[e] > row.mean()}
    return hot


def test_replicas_follow_the_skew_and_go_away(local_ray, tiny_checkpoint, reference):
    with EmbeddedRedis() as redis:
        cluster = Cluster(tiny_checkpoint, redis.url, 2, FAST)
        traffic = None
        try:
            spec = cluster.spec
            assert cluster.replicated() == set()  # round-robin start: one replica each, evens on group 0

            # phase 1: traffic on the even experts, all on group 0
            traffic = Traffic(cluster.router, reference, hot_tokens(reference, {0, 2, 4, 6}, 8), seed=1)
            wait_for(lambda: (cluster.status().get("imbalance") or 0) > FAST.get("imbalance_threshold", 1.15),
                     30, what="the autoscaler to see the skew")
            before = cluster.status()["imbalance"]
            replicated = wait_for(cluster.replicated, 40, what="replicas of the hot experts")
            hot = hot_experts(cluster.state, spec, 4.0)
            assert replicated <= hot, f"replicated {sorted(replicated)} but hot {sorted(hot)}"
            last = wait_for(lambda: cluster.status().get("last_rebalance"), 20, what="the rebalance to finish")
            assert last["result"] == "finished" and last["weights_loaded"] >= len(replicated), last
            after = wait_for(lambda: cluster.status().get("imbalance") if cluster.status()["version"] ==
                             last["to_version"] and cluster.status()["imbalance"] < before else None,
                             20, what="the imbalance to fall")
            assert after < before
            traffic.stop()

            # phase 2: the skew moves to the odd experts; replicas follow
            traffic = Traffic(cluster.router, reference, hot_tokens(reference, {1, 3, 5, 7}, 8), seed=2)
            moved = wait_for(lambda: {s for s in cluster.replicated() if s[1] % 2 == 1}, 60,
                             what="replicas of the new hot experts")
            assert moved <= hot_experts(cluster.state, spec, 4.0) | moved  # sanity: they exist
            assert moved <= {(l, e) for l in spec.sparse_layers for e in (1, 3, 5, 7)}
            traffic.stop()
            assert traffic.failed == 0 and traffic.mismatched == 0, traffic.errors[:5]

            # phase 3: traffic stops; the extra replicas go away
            wait_for(lambda: not cluster.replicated(), 40, what="extra replicas to be dropped")
            assert set(cluster.replica_counts().values()) == {1}
        finally:
            if traffic is not None:
                traffic.stop()
                assert traffic.failed == 0, traffic.errors[:5]
                assert traffic.mismatched == 0, traffic.errors[:5]
            cluster.close()


def test_groups_scale_with_utilisation(local_ray, tiny_checkpoint, reference):
    """Busy groups add one (up to max_groups); idle ones are removed (down to min_groups)."""
    autoscaler = {**FAST, "min_groups": 1, "max_groups": 2, "scale_up_utilization": 0.001,
                  "scale_down_utilization": 0.0005, "scale_sustain_s": 1.0}
    with EmbeddedRedis() as redis:
        cluster = Cluster(tiny_checkpoint, redis.url, 1, autoscaler)
        traffic = None
        try:
            traffic = Traffic(cluster.router, reference, list(range(2, 200)), seed=3)
            wait_for(lambda: len(cluster.state.load_placement().groups) == 2, 60, what="a second group")
            table = cluster.state.load_placement()
            assert {g for gs in table.replicas.values() for g in gs} == {0, 1}  # the new group serves experts
            wait_for(lambda: cluster.router.experts.table.version >= table.version, 10,
                     what="the router to switch")
            traffic.stop()
            assert traffic.failed == 0 and traffic.mismatched == 0, traffic.errors[:5]
            ok = traffic.ok
            assert ok > 0
            wait_for(lambda: len(cluster.state.load_placement().groups) == 1, 60, what="the idle group to go")
            # the removed group is stopped (and unregistered) once the router has left the old placement
            wait_for(lambda: len(cluster.state.groups()) == 1, 20, what="the removed group unregistered")
        finally:
            if traffic is not None:
                traffic.stop()
            cluster.close()


def test_redis_down_for_10_s_under_load_fails_nothing(local_ray, tiny_checkpoint, reference):
    redis = EmbeddedRedis()
    cluster = Cluster(tiny_checkpoint, redis.url, 2, {**FAST, "enabled": False})
    traffic = Traffic(cluster.router, reference, list(range(2, 200)), seed=4)
    reporter = cluster.router.reporter
    try:
        wait_for(lambda: traffic.ok >= 3, 30, what="traffic")
        port = redis.port
        redis.stop()
        served_before = traffic.ok
        wait_for(lambda: reporter.dropped > 0, 10, what="telemetry to notice")
        import time

        time.sleep(10)
        assert traffic.ok > served_before  # kept serving on the last placement
        redis = EmbeddedRedis(port=port)  # back, empty (no persistence)
        flushes = reporter.flushes
        wait_for(lambda: reporter.flushes > flushes, 15, what="telemetry to resume")
        wait_for(lambda: Telemetry(cluster.state).expert_load(5.0), 15, what="load in the new Redis")
        # the controller notices the empty Redis and publishes its placement again
        wait_for(lambda: cluster.state.load_placement() is not None, 15, what="the placement re-published")
        traffic.stop()
        assert traffic.failed == 0 and traffic.mismatched == 0, traffic.errors[:5]
    finally:
        traffic.stop()
        cluster.close()
        redis.stop()


def test_manual_scale_while_paused_and_metrics(local_ray, tiny_checkpoint, reference, capsys):
    """`moectl scale` works while the autoscaler is paused; bad values are clear errors; the
    router and the autoscaler export Prometheus metrics over HTTP."""
    import urllib.request

    from cluster.cli.main import main

    with EmbeddedRedis() as redis:
        cluster = Cluster(tiny_checkpoint, redis.url, 2, FAST)
        flags = ["--redis-url", redis.url, "--namespace", cluster.namespace]
        traffic = None
        try:
            assert main(["autoscaler", "pause", *flags]) == 0
            traffic = Traffic(cluster.router, reference, list(range(2, 200)), seed=5)
            layer = cluster.spec.sparse_layers[-1]
            assert main(["scale", "--layer", str(layer), "--expert", "3", "--replicas", "2", *flags]) == 0
            assert cluster.replica_counts()[(layer, 3)] == 2
            assert "2 replica(s)" in capsys.readouterr().out
            assert main(["scale", "--layer", str(layer), "--expert", "3", "--replicas", "5", *flags]) == 2
            assert "replicas must be in [1, 2]" in capsys.readouterr().err
            assert main(["placement", "show", *flags]) == 0
            shown = capsys.readouterr().out
            assert f"layer {layer}" in shown and "imbalance" in shown and "...2...." in shown  # expert 3: 2 replicas
            assert main(["placement", "plan", *flags]) == 0
            assert "weight load(s)" in capsys.readouterr().out
            wait_for(lambda: Telemetry(cluster.state).expert_touches(10.0), 15, what="touched calls in Redis")
            assert main(["placement", "plan", "--touch-cost", "16", *flags]) == 0  # as autoscaler.touch_cost
            assert "weight load(s)" in capsys.readouterr().out
            assert main(["placement", "plan", "--touch-cost", "-1", *flags]) == 2
            assert "touch_cost must be a number >= 0" in capsys.readouterr().err
            wait_for(lambda: traffic.ok >= 3, 30, what="traffic")
            assert main(["scale", "--layer", str(layer), "--expert", "3", "--replicas", "1", *flags]) == 0
            assert cluster.replica_counts()[(layer, 3)] == 1
            assert cluster.status()["paused"] is True  # paused all along: only the manual changes happened
            traffic.stop()
            assert traffic.failed == 0 and traffic.mismatched == 0, traffic.errors[:5]

            router_metrics = urllib.request.urlopen(f"http://{cluster.router.metrics_address}/metrics",
                                                    timeout=10).read().decode()
            assert "elasticmoe_routed_pairs_total" in router_metrics and "elasticmoe_forward_seconds" in router_metrics
            assert "elasticmoe_expert_routed_pairs" not in router_metrics  # per-expert series only when asked
            address = cluster.status()["metrics"]
            scaler_metrics = urllib.request.urlopen(f"http://{address}/metrics", timeout=10).read().decode()
            for name in ("elasticmoe_imbalance", "elasticmoe_rebalances_total", "elasticmoe_weights_moved_total",
                         "elasticmoe_group_utilization", "elasticmoe_replicas", "elasticmoe_group_kernel_calls_total",
                         "elasticmoe_group_coalesced_forwards_total"):
                assert name in scaler_metrics, name
            forwards = [float(line.rsplit(" ", 1)[1]) for line in scaler_metrics.splitlines()
                        if line.startswith("elasticmoe_group_forwards_total{")]
            assert len(forwards) == 2 and all(n > 0 for n in forwards)  # both groups served the traffic
            assert 'elasticmoe_rebalances_total{result="finished"} 2.0' in scaler_metrics
        finally:
            if traffic is not None:
                traffic.stop()
            cluster.close()
