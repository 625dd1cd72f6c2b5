"""`moectl simulate`'s time-step loop: the trace through the real Autoscaler.decide() and
planner on a modelled cluster (a fixed slot count, timed plan() calls), moves landing after
their weights load, imbalance and capacity of the elastic and the static placement measured
every step, and the run's summary numbers. Placements are [L, G, S] (L = MoE layers,
G = GPUs, one expert group each, S = slots per layer per GPU); loads [L, E] (E = experts).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from cluster.bench.sim_config import SimConfig
from cluster.bench.sim_trace import Trace
from cluster.control.autoscaler import HOLD, REBALANCE, Autoscaler, Observation
from cluster.placement.layout import Placement
from cluster.placement.planner import plan, round_robin
from cluster.placement.table import PlacementTable, TableShape


@dataclass
class _SimAutoscaler(Autoscaler):
    """Autoscaler.decide() unchanged; a modelled GPU has a fixed --slots (not ceil(E/G*(1+spare_slots)))
    and plan() calls are timed (the controller runs them inline, so their cost is real)."""

    fixed_slots: int = 1
    plan_wall_s: list = field(default_factory=list)

    def slots_per_group(self, num_groups: int) -> int:
        return self.fixed_slots

    def plan(self, loads, current, num_groups):
        start = time.perf_counter()
        out = super().plan(loads, current, num_groups)
        self.plan_wall_s.append(time.perf_counter() - start)
        return out


def _new_per_group(old: Placement, new: Placement) -> np.ndarray:
    """[G] replicas each GPU must load going from old to new."""
    a, b = old.sets(), new.sets()
    return np.array([sum(len(b[l][g] - a[l][g]) for l in range(len(b))) for g in range(new.slots.shape[1])])


@dataclass
class _Measure:
    """Imbalance and capacity of a placement under one epoch's p (they do not depend on the rate)."""

    config: SimConfig
    _memo: dict = field(default_factory=dict)

    def __call__(self, placement: Placement, epoch: int, p: np.ndarray) -> tuple[float, float]:
        key = (id(placement), epoch)
        if key not in self._memo:
            per_token = placement.group_loads(self.config.top_k * p)  # [L, G] pairs per token
            mean = per_token.mean(axis=1).sum()
            self._memo = {k: v for k, v in self._memo.items() if k[1] == epoch}
            peak = per_token.max(axis=1)
            self._memo[key] = (float(peak.sum() / mean), self.config.capacity(peak),
                               self.config.capacity(peak, overlap=True), placement)
        imbalance, capacity, overlapped, _ = self._memo[key]
        return imbalance, capacity, overlapped


def simulate(config: SimConfig, progress=None) -> dict:
    """Run the trace; returns {"config", "derived", "series", "rebalances", "summary"} (JSON-able).
    progress(str) gets a line on every rebalance and every ~10 s of wall time."""
    c = config
    wall0 = time.perf_counter()
    trace, measure = Trace(c), _Measure(c)
    spec = TableShape(tuple(range(c.layers)), c.experts)
    names = [f"gpu{g}" for g in range(c.gpus)]
    acfg = c.autoscaler_config()
    scaler = _SimAutoscaler(acfg, spec, None, last_change=-math.inf, fixed_slots=c.slots)
    table = PlacementTable.from_placement(round_robin(c.layers, c.experts, c.gpus, c.slots), spec,
                                     [f"10.0.{g // 256}.{g % 256}:50051" for g in range(c.gpus)], 1)
    elastic = table.to_placement(spec, c.slots)
    static = elastic if c.baseline == "round-robin" else \
        plan(c.top_k * trace.p(0), c.gpus, c.slots)
    window_n = max(1, int(round(acfg.window_s / c.dt_s)))
    window: list[np.ndarray] = []  # served pairs/s per step, the last window_n steps
    pending = None  # (ready_at, table, placement) of a move in flight
    next_round, since = 0.0, 0.0  # since: when the elastic placement took effect
    series, rebalances = [], []
    moved = gb = 0.0
    last_note = wall0
    for k in range(c.steps):
        t = k * c.dt_s
        epoch = trace.epoch(t)
        p = trace.p(epoch)
        offered = c.load * c.balanced_capacity * c.rate_fraction(t)
        action = ""
        if pending is None and acfg.enabled and t >= next_round - 1e-9:
            obs = _observe(t, window, acfg.window_s, names, elastic, c)
            decision = scaler.decide(obs, table)
            assert decision.action in (HOLD, REBALANCE), decision  # max_groups None: no group scaling
            next_round = t + acfg.interval_s
            if decision.action == REBALANCE:
                new_table = PlacementTable.from_placement(decision.placement, spec, table.groups, table.version + 1)
                new = new_table.to_placement(spec, c.slots)
                per_gpu = _new_per_group(elastic, new)
                load_s = float(per_gpu.max()) * c.expert_bytes / (c.link_gb_s * 1e9)
                pending = (t + load_s + c.drain_s, new_table, new)
                moved += int(per_gpu.sum())
                gb += per_gpu.sum() * c.expert_bytes / 1e9
                action = "rebalance"
                rebalances.append({"t": t, "ready_at": pending[0], "weights": int(per_gpu.sum()),
                                   "max_per_gpu": int(per_gpu.max()), "load_s": load_s,
                                   "observed_imbalance": obs.imbalance,
                                   "planned_imbalance": decision.placement.expected_imbalance,
                                   "plan_wall_s": scaler.plan_wall_s[-1], "reason": decision.reason})
                if progress:
                    progress(f"t={t:.0f} s: rebalance {len(rebalances)}, {int(per_gpu.sum())} weight loads, "
                             f"planned in {scaler.plan_wall_s[-1]:.1f} s wall")
        # the step [t, t + dt): the old placement until a move lands, the new one after
        imb_e, cap_e, ovl_e = measure(elastic, epoch, p)
        if pending is not None and pending[0] < t + c.dt_s:
            f = max(0.0, pending[0] - t) / c.dt_s
            scaler.changed(pending[0])
            since, table, elastic = pending[0], pending[1], pending[2]
            next_round = max(next_round, pending[0] + acfg.interval_s)
            pending = None
            imb_new, cap_new, ovl_new = measure(elastic, epoch, p)
            imb_e, cap_e = f * imb_e + (1 - f) * imb_new, f * cap_e + (1 - f) * cap_new
            ovl_e = f * ovl_e + (1 - f) * ovl_new
        imb_s, cap_s, _ = measure(static, epoch, p)
        end_imb, _, _ = measure(elastic, epoch, p)
        served_e = min(offered, cap_e)
        window = (window + [served_e * c.top_k * p])[-window_n:]
        series.append({"t": t, "offered": offered, "imbalance_static": imb_s, "imbalance_elastic": imb_e,
                       "capacity_static": cap_s, "capacity_elastic": cap_e, "capacity_elastic_overlap": ovl_e,
                       "served_static": min(offered, cap_s),
                       "served_elastic": served_e, "replicas": int((elastic.slots >= 0).sum()),
                       "weights_moved": int(moved), "gb_moved": gb, "action": action,
                       "end_imbalance": end_imb, "effective_since": since, "in_flight": pending is not None})
        if progress and time.perf_counter() - last_note > 10:
            last_note = time.perf_counter()
            progress(f"t={t:.0f}/{c.duration_s:.0f} s simulated, {last_note - wall0:.0f} s wall")
    return {"config": asdict(c), "derived": _derived(c), "series": series, "rebalances": rebalances,
            "summary": _summary(c, acfg, trace, series, rebalances, scaler.plan_wall_s,
                                time.perf_counter() - wall0)}


def _observe(t, window, window_s, names, current: Placement, c: SimConfig) -> Observation:
    """What Autoscaler.observe() would read from telemetry: served pairs/s over the trailing window
    (steps before t; fewer at the start), and busy fraction per GPU under the current placement
    (informational: with no group scaling decide() acts on imbalance and idleness only)."""
    loads = np.mean(window, axis=0) if window else np.zeros((c.layers, c.experts))  # [L, E] pairs/s
    pairs = int(loads.sum() * min(len(window) * c.dt_s, window_s))
    passes_s = loads.sum() / c.layers / c.top_k / c.pass_tokens
    busy = current.group_loads(loads).sum(axis=0) * c.pair_s + passes_s * c.layers * c.layer_overhead_us * 1e-6
    utilization = {name: float(min(1.0, b)) for name, b in zip(names, busy)}
    return Observation(t, loads, pairs, utilization, float(current.imbalance(loads)), current, loads)  # pairs alone


def _derived(c: SimConfig) -> dict:
    return {"pair_flops": c.pair_flops, "pair_us": c.pair_s * 1e6, "expert_mb": c.expert_bytes / 1e6,
            "expert_gb_per_gpu": c.slots * c.layers * c.expert_bytes / 1e9, "pass_tokens": c.pass_tokens,
            "balanced_capacity": c.balanced_capacity, "peak_offered": c.load * c.balanced_capacity}


def _summary(c, acfg, trace, series, rebalances, plan_wall, wall_s) -> dict:
    imb_s = np.array([r["imbalance_static"] for r in series])
    imb_e = np.array([r["imbalance_elastic"] for r in series])
    cap_s = np.array([r["capacity_static"] for r in series])
    cap_e = np.array([r["capacity_elastic"] for r in series])
    to_balance = []
    for shift in trace.shift_times():
        after = [r for r in series if shift <= r["t"] < shift + (c.shift_s or c.duration_s)]
        done = next((r for r in after if r["end_imbalance"] <= acfg.imbalance_threshold), None)
        to_balance.append({"shift_t": shift, "seconds": None if done is None else
                           max(0.0, done["effective_since"] - shift)})
    return {"steps": len(series), "imbalance_threshold": acfg.imbalance_threshold,
            "imbalance_static_mean": float(imb_s.mean()),
            "imbalance_static_p95": float(np.percentile(imb_s, 95)), "imbalance_elastic_mean": float(imb_e.mean()),
            "imbalance_elastic_p95": float(np.percentile(imb_e, 95)),
            "capacity_ratio_mean": float((cap_e / cap_s).mean()),
            # per GPU, elastic placement: the expert stage after the routers' part, or overlapped with it
            "tokens_per_s_per_gpu": float(cap_e.mean() / c.gpus),
            "tokens_per_s_per_gpu_overlap": float(np.mean([r["capacity_elastic_overlap"] for r in series]) / c.gpus),
            "served_static": float(sum(r["served_static"] for r in series) * c.dt_s),
            "served_elastic": float(sum(r["served_elastic"] for r in series) * c.dt_s),
            "offered": float(sum(r["offered"] for r in series) * c.dt_s),
            "weights_moved": series[-1]["weights_moved"] if series else 0,
            "gb_moved": series[-1]["gb_moved"] if series else 0.0, "rebalances": len(rebalances),
            "time_to_balance": to_balance, "plan_calls": len(plan_wall),
            "plan_wall_s_mean": float(np.mean(plan_wall)) if plan_wall else 0.0,
            "plan_wall_s_max": float(max(plan_wall)) if plan_wall else 0.0, "wall_s": wall_s}
