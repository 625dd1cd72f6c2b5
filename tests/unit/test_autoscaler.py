"""The autoscaler's decide(): pure logic over an Observation (no Ray, no Redis)."""
from __future__ import annotations

import numpy as np
import pytest

from cluster.control.autoscaler import ADD_GROUP, HOLD, REBALANCE, REMOVE_GROUP, Autoscaler, Observation
from cluster.control.autoscaler_config import AutoscalerConfig
from cluster.placement.table import PlacementTable, TableShape

SHAPE = TableShape(sparse_layers=(0, 1), num_experts=8)


def table(groups: int = 2) -> PlacementTable:
    replicas = {(l, e): (e % groups,) for l in SHAPE.sparse_layers for e in range(8)}
    return PlacementTable(1, tuple(f"127.0.0.1:{9000 + g}" for g in range(groups)), replicas)


def observe(scaler: Autoscaler, t: PlacementTable, loads, now: float, util: float = 0.5) -> Observation:
    loads = np.asarray(loads, dtype=float)
    current = t.to_placement(SHAPE, scaler.slots_per_group(len(t.groups)))
    return Observation(now, loads, int(loads.sum() * scaler.config.window_s),
                       {f"g{g}": util for g in range(len(t.groups))}, current.imbalance(loads), current, loads)


def skewed() -> np.ndarray:
    loads = np.ones((2, 8))
    loads[:, [0, 2]] = 30  # both on group 0
    return loads


def scaler(**kw) -> Autoscaler:
    return Autoscaler(AutoscalerConfig(**{"cooldown_s": 5.0, "sustain_s": 2.0, **kw}), SHAPE, telemetry=None)


def test_imbalance_must_hold_for_sustain_s_then_replicas_of_hot_experts_are_planned():
    s, t = scaler(), table()
    assert s.decide(observe(s, t, skewed(), now=100.0), t).action == HOLD  # cooldown from start is over
    assert s.decide(observe(s, t, skewed(), now=101.0), t).action == HOLD  # held 1 s < sustain_s
    d = s.decide(observe(s, t, skewed(), now=102.5), t)
    assert d.action == REBALANCE and d.placement.weight_loads > 0
    counts = d.placement.replica_counts(8)
    assert {e for e in range(8) if counts[:, e].max() > 1} <= {0, 2}


def test_the_plan_balances_the_cost_not_the_pairs_when_they_differ():
    """With touch_cost the planner balances pairs + touch_cost * calls touched (Observation.cost): here
    experts 0 and 2 (group 0) have the pairs, but 1 and 3 (group 1) cost the most, so the plan replicates
    those."""
    s, t = scaler(), table()
    loads, cost = skewed(), np.ones((2, 8))
    cost[:, [1, 3]] = 60
    current = t.to_placement(SHAPE, s.slots_per_group(2))
    for now in (100.0, 102.5):
        obs = Observation(now, loads, int(loads.sum() * 4), {"g0": 0.5, "g1": 0.5}, current.imbalance(cost), current,
                          cost)
        d = s.decide(obs, t)
    assert d.action == REBALANCE and d.placement.weight_loads > 0
    counts = d.placement.replica_counts(8)
    replicated = {e for e in range(8) if counts[:, e].max() > 1}
    assert replicated and replicated <= {1, 3}  # by pairs it would have been 0 and 2


def test_a_blip_resets_the_timer_and_cooldown_holds():
    s, t = scaler(), table()
    s.decide(observe(s, t, skewed(), now=100.0), t)
    s.decide(observe(s, t, np.ones((2, 8)), now=101.0), t)  # balanced for one round
    assert s.decide(observe(s, t, skewed(), now=102.5), t).action == HOLD  # timer restarted at 102.5
    s.changed(now=200.0)
    for now in (200.5, 203.0, 204.9):
        assert s.decide(observe(s, t, skewed(), now=now), t).reason.startswith("cooldown")


def test_no_traffic_drops_extra_replicas_but_never_groups_without_max_groups():
    s = scaler(min_groups=1, scale_sustain_s=1.0)
    t = table()
    t = PlacementTable(1, t.groups, {**t.replicas, (0, 0): (0, 1)})
    idle = np.zeros((2, 8))
    s.decide(observe(s, t, idle, now=100.0, util=0.0), t)
    d = s.decide(observe(s, t, idle, now=103.0, util=0.0), t)
    assert d.action == REBALANCE and d.placement.replica_counts(8).max() == 1  # max_groups None: no removal


def test_groups_scale_within_min_and_max():
    up = scaler(min_groups=1, max_groups=3, scale_sustain_s=1.0, scale_up_utilization=0.5,
                scale_down_utilization=0.1)
    t = table()
    up.decide(observe(up, t, np.ones((2, 8)), now=100.0, util=0.9), t)
    assert up.decide(observe(up, t, np.ones((2, 8)), now=101.5, util=0.9), t).action == ADD_GROUP
    full = table(3)
    up2 = scaler(min_groups=1, max_groups=3, scale_sustain_s=1.0, scale_up_utilization=0.5,
                 scale_down_utilization=0.1)
    up2.decide(observe(up2, full, np.ones((2, 8)), now=100.0, util=0.9), full)
    assert up2.decide(observe(up2, full, np.ones((2, 8)), now=102.0, util=0.9), full).action != ADD_GROUP
    down = scaler(min_groups=1, max_groups=3, scale_sustain_s=1.0, scale_up_utilization=0.5,
                  scale_down_utilization=0.1)
    down.decide(observe(down, t, np.ones((2, 8)), now=100.0, util=0.01), t)
    d = down.decide(observe(down, t, np.ones((2, 8)), now=101.5, util=0.01), t)
    assert d.action == REMOVE_GROUP and d.placement.slots.shape[1] == 1


@pytest.mark.parametrize("bad", [{"imbalance_threshold": 0.9}, {"min_groups": 0}, {"max_groups": 0},
                                 {"scale_down_utilization": 0.9}, {"window_s": 0}, {"enabled": "yes"},
                                 {"metrics_port": 70000}])
def test_config_errors_name_the_field(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        AutoscalerConfig(**bad)


@pytest.mark.parametrize("key, value", [("touch_cost", -1.0), ("touch_cost", float("nan")), ("touch_cost", "16"),
                                        ("window_s", float("inf")), ("cooldown_s", float("nan"))])
def test_config_refuses_negative_and_non_finite_numbers_by_name(key, value):
    """NaN or infinity would turn every cost and imbalance into NaN, silently: refused, naming the key."""
    with pytest.raises(ValueError, match=f"{key} must be a"):
        AutoscalerConfig(**{key: value})
