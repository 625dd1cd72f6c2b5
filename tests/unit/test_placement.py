"""The placement planner (cluster/placement/planner.py): hard rules on random and adversarial loads
(hypothesis), balance on Zipf loads, never worse than the EPLB greedy baseline (written here
from its description, as the slow obvious reference), migration awareness, input errors and
scale. Pure numpy: no cluster, no clock (speed is measured by moectl simulate, not asserted here)."""
from __future__ import annotations

import heapq

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.placement.layout import Placement, PlacementError, PlannerConfig
from cluster.placement.planner import plan, round_robin

CONFIG = PlannerConfig()
TARGET = CONFIG.target_imbalance


def zipf(rng, L: int, E: int, a: float = 1.2) -> np.ndarray:
    """loads[l, e] proportional to 1/rank^a, a random permutation per layer."""
    out = np.zeros((L, E))
    for l in range(L):
        out[l, rng.permutation(E)] = 1000.0 / np.arange(1, E + 1) ** a
    return out


def eplb_baseline(w: np.ndarray, budget: int, G: int, S: int) -> float:
    """One layer, the reference greedy: replicate the heaviest load-per-replica expert (ties:
    lowest id; at most G replicas) up to `budget` replicas; pack replicas (load w_e / r_e)
    heaviest first (ties: expert id) onto the least-loaded group (ties: lowest id) with a free
    slot lacking the expert; even shares. Returns max/mean group load."""
    E = len(w)
    r = [1] * E
    heap = [(-w[e], e) for e in range(E) if G > 1]
    heapq.heapify(heap)
    for _ in range(budget - E):
        if not heap:
            break
        _, e = heapq.heappop(heap)
        r[e] += 1
        if r[e] < G:
            heapq.heappush(heap, (-w[e] / r[e], e))
    items = sorted(((w[e] / r[e], e) for e in range(E) for _ in range(r[e])), key=lambda t: (-t[0], t[1]))
    load, held = [0.0] * G, [set() for _ in range(G)]
    for per, e in items:
        options = [g for g in range(G) if len(held[g]) < S and e not in held[g]]
        if options:
            g = min(options, key=lambda g: (load[g], g))
            held[g].add(e)
            load[g] += per
    mean = sum(load) / G
    return max(load) / mean if mean > 0 else 1.0


def check_rules(p: Placement, E: int, G: int, S: int) -> None:
    """Every expert of every layer has a replica, no group holds one twice, at most S per group
    (the shape), shares >= 0 summing to 1 per expert (1e-9), 0 on empty slots."""
    assert p.slots.shape[1:] == (G, S) and p.shares.shape == p.slots.shape
    p.validate(E)
    assert (p.shares >= 0).all() and (p.shares[p.slots < 0] == 0).all()
    assert (p.replica_counts(E) >= 1).all()


def adversarial(kind: str, rng, L: int, E: int) -> np.ndarray:
    return {"zipf": lambda: zipf(rng, L, E),
            "zeros": lambda: np.zeros((L, E)),
            "one-hot": lambda: np.eye(E)[rng.integers(0, E, L)] * 1e6,
            "equal": lambda: np.ones((L, E)),
            "range": lambda: 10.0 ** rng.uniform(-9, 12, (L, E)),  # 21 decades
            "sparse": lambda: rng.uniform(0, 1, (L, E)) * (rng.uniform(0, 1, (L, E)) < 0.2)}[kind]()


@settings(max_examples=80, deadline=None)
@given(kind=st.sampled_from(["zipf", "zeros", "one-hot", "equal", "range", "sparse"]), L=st.integers(1, 3),
       G=st.integers(1, 5), S=st.integers(1, 4), fill=st.sampled_from(["exact", "any"]), seed=st.integers(0, 2**16))
def test_hard_rules_hold_on_any_load(kind, L, G, S, fill, seed):
    rng = np.random.default_rng(seed)
    E = G * S if fill == "exact" else int(rng.integers(1, G * S + 1))  # E == G*S: no spare slot at all
    loads = adversarial(kind, rng, L, E)
    p = plan(loads, G, S)
    check_rules(p, E, G, S)
    assert p.weight_loads == int((p.slots >= 0).sum())
    assert p.expected_imbalance == pytest.approx(p.imbalance(loads))
    drifted = adversarial(kind, rng, L, E) if rng.uniform() < 0.5 else loads * rng.uniform(0.5, 2.0, loads.shape)
    q = plan(drifted, G, S, current=p)
    check_rules(q, E, G, S)
    assert q.weight_loads == q.moves(p)[0]
    if E <= (G - 1) * S:  # the last group removed
        check_rules(plan(drifted, G - 1, S, current=q), E, G - 1, S)
    check_rules(plan(drifted, G + 1, S, current=q), E, G + 1, S)  # a group added
    if E <= G * (S + 1):
        check_rules(plan(drifted, G, S + 1, current=q), E, G, S + 1)  # more slots per group


@settings(max_examples=60, deadline=None)
@given(L=st.integers(1, 2), G=st.integers(1, 6), S=st.integers(1, 5), a=st.floats(0.0, 2.5), seed=st.integers(0, 2**16))
def test_never_worse_than_eplb_on_random_loads(L, G, S, a, seed):
    """Any spare (none included), any skew: (a) no worse than the baseline with as many
    replicas as the plan uses; (b) no worse than the baseline filling every slot, or target."""
    rng = np.random.default_rng(seed)
    E = int(rng.integers(1, G * S + 1))
    loads = zipf(rng, L, E, a) * rng.uniform(0.5, 1.5, (L, E))
    p = plan(loads, G, S)
    mine = p.layer_imbalance(loads)
    for l in range(L):
        used = int((p.slots[l] >= 0).sum())
        assert mine[l] <= eplb_baseline(loads[l], used, G, S) + 1e-9
        assert mine[l] <= max(eplb_baseline(loads[l], G * S, G, S), TARGET) + 1e-9


@pytest.mark.parametrize("L,E,G,S", [(4, 8, 2, 5), (3, 64, 8, 10), (2, 256, 64, 5), (3, 60, 6, 13), (3, 64, 64, 2)])
def test_zipf_balance_and_never_worse_than_eplb(L, E, G, S):
    assert G * S >= 1.25 * E  # at least 25% spare slots
    rng = np.random.default_rng(7)
    for _ in range(2):
        loads = zipf(rng, L, E)
        p = plan(loads, G, S)
        check_rules(p, E, G, S)
        mine = p.layer_imbalance(loads)
        assert mine.max() <= TARGET, mine
        for l in range(L):
            used = int((p.slots[l] >= 0).sum())
            assert mine[l] <= eplb_baseline(loads[l], used, G, S) + 1e-9  # the same replica budget
            assert mine[l] <= max(eplb_baseline(loads[l], G * S, G, S), TARGET) + 1e-9  # every slot
        assert (p.slots >= 0).sum() < L * G * S  # the target met, it stops adding replicas


def test_uneven_shares_bridge_what_even_shares_cannot():
    """Two groups, expert 0 on both: even shares leave 3 vs 1; the bridge carries the split."""
    slots = np.array([[[0, 1], [0, -1]]])
    loads = np.array([[2.0, 2.0]])
    even = Placement(slots, np.array([[[0.5, 1.0], [0.5, 0.0]]]))
    assert even.layer_imbalance(loads)[0] == pytest.approx(1.5)
    p = plan(loads, 2, 2)
    assert p.layer_imbalance(loads)[0] <= 1.0 + 1e-3


def test_imbalance_helpers():
    slots = np.array([[[0, 1], [2, -1]], [[0, -1], [1, 2]]])
    shares = np.array([[[1.0, 1.0], [1.0, 0.0]], [[1.0, 0.0], [1.0, 1.0]]])
    p = Placement(slots, shares)
    loads = np.array([[1.0, 3.0, 2.0], [0.0, 0.0, 0.0]])
    assert p.group_loads(loads).tolist() == [[4.0, 2.0], [0.0, 0.0]]
    assert p.layer_imbalance(loads).tolist() == [4.0 / 3.0, 1.0]  # an idle layer counts as balanced
    assert p.imbalance(loads) == pytest.approx((4.0 + 0.0) / (3.0 + 0.0))  # weighed by load
    assert p.imbalance(np.zeros((2, 3))) == 1.0
    assert p.replica_counts(3).tolist() == [[1, 1, 1], [1, 1, 1]]
    assert p.holders(1, 2) == [1]
    other = Placement(np.array([[[0, 1], [2, 1]], [[0, 2], [1, -1]]]), shares)
    # from other to p: layer 0 group 1 drops 1; layer 1 group 0 drops 2, group 1 loads 2
    assert p.moves(other) == (1, 2) and other.moves(p) == (2, 1)


@pytest.mark.parametrize("slots,shares,message", [
    ([[[0, -1], [-1, -1]]], [[[1.0, 0.0], [0.0, 0.0]]], "expert 1 of layer 0 has no replica"),
    ([[[0, 0], [1, -1]]], [[[0.5, 0.5], [1.0, 0.0]]], "layer 0 group 0 holds two replicas of expert 0"),
    ([[[0, 1], [0, -1]]], [[[0.5, 1.0], [0.6, 0.0]]], "expert 0 of layer 0 has shares that do not sum to 1"),
    ([[[0, 1], [-1, -1]]], [[[1.0, 1.0], [0.3, 0.0]]], "layer 0 group 1 slot 0 has an empty slot"),
    ([[[0, 5], [-1, -1]]], [[[1.0, 1.0], [0.0, 0.0]]], "layer 0 group 0 slot 1 has an expert id outside"),
])
def test_validate_names_the_broken_rule(slots, shares, message):
    with pytest.raises(PlacementError, match=message):
        Placement(np.array(slots), np.array(shares)).validate(2)


def test_round_robin_is_the_cluster_layout():
    p = round_robin(2, 10, 4, 3)  # expert e on group e % G, like PlacementTable.round_robin
    check_rules(p, 10, 4, 3)
    assert all(p.holders(l, e) == [e % 4] for l in range(2) for e in range(10))
    assert p.weight_loads == 20 and p.expected_imbalance == pytest.approx(3 / 2.5)  # equal loads: 3,3,2,2


# ---- migration-aware ----------------------------------------------------------------------


def test_unchanged_loads_move_nothing():
    rng = np.random.default_rng(3)
    for L, E, G, S in [(4, 8, 2, 5), (4, 64, 8, 10), (2, 256, 64, 5)]:
        loads = zipf(rng, L, E)
        p = plan(loads, G, S)
        same = plan(loads, G, S, current=p)
        assert same.weight_loads == 0 and same.sets() == p.sets() and same.moves(p) == (0, 0)
        new_loads = zipf(rng, L, E)  # a plan made with current is a fixed point too
        moved = plan(new_loads, G, S, current=p)
        assert plan(new_loads, G, S, current=moved).moves(moved) == (0, 0)


@pytest.mark.parametrize("min_gain", [CONFIG.min_gain, 0.0])  # 0.0: the plan always applies
def test_small_drift_moves_little(min_gain):
    """10% drift (each load x uniform(0.9, 1.1)): replicas loaded plus replicas dropped are at
    most 10% of the filled slots (both count: a drop changes what routers see, if no weights)."""
    rng = np.random.default_rng(5)
    config = PlannerConfig(min_gain=min_gain)
    for L, E, G, S in [(6, 64, 8, 10), (4, 256, 64, 5)]:
        loads = zipf(rng, L, E)
        p = plan(loads, G, S)
        filled = int((p.slots >= 0).sum())
        for _ in range(2):
            drift = loads * rng.uniform(0.9, 1.1, loads.shape)
            q = plan(drift, G, S, current=p, config=config)
            loaded, dropped = q.moves(p)
            assert q.weight_loads == loaded
            assert loaded + dropped <= 0.10 * filled, (loaded, dropped, filled)
            assert q.imbalance(drift) <= p.imbalance(drift) + 1e-9


def test_gain_below_min_gain_keeps_the_current_sets():
    L, E, G, S = 1, 8, 2, 6
    start = round_robin(L, E, G, S)
    slight = np.ones((L, E))
    slight[0, 0] = 1.15  # group 0 carries 4.15 vs 4: imbalance 1.02; the best plan gains ~0.02
    q = plan(slight, G, S, current=start)
    assert q.weight_loads == 0 and q.sets() == start.sets()
    assert q.expected_imbalance == pytest.approx(start.imbalance(slight))
    hot = np.ones((L, E))
    hot[0, 0] = 8.0  # imbalance 1.47: worth a weight load at min_gain 0.05, not at 0.5
    assert plan(hot, G, S, current=start).weight_loads > 0
    assert plan(hot, G, S, current=start, config=PlannerConfig(min_gain=0.5)).sets() == start.sets()


def test_incremental_add_replicates_the_busiest_groups_expert_onto_the_lightest_group():
    L, E, G, S = 1, 8, 4, 3
    start = round_robin(L, E, G, S)  # group g holds experts g and g + 4
    loads = np.ones((L, E))
    loads[0, 0] = 4.0  # group 0 carries 5 vs 2, 2, 2
    p = plan(loads, G, S, current=start)
    assert p.layer_imbalance(loads).max() <= TARGET
    assert p.replica_counts(E)[0, 0] > 1  # the hot expert itself was replicated ...
    for g, held in enumerate(start.sets()[0]):
        assert held <= p.sets()[0][g]  # ... and nothing was reshuffled
    assert p.weight_loads == p.replica_counts(E)[0, 0] - 1


def test_hot_experts_gain_replicas_and_lose_them_when_the_skew_moves():
    L, E, G, S = 2, 8, 4, 4
    start = round_robin(L, E, G, S)  # group g holds experts g and g + 4
    hot_even = np.ones((L, E))
    hot_even[:, [0, 2]] = 30  # each above the mean group load (16.5): one group cannot carry it
    p = plan(hot_even, G, S, current=start)
    assert p.layer_imbalance(hot_even).max() <= TARGET
    counts = p.replica_counts(E)
    assert (counts[:, [0, 2]] > 1).all() and (counts[:, [1, 3, 4, 5, 6, 7]] == 1).all()

    hot_odd = np.ones((L, E))
    hot_odd[:, [1, 3]] = 30
    q = plan(hot_odd, G, S, current=p)
    counts = q.replica_counts(E)
    assert q.layer_imbalance(hot_odd).max() <= TARGET
    assert (counts[:, [1, 3]] > 1).all()  # the new hot experts gained replicas
    assert (counts[:, [0, 2]] == 1).all()  # the old ones lost theirs


def test_new_skew_at_scale_stays_balanced_and_mostly_incremental():
    rng = np.random.default_rng(11)
    L, E, G, S = 4, 256, 64, 5
    p = plan(zipf(rng, L, E), G, S)
    loads = zipf(rng, L, E)  # different hot experts
    q = plan(loads, G, S, current=p)
    check_rules(q, E, G, S)
    assert q.layer_imbalance(loads).max() <= TARGET + CONFIG.reshuffle_gain
    assert q.weight_loads < 0.5 * plan(loads, G, S).weight_loads  # far fewer than a fresh plan


def test_a_hot_expert_that_cools_down_ends_with_one_replica():
    L, E, G, S = 1, 16, 4, 6
    hot = np.ones((L, E))
    hot[0, 5] = 60  # a quarter of the groups' load each: needs all 4 groups
    p = plan(hot, G, S)
    assert p.replica_counts(E)[0, 5] == 4
    q = plan(np.ones((L, E)), G, S, current=p)
    assert q.replica_counts(E)[0, 5] == 1 and q.weight_loads == 0
    assert q.layer_imbalance(np.ones((L, E))).max() <= TARGET


def test_idle_layers_end_with_exactly_one_replica_per_expert():
    rng = np.random.default_rng(2)
    L, E, G, S = 3, 24, 4, 9
    p = plan(zipf(rng, L, E), G, S)
    assert p.replica_counts(E).max() > 1
    idle = plan(np.zeros((L, E)), G, S, current=p)
    assert (idle.replica_counts(E) == 1).all() and idle.weight_loads == 0
    assert all(new <= old for lo, ln in zip(p.sets(), idle.sets()) for old, new in zip(lo, ln))


def test_groups_added_and_removed():
    rng = np.random.default_rng(4)
    L, E, S = 3, 32, 8
    loads = zipf(rng, L, E)
    p = plan(loads, 6, S)
    wider = plan(loads, 7, S, current=p)  # the cluster added a group: it starts empty
    check_rules(wider, E, 7, S)
    assert wider.layer_imbalance(loads).max() <= TARGET  # ... and takes its share
    assert all(wider.sets()[l][6] for l in range(L))
    assert wider.weight_loads == wider.moves(p)[0] <= 0.25 * (p.slots >= 0).sum()

    narrower = plan(loads, 5, S, current=wider)  # ... then the last two went away
    check_rules(narrower, E, 5, S)
    assert narrower.layer_imbalance(loads).max() <= TARGET
    orphans = sum(1 for l in range(L) for e in range(E) if set(wider.holders(l, e)) <= {5, 6})
    assert narrower.weight_loads >= orphans > 0  # each orphan placed again is a weight load
    kept = [[s for s in layer[:5]] for layer in wider.sets()]
    assert narrower.weight_loads == sum(len(n - k) for nl, kl in zip(narrower.sets(), kept) for n, k in zip(nl, kl))


def test_current_with_more_slots_than_asked_is_trimmed():
    rng = np.random.default_rng(6)
    loads = zipf(rng, 2, 16)
    p = plan(loads, 4, 8)
    q = plan(loads, 4, 5, current=p)
    check_rules(q, 16, 4, 5)


# ---- errors and speed ---------------------------------------------------------------------


@pytest.mark.parametrize("args,message", [
    ((np.ones(8), 2, 4), "loads must be 2-D"),
    ((np.ones((0, 8)), 2, 4), "loads must be 2-D"),
    ((-np.ones((1, 8)), 2, 4), "finite and >= 0.*layer 0 expert 0"),
    ((np.full((1, 8), np.nan), 2, 4), "finite and >= 0"),
    ((np.full((1, 8), np.inf), 2, 4), "finite and >= 0"),
    (([["a"]], 1, 1), "array of numbers"),
    ((np.ones((1, 9)), 2, 4), "9 experts per layer do not fit.*2 \\* 4"),
    ((np.ones((1, 8)), 0, 4), "num_groups must be an int >= 1"),
    ((np.ones((1, 8)), 2.0, 4), "num_groups must be an int >= 1"),
    ((np.ones((1, 8)), 2, 0), "slots_per_group must be an int >= 1"),
])
def test_bad_input_is_a_clear_error(args, message):
    with pytest.raises(ValueError, match=message):
        plan(*args)


def test_bad_round_robin_is_a_clear_error():
    with pytest.raises(ValueError, match="num_layers must be an int >= 1"):
        round_robin(0, 8, 2, 4)
    with pytest.raises(ValueError, match="9 experts per layer do not fit"):
        round_robin(1, 9, 2, 4)


def test_bad_current_and_config_are_clear_errors():
    with pytest.raises(ValueError, match="current must be a Placement with 2 layers"):
        plan(np.ones((2, 4)), 2, 2, current=round_robin(3, 4, 2, 2))
    for field, value in [("target_imbalance", 0.9), ("min_gain", -1.0), ("share_step", 2.0),
                         ("share_iterations", -1), ("grow_rounds", 1.5), ("reshuffle_gain", float("nan"))]:
        with pytest.raises(ValueError, match=f"PlannerConfig.{field}"):
            PlannerConfig(**{field: value})


def test_deepseek_scale_plan_reaches_target_and_keeps_it_under_drift():
    """58 layers x 256 experts on 64 groups x 5 slots (DeepSeek-V3's shape), Zipf loads. How fast is
    measured where timing belongs, not on a shared CI box: `moectl simulate` prints the planner's
    wall time per call at these sizes (README: ~40 ms from scratch, ~250 ms after a 10% drift)."""
    rng = np.random.default_rng(0)
    loads = zipf(rng, 58, 256)
    drift = loads * rng.uniform(0.9, 1.1, loads.shape)
    p = plan(loads, 64, 5)
    again = plan(drift, 64, 5, current=p)
    assert again.layer_imbalance(drift).max() <= TARGET + 0.05
    assert p.layer_imbalance(loads).max() <= TARGET


# ---- DeepSeek's EPLB (global policy), written out as the reference ---------------------------

def eplb_replicate(w: np.ndarray, num_physical: int) -> np.ndarray:
    """EPLB's replicate_experts: one replica each, then num_physical - E more, each to the expert
    with the highest load per replica (argmax: lowest id on ties)."""
    count = np.ones(len(w), dtype=np.int64)
    for _ in range(num_physical - len(w)):
        count[int(np.argmax(w / count))] += 1
    return count


def eplb_pack(weights: np.ndarray, num_packs: int) -> np.ndarray:
    """EPLB's balanced_packing: items heaviest first, each onto the lightest pack holding fewer than
    n / num_packs items. It does not look at which expert an item is: two replicas of one expert
    can share a pack (the known bug)."""
    per_pack = len(weights) // num_packs
    load, count = np.zeros(num_packs), np.zeros(num_packs, dtype=np.int64)
    pack = np.empty(len(weights), dtype=np.int64)
    for i in np.argsort(-weights, kind="stable"):
        p = min((p for p in range(num_packs) if count[p] < per_pack), key=lambda p: load[p])
        pack[i], load[p], count[p] = p, load[p] + weights[i], count[p] + 1
    return pack


def eplb_global(w: np.ndarray, G: int, S: int) -> tuple[float, int]:
    """EPLB's global policy on one layer, every slot filled: (max/mean group load, duplicates placed)."""
    count = eplb_replicate(w, G * S)
    expert = np.repeat(np.arange(len(w)), count)
    per_replica = w[expert] / count[expert]
    pack = eplb_pack(per_replica, G)
    load = np.bincount(pack, weights=per_replica, minlength=G)
    duplicates = sum(int((pack == g).sum()) - len(set(expert[pack == g])) for g in range(G))
    return float(load.max() / load.mean()), duplicates


def test_the_planner_reaches_eplb_balance_without_its_duplicates():
    """Zipf(1.2) over 64 experts, 8 groups x 10 slots: EPLB's global policy fills all 80 slots and
    reaches ~1.001 max/mean, placing two replicas of one expert on one GPU in every layer. Asked for
    balance at any cost (target 1.0, like EPLB), the planner reaches it or better with no duplicate;
    at its default target (1.05) it stops earlier, with fewer replicas (fewer weight loads)."""
    rng = np.random.default_rng(12)
    loads = zipf(rng, 16, 64, a=1.2)
    eplb = [eplb_global(w, 8, 10) for w in loads]
    ours = plan(loads, 8, 10, config=PlannerConfig(target_imbalance=1.0))
    check_rules(ours, 64, 8, 10)
    assert sum(d for _, d in eplb) > 0  # the bug is real in the reference
    assert ours.layer_imbalance(loads).mean() <= np.mean([b for b, _ in eplb]) + 1e-6
    assert ours.layer_imbalance(loads).max() <= max(b for b, _ in eplb) + 1e-6
    default = plan(loads, 8, 10)
    assert default.layer_imbalance(loads).max() <= TARGET and (default.slots >= 0).sum() < (ours.slots >= 0).sum()
