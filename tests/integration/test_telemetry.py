"""Telemetry in Redis (real redis-server): router load buckets, group buckets, heartbeats,
bounded memory (TTL), and a router reporter that survives Redis going away and coming back."""
from __future__ import annotations

import time

import pytest

from cluster.state.redis_server import EmbeddedRedis
from cluster.state.store import ClusterState
from cluster.state.telemetry import BUCKET_S, TTL_S, Telemetry
from router_service.serving.telemetry_reporter import TelemetryReporter


@pytest.fixture(scope="module")
def server():
    with EmbeddedRedis() as s:
        yield s


@pytest.fixture
def telemetry(server, request):
    state = ClusterState(server.url, namespace=f"t{abs(hash(request.node.name))}")
    yield Telemetry(state)
    state.close()


def test_router_load_sums_over_routers_within_the_window(telemetry):
    now = 1_000_000.0
    telemetry.record_router("r1", {(1, 0): 5, (1, 3): 2}, version=4, now=now - 2 * BUCKET_S,
                            touched={(1, 0): 2, (1, 3): 1})
    telemetry.record_router("r2", {(1, 0): 7}, version=4, now=now, touched={(1, 0): 3})
    telemetry.record_router("r1", {(3, 1): 1}, version=4, now=now - 30 * BUCKET_S)  # outside a 5 s window
    assert telemetry.expert_load(5.0, now=now) == {(1, 0): 12, (1, 3): 2}
    assert telemetry.expert_load(60.0, now=now) == {(1, 0): 12, (1, 3): 2, (3, 1): 1}
    assert telemetry.expert_touches(5.0, now=now) == {(1, 0): 5, (1, 3): 1}
    for kind in ("load", "touched"):
        key = f"{telemetry.state.namespace}:{kind}:{int(now // BUCKET_S)}"
        assert 0 < telemetry.client.ttl(key) <= TTL_S  # memory stays bounded


def test_group_load_and_router_heartbeats(telemetry):
    now = time.time()
    telemetry.record_group("g0", {(0, 1): 10}, busy_s=0.25, calls=3, queue_depth=2, now=now - 1)
    telemetry.record_group("g0", {(0, 1): 4, (0, 2): 1}, busy_s=0.5, calls=1, queue_depth=0, now=now)
    telemetry.record_group("g1", {}, busy_s=0.0, calls=0, queue_depth=0, now=now)
    g = telemetry.group_load(5.0, now=now)
    assert g["g0"]["tokens"] == {(0, 1): 14, (0, 2): 1}
    assert g["g0"]["busy_s"] == pytest.approx(0.75) and g["g0"]["calls"] == 4 and g["g0"]["queue_depth"] == 2
    assert g["g1"]["busy_s"] == 0.0

    telemetry.record_router("alive", {}, version=7, metrics="127.0.0.1:9100", now=now)
    telemetry.record_router("silent", {}, version=3, now=now - 10)
    telemetry.record_router("gone", {}, version=2, now=now - 1000)
    routers = telemetry.routers(max_age_s=5.0, now=now)
    assert set(routers) == {"alive"} and routers["alive"]["version"] == 7
    assert set(telemetry.client.hkeys(telemetry.routers_key)) == {"alive", "silent"}  # long-dead entries deleted


class _Experts:
    """Stands in for RemoteExperts: the reporter only takes its load and version."""

    def __init__(self):
        self.version_in_use, self.pending = 1, {(0, 0): 3}

    def take_load(self):
        load, self.pending = self.pending, {}
        return load, {slot: 1 for slot in load}


def test_reporter_drops_while_redis_is_down_and_resumes():
    redis1 = EmbeddedRedis()
    state = ClusterState(redis1.url, "rep")
    experts = _Experts()
    reporter = TelemetryReporter(experts, Telemetry(state), flush_s=3600, router_id="r")  # flushed by hand
    try:
        assert reporter.flush()
        assert Telemetry(state).expert_load(5.0) == {(0, 0): 3}
        assert Telemetry(state).expert_touches(5.0) == {(0, 0): 1}
        port = redis1.port
        redis1.stop()
        experts.pending = {(0, 1): 2}
        assert not reporter.flush()  # dropped, counted, nothing raised
        assert reporter.dropped == 1
        redis2 = EmbeddedRedis(port=port)  # back where the client looks
        try:
            experts.pending = {(0, 2): 1}
            assert reporter.flush()
            assert Telemetry(state).expert_load(5.0) == {(0, 2): 1}  # a fresh server: the dropped batch is gone
            assert reporter.flushes == 2
        finally:
            reporter.close()
            redis2.stop()
    finally:
        state.close()
        redis1.stop()


def test_heartbeats_and_buckets_go_by_redis_clock_not_the_hosts(telemetry, monkeypatch):
    """A router whose host clock is an hour off still counts as heard from, and its load lands in the
    window the controller reads: every time comes from Redis (TIME), never from time.time() of the
    host that writes or reads."""
    monkeypatch.setattr(time, "time", lambda: 1_000_000_000.0 + 3600)  # this "host" is far off
    telemetry.record_router("skewed", {(1, 2): 3}, version=7)
    monkeypatch.undo()
    assert set(telemetry.routers()) == {"skewed"}
    assert telemetry.expert_load(5.0) == {(1, 2): 3}
    assert abs(telemetry.server_time() - time.time()) < 60  # Redis runs here: its clock is this one


def test_the_autoscaler_reads_the_window_by_redis_clock_and_weighs_touches(telemetry, monkeypatch):
    """The controller's host clock an hour off: the autoscaler still sees the load routers just wrote
    (buckets are read by Redis' clock, which wrote them), and with touch_cost it balances pairs plus
    touch_cost per call that touched an expert."""
    import numpy as np

    from cluster.control.autoscaler import Autoscaler
    from cluster.control.autoscaler_config import AutoscalerConfig
    from cluster.placement.table import PlacementTable, TableShape

    shape = TableShape(sparse_layers=(0, 1), num_experts=4)
    table = PlacementTable(1, ("127.0.0.1:1", "127.0.0.1:2"), {(l, e): (e % 2,) for l in (0, 1) for e in range(4)})
    telemetry.record_router("r", {(1, 2): 40, (1, 3): 10}, version=1, touched={(1, 2): 1, (1, 3): 4})
    telemetry.record_group("g0", {}, busy_s=1.0, calls=2, queue_depth=0)
    monkeypatch.setattr(time, "time", lambda: time.perf_counter() + 3600)  # the controller's host is far off
    scaler = Autoscaler(AutoscalerConfig(window_s=4.0, touch_cost=10.0), shape, telemetry)
    obs = scaler.observe(table, ["g0", "g1"])
    assert obs.loads[1, 2] * 4 == 40 and obs.pairs == 50 and obs.utilization == {"g0": 0.25, "g1": 0.0}
    assert np.allclose(obs.cost[1] * 4, [0, 0, 40 + 10 * 1, 10 + 10 * 4])
    assert obs.imbalance == pytest.approx(1.0)  # by cost 50 on each group; by pairs 40 against 10
    assert obs.current.imbalance(obs.loads) == pytest.approx(1.6)


def test_a_reporter_whose_round_raises_keeps_running_and_counts_it(telemetry):
    """Anything that fails inside a telemetry round (here: counting the load) is logged and counted, and
    the next round runs: a dead telemetry thread would stop the heartbeats routers are drained by."""
    class Experts:
        version_in_use = 3

        def __init__(self):
            self.calls = 0

        def take_load(self):
            self.calls += 1
            if self.calls == 1:
                raise RuntimeError("boom")
            return {(0, 1): 1}, {(0, 1): 1}

    errors = []
    reporter = TelemetryReporter(Experts(), telemetry, flush_s=0.02, router_id="r", on_error=errors.append)
    try:
        deadline = time.time() + 10
        while reporter.flushes < 2 and time.time() < deadline:
            time.sleep(0.02)
        assert errors == ["telemetry"] and reporter.flushes >= 2 and reporter.ticker.alive
    finally:
        reporter.close()
