"""The placement planner: hard rules on random and adversarial loads (hypothesis), balance
on Zipf-skewed loads, never worse than the EPLB greedy baseline (written here, from its
description, as the reference), migration awareness, and speed."""
from __future__ import annotations

import heapq
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.placement import Placement, PlannerConfig, plan, round_robin

CONFIG = PlannerConfig()


def zipf(rng, L: int, E: int, a: float = 1.2) -> np.ndarray:
    """loads[l, e] proportional to 1/rank^a, a random permutation per layer."""
    out = np.zeros((L, E))
    for l in range(L):
        out[l, rng.permutation(E)] = 1000.0 / np.arange(1, E + 1) ** a
    return out


def eplb_baseline(w: np.ndarray, budget: int, G: int, S: int) -> float:
    """One layer, the reference greedy: replicate the heaviest load-per-replica expert (ties:
    lowest id; at most G replicas) up to `budget`; pack replicas heaviest first (ties: expert
    id) onto the least-loaded group (ties: lowest id) with a free slot lacking the expert;
    even shares. Returns max/mean group load."""
    E = len(w)
    r = [1] * E
    heap = [(-w[e], e) for e in range(E)]
    heapq.heapify(heap)
    for _ in range(budget - E):
        while heap:
            _, e = heapq.heappop(heap)
            if r[e] < G:
                break
        else:
            break
        r[e] += 1
        if r[e] < G:
            heapq.heappush(heap, (-w[e] / r[e], e))
    items = sorted(((w[e] / r[e], e) for e in range(E) for _ in range(r[e])), key=lambda t: (-t[0], t[1]))
    load, held = [0.0] * G, [set() for _ in range(G)]
    for per, e in items:
        options = [g for g in range(G) if len(held[g]) < S and e not in held[g]]
        if not options:
            continue
        g = min(options, key=lambda g: (load[g], g))
        held[g].add(e)
        load[g] += per
    mean = sum(load) / G
    return max(load) / mean if mean > 0 else 1.0


def check_rules(p: Placement, E: int, G: int, S: int) -> None:
    assert p.slots.shape[1:] == (G, S)
    p.validate(E)  # every expert has a replica, no duplicates per group, shares sum to 1
    assert (p.shares >= 0).all() and (p.shares[p.slots < 0] == 0).all()


loads_strategy = st.sampled_from(["zipf", "zeros", "one-hot", "equal", "range"])


@settings(max_examples=60, deadline=None)
@given(kind=loads_strategy, L=st.integers(1, 3), E=st.integers(1, 12), G=st.integers(1, 5),
       spare=st.integers(0, 6), seed=st.integers(0, 2**16))
def test_hard_rules_hold_on_any_load(kind, L, E, G, spare, seed):
    rng = np.random.default_rng(seed)
    S = -(-E // G) + spare % 3  # E <= G*S always; sometimes exactly full
    loads = {"zipf": lambda: zipf(rng, L, E), "zeros": lambda: np.zeros((L, E)),
             "one-hot": lambda: np.eye(E)[rng.integers(0, E, L)] * 1e6,
             "equal": lambda: np.ones((L, E)),
             "range": lambda: 10.0 ** rng.uniform(-6, 9, (L, E))}[kind]()
    p = plan(loads, G, S)
    check_rules(p, E, G, S)
    q = plan(loads * rng.uniform(0.5, 2.0, loads.shape), G, S, current=p)
    check_rules(q, E, G, S)
    if G > 1 and E <= (G - 1) * S:  # a group removed
        check_rules(plan(loads, G - 1, S, current=q), E, G - 1, S)
    check_rules(plan(loads, G + 1, S, current=q), E, G + 1, S)  # a group added


@pytest.mark.parametrize("L,E,G,S", [(4, 8, 2, 5), (4, 64, 8, 10), (4, 256, 64, 5), (4, 60, 6, 13)])
def test_zipf_balance_and_never_worse_than_eplb(L, E, G, S):
    assert G * S >= 1.25 * E
    rng = np.random.default_rng(7)
    for _ in range(3):
        loads = zipf(rng, L, E)
        p = plan(loads, G, S)
        check_rules(p, E, G, S)
        mine = p.layer_imbalance(loads)
        assert mine.max() <= 1.05, mine
        for l in range(L):
            used = int((p.slots[l] >= 0).sum())
            assert mine[l] <= eplb_baseline(loads[l], used, G, S) + 1e-9  # same replica budget
            assert mine[l] <= max(eplb_baseline(loads[l], G * S, G, S), CONFIG.target_imbalance) + 1e-9  # every slot


def test_unchanged_loads_move_nothing_and_small_drift_moves_little():
    rng = np.random.default_rng(3)
    for L, E, G, S in [(4, 8, 2, 5), (4, 64, 8, 10)]:
        loads = zipf(rng, L, E)
        p = plan(loads, G, S)
        same = plan(loads, G, S, current=p)
        assert same.weight_loads == 0 and same.sets() == p.sets()
        filled = int((p.slots >= 0).sum())
        for _ in range(3):
            drift = loads * rng.uniform(0.9, 1.1, loads.shape)
            q = plan(drift, G, S, current=p)
            loaded, dropped = q.moves(p)
            assert q.weight_loads == loaded
            assert loaded + dropped <= 0.10 * filled, (loaded, dropped, filled)  # loads and unloads both count


def test_hot_experts_gain_replicas_and_lose_them_when_the_skew_moves():
    L, E, G, S = 2, 8, 2, 6
    start = round_robin(L, E, G, S)  # even experts on group 0
    hot_even = np.ones((L, E))
    hot_even[:, [0, 2]] = 20
    p = plan(hot_even, G, S, current=start)
    assert p.imbalance(hot_even) < start.imbalance(hot_even) - CONFIG.min_gain
    replicated = {(l, e) for l in range(L) for e in range(E) if p.replica_counts(E)[l, e] > 1}
    assert replicated and {e for _, e in replicated} <= {0, 2}
    assert p.weight_loads == len(replicated)

    hot_odd = np.ones((L, E))
    hot_odd[:, [1, 3]] = 20
    q = plan(hot_odd, G, S, current=p)
    counts = q.replica_counts(E)
    assert {e for l in range(L) for e in range(E) if counts[l, e] > 1} <= {1, 3}
    assert counts[:, [0, 2]].max() == 1  # the old hot experts lost their extra replicas

    idle = plan(np.zeros((L, E)), G, S, current=q)
    assert idle.replica_counts(E).max() == 1 and idle.weight_loads == 0


def test_a_hot_expert_that_cools_down_keeps_one_replica():
    L, E, G, S = 1, 16, 4, 6
    hot = np.ones((L, E))
    hot[0, 5] = 60
    p = plan(hot, G, S)
    assert p.replica_counts(E)[0, 5] >= 3
    q = plan(np.ones((L, E)), G, S, current=p)
    assert q.replica_counts(E)[0, 5] == 1 and q.weight_loads == 0


def test_gain_below_threshold_keeps_the_current_sets():
    L, E, G, S = 1, 8, 2, 6
    start = round_robin(L, E, G, S)
    slight = np.ones((L, E))
    slight[0, 0] = 1.15  # group 0 carries 4.15 vs 4: imbalance 1.02, a plan could gain ~0.02 only
    q = plan(slight, G, S, current=start, config=PlannerConfig(min_gain=0.05))
    assert q.weight_loads == 0 and q.sets() == start.sets()


def test_groups_added_and_removed():
    L, E = 2, 8
    loads = np.ones((L, E))
    loads[:, [1, 3]] = 20
    p = plan(loads, 2, 6, current=round_robin(L, E, 2, 6))
    wider = plan(loads, 3, 4, current=p)
    check_rules(wider, E, 3, 4)
    assert wider.imbalance(loads) <= p.imbalance(loads) + 1e-9
    assert all(len(s) > 0 for s in wider.sets()[0])  # the new group serves something
    narrower = plan(loads, 2, 6, current=wider)
    check_rules(narrower, E, 2, 6)
    # every expert the removed group held alone was placed again, each a weight load
    orphans = sum(1 for l in range(L) for e in range(E) if wider.holders(l, e) == [2])
    assert narrower.weight_loads >= orphans


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="loads must be 2-D"):
        plan(np.ones(8), 2, 4)
    with pytest.raises(ValueError, match="finite and >= 0"):
        plan(-np.ones((1, 8)), 2, 4)
    with pytest.raises(ValueError, match="finite and >= 0"):
        plan(np.full((1, 8), np.nan), 2, 4)
    with pytest.raises(ValueError, match="do not fit"):
        plan(np.ones((1, 9)), 2, 4)
    with pytest.raises(ValueError, match="num_groups must be an int >= 1"):
        plan(np.ones((1, 8)), 0, 4)
    with pytest.raises(ValueError, match="target_imbalance"):
        PlannerConfig(target_imbalance=0.9)


def test_deepseek_scale_plan_is_fast():
    """58 layers x 256 experts on 64 groups x 5 slots (DeepSeek-V3 shape). Measured on the
    2-core dev machine: ~75 ms from scratch (target 200 ms); the bound here is loose because
    shared machines are noisy: timing targets belong to benchmarks."""
    loads = zipf(np.random.default_rng(0), 58, 256)
    plan(loads[:2], 64, 5)  # warm-up
    times = []
    for _ in range(3):
        start = time.perf_counter()
        p = plan(loads, 64, 5)
        times.append(time.perf_counter() - start)
    assert sorted(times)[1] < 2.0
    assert p.layer_imbalance(loads).max() <= 1.05
