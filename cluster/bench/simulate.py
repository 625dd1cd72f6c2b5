"""`moectl simulate`: a shifting-skew load trace through the real planner and the autoscaler's
decide(), on a modelled cluster of 64 to 256 GPUs. No Ray, Redis or GPU: numbers only.
Defaults: a DeepSeek-V3-like shape (58 MoE layers x 256 experts, top-8, H 7168, F 2048, bf16).

    every step [t, t + dt_s)
      trace    p [L, E]: each expert's share of its layer's (token, expert) pairs. Zipf(a) over a
               per-layer random ranking of the experts, capped at 1/top_k (a token picks an
               expert at most once), the excess spread over the rest; the ranking changes every
               shift_s (permute: a new random ranking; rotate: rank r's expert moves to r + rotate_by)
      rate     offered tokens/s = load * balanced capacity * diurnal(t), a cosine from 1 down to
               diurnal_low and back over diurnal_period_s
      decide   at t, every interval_s, unless a move is in flight (the controller awaits it):
               Observation(loads = served pairs/s over the trailing window_s, imbalance of the
               current placement under them) -> Autoscaler.decide() -> plan()
      move     a REBALANCE lands after its weights load (the GPU with the most new replicas *
               expert bytes / link_gb_s) plus drain_s; the old placement serves until then, and
               autoscaler.changed(landing time) starts the cooldown, as the controller does
      measure  imbalance (max/mean group load, load-weighted over layers) and capacity of the
               elastic and of the static placement, time-weighted over the step

Capacity (expert FFN only): a forward pass carries tokens_per_gpu * G tokens; layer l takes its
busiest GPU's (token, expert) pairs * pair_s + layer_overhead_us, where pair_s = 3 * 2 * H * F
FLOPs / (peak_tflops * mfu); capacity = tokens per pass / sum over layers of that. Served =
min(offered, capacity). Attention, dense layers, shared experts and all-to-all transfer time are
not modelled (the overhead stands in for launch and RPC); the group count is fixed.
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from cluster.control.autoscaler import HOLD, REBALANCE, Autoscaler, Observation
from cluster.control.autoscaler_config import AutoscalerConfig
from cluster.placement.layout import Placement
from cluster.placement.planner import plan, round_robin
from cluster.placement.table import PlacementTable, TableShape

GPUS_RANGE = (64, 256)


@dataclass(frozen=True)
class SimConfig:
    """Every modelling assumption, one field per flag; errors name the flag."""

    gpus: int = 64  # expert groups, one GPU each
    slots: int = 5  # expert slots per MoE layer per GPU
    layers: int = 58  # MoE layers (DeepSeek-V3: 58 of 61)
    experts: int = 256  # routed experts per layer
    top_k: int = 8
    hidden: int = 7168
    expert_ffn: int = 2048  # moe_intermediate_size
    dtype_bytes: int = 2  # bf16 weights
    duration_s: float = 600.0
    dt_s: float = 1.0
    shift_s: float = 120.0  # the hot set changes this often; 0 = never
    shift_mode: str = "permute"
    rotate_by: int = 32
    zipf: float = 1.2  # 0 = uniform
    seed: int = 0
    load: float = 0.8  # peak offered tokens/s / capacity of a perfectly balanced cluster
    diurnal_period_s: float = 600.0  # 0 = a flat rate
    diurnal_low: float = 0.5  # lowest rate / peak rate
    peak_tflops: float = 989.0  # H100 SXM dense bf16
    mfu: float = 0.4
    layer_overhead_us: float = 50.0  # per layer per pass: kernel launch + RPC
    tokens_per_gpu: int = 256  # tokens per forward pass per GPU (decode batch)
    link_gb_s: float = 25.0  # host -> GPU (or network) per GPU, GB/s
    drain_s: float = 0.5  # publish + routers leaving the old placement, after the weights load
    baseline: str = "round-robin"  # the static placement: round-robin or initial-plan
    autoscaler: dict = field(default_factory=dict)  # AutoscalerConfig overrides

    def __post_init__(self):
        lo, hi = GPUS_RANGE
        _int("--gpus", self.gpus, lo, hi)
        for flag, v in (("--slots", self.slots), ("--layers", self.layers), ("--experts", self.experts),
                        ("--hidden", self.hidden), ("--expert-ffn", self.expert_ffn),
                        ("--dtype-bytes", self.dtype_bytes), ("--tokens-per-gpu", self.tokens_per_gpu)):
            _int(flag, v, 1)
        _int("--top-k", self.top_k, 1, self.experts)
        _int("--rotate-by", self.rotate_by, 0)
        _int("--seed", self.seed, 0)
        if self.experts > self.gpus * self.slots:
            raise ValueError(f"--experts {self.experts} do not fit in --gpus * --slots = {self.gpus} * {self.slots} "
                             f"= {self.gpus * self.slots} slots per layer: raise --slots to at least "
                             f"{math.ceil(self.experts / self.gpus)}")
        for flag, v in (("--duration-s", self.duration_s), ("--dt-s", self.dt_s), ("--peak-tflops", self.peak_tflops),
                        ("--link-gb-s", self.link_gb_s), ("--load", self.load)):
            _number(flag, v, 0, strict=True)
        for flag, v in (("--shift-s", self.shift_s), ("--zipf", self.zipf), ("--drain-s", self.drain_s),
                        ("--diurnal-period-s", self.diurnal_period_s), ("--layer-overhead-us", self.layer_overhead_us)):
            _number(flag, v, 0)
        _number("--mfu", self.mfu, 0, 1, strict=True)
        _number("--diurnal-low", self.diurnal_low, 0, 1)
        if self.shift_mode not in ("permute", "rotate"):
            raise ValueError(f"--shift-mode must be permute or rotate, got {self.shift_mode!r}")
        if self.baseline not in ("round-robin", "initial-plan"):
            raise ValueError(f"--baseline must be round-robin or initial-plan, got {self.baseline!r}")
        if self.duration_s / self.dt_s > 1_000_000:
            raise ValueError(f"--duration-s / --dt-s = {self.duration_s / self.dt_s:.0f} steps: at most 1000000")
        for key in ("min_groups", "max_groups"):
            if key in self.autoscaler:
                raise ValueError(f"--autoscaler {key}: group scaling is not modelled; --gpus fixes the group count")
        self.autoscaler_config()  # bad --autoscaler settings fail here, naming the key

    def autoscaler_config(self) -> AutoscalerConfig:
        return AutoscalerConfig.from_dict({"metrics_port": None, **self.autoscaler})  # max_groups None: fixed G

    @property
    def steps(self) -> int:
        return int(round(self.duration_s / self.dt_s))

    # ---- derived constants (the header prints each) ----------------------------------------

    @property
    def pair_flops(self) -> float:  # gate, up, down projections: 3 matmuls of 2 * H * F FLOPs per (token, expert)
        return 3 * 2 * self.hidden * self.expert_ffn

    @property
    def pair_s(self) -> float:
        return self.pair_flops / (self.peak_tflops * 1e12 * self.mfu)

    @property
    def expert_bytes(self) -> int:  # one expert of one layer: 3 matrices of H x F
        return 3 * self.hidden * self.expert_ffn * self.dtype_bytes

    @property
    def pass_tokens(self) -> int:
        return self.tokens_per_gpu * self.gpus

    def capacity(self, max_pairs_per_token: np.ndarray) -> float:
        """Tokens/s of the cluster when layer l's busiest GPU gets max_pairs_per_token[l] pairs per token."""
        pass_s = float((self.pass_tokens * max_pairs_per_token * self.pair_s).sum()) + \
            self.layers * self.layer_overhead_us * 1e-6
        return self.pass_tokens / pass_s

    @property
    def balanced_capacity(self) -> float:
        return self.capacity(np.full(self.layers, self.top_k / self.gpus))

    def rate_fraction(self, t: float) -> float:
        """Offered rate / peak at time t: 1 at t = 0, diurnal_low half a period later."""
        if self.diurnal_period_s == 0:
            return 1.0
        return 1.0 - (1.0 - self.diurnal_low) * 0.5 * (1.0 - math.cos(2 * math.pi * t / self.diurnal_period_s))


# ---- trace --------------------------------------------------------------------------------


def zipf_weights(num_experts: int, a: float, top_k: int) -> np.ndarray:
    """[E] by rank: r^-a normalised, capped at 1/top_k with the excess spread over the rest in
    proportion (a token picks an expert at most once, so no expert gets more than 1/top_k of the pairs)."""
    w = np.arange(1, num_experts + 1, dtype=np.float64) ** -a
    w /= w.sum()
    cap = 1.0 / top_k
    while (w > cap + 1e-15).any():
        over = w >= cap
        excess = (w[over] - cap).sum()
        w[over] = cap
        w[~over] += excess * w[~over] / w[~over].sum()
    return w


class Trace:
    """Deterministic in (config fields, seed): the same epoch always gives the same p."""

    def __init__(self, config: SimConfig):
        self.c = config
        self.weights = zipf_weights(config.experts, config.zipf, config.top_k)
        rng = np.random.default_rng([config.seed, 0])
        self._first = np.stack([rng.permutation(config.experts) for _ in range(config.layers)])  # [L, E] rank -> expert
        self._cache: dict[int, np.ndarray] = {}

    def epoch(self, t: float) -> int:
        return int(t // self.c.shift_s) if self.c.shift_s > 0 else 0

    def shift_times(self) -> list[float]:
        if self.c.shift_s == 0:
            return [0.0]
        return [k * self.c.shift_s for k in range(int(math.ceil(self.c.duration_s / self.c.shift_s)))]

    def ranking(self, epoch: int) -> np.ndarray:
        """[L, E] expert id at each popularity rank (rank 0 = hottest) in that epoch."""
        c = self.c
        if epoch == 0 or c.shift_mode == "rotate":  # rotate: rank r's expert moves to rank r + rotate_by
            return np.roll(self._first, epoch * c.rotate_by, axis=1)
        rng = np.random.default_rng([c.seed, epoch])
        return np.stack([rng.permutation(c.experts) for _ in range(c.layers)])

    def p(self, epoch: int) -> np.ndarray:
        """[L, E] share of each layer's (token, expert) pairs per expert (rows sum to 1)."""
        if epoch not in self._cache:
            p = np.empty((self.c.layers, self.c.experts))
            np.put_along_axis(p, self.ranking(epoch), np.broadcast_to(self.weights, p.shape), axis=1)
            self._cache = {epoch: p}  # epochs only move forward
        return self._cache[epoch]


# ---- the autoscaler, as deployed, on a modelled cluster -------------------------------------


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
            self._memo[key] = (float(per_token.max(axis=1).sum() / mean),
                               self.config.capacity(per_token.max(axis=1)), placement)
        imbalance, capacity, _ = self._memo[key]
        return imbalance, capacity


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
        imb_e, cap_e = measure(elastic, epoch, p)
        if pending is not None and pending[0] < t + c.dt_s:
            f = max(0.0, pending[0] - t) / c.dt_s
            scaler.changed(pending[0])
            since, table, elastic = pending[0], pending[1], pending[2]
            next_round = max(next_round, pending[0] + acfg.interval_s)
            pending = None
            imb_new, cap_new = measure(elastic, epoch, p)
            imb_e, cap_e = f * imb_e + (1 - f) * imb_new, f * cap_e + (1 - f) * cap_new
        imb_s, cap_s = measure(static, epoch, p)
        end_imb, _ = measure(elastic, epoch, p)
        served_e = min(offered, cap_e)
        window = (window + [served_e * c.top_k * p])[-window_n:]
        series.append({"t": t, "offered": offered, "imbalance_static": imb_s, "imbalance_elastic": imb_e,
                       "capacity_static": cap_s, "capacity_elastic": cap_e, "served_static": min(offered, cap_s),
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
    return Observation(t, loads, pairs, utilization, float(current.imbalance(loads)), current)


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
            "served_static": float(sum(r["served_static"] for r in series) * c.dt_s),
            "served_elastic": float(sum(r["served_elastic"] for r in series) * c.dt_s),
            "offered": float(sum(r["offered"] for r in series) * c.dt_s),
            "weights_moved": series[-1]["weights_moved"] if series else 0,
            "gb_moved": series[-1]["gb_moved"] if series else 0.0, "rebalances": len(rebalances),
            "time_to_balance": to_balance, "plan_calls": len(plan_wall),
            "plan_wall_s_mean": float(np.mean(plan_wall)) if plan_wall else 0.0,
            "plan_wall_s_max": float(max(plan_wall)) if plan_wall else 0.0, "wall_s": wall_s}


# ---- output -------------------------------------------------------------------------------


def header(c: SimConfig) -> str:
    a = c.autoscaler_config()
    w = zipf_weights(c.experts, c.zipf, c.top_k)
    shift = ("never" if c.shift_s == 0 else f"every {c.shift_s:g} s, " +
             ("a new random ranking per layer" if c.shift_mode == "permute" else
              f"the ranking rolls by {c.rotate_by} (the {c.rotate_by} coldest experts become the hottest)"))
    rate = ("flat" if c.diurnal_period_s == 0 else
            f"cosine from peak at t=0 to {c.diurnal_low:g} x peak at {c.diurnal_period_s / 2:g} s, "
            f"period {c.diurnal_period_s:g} s")
    overrides = ", ".join(f"{k}={v}" for k, v in c.autoscaler.items()) or "none"
    return "\n".join([
        "moectl simulate: a MODELLED cluster (numbers only, no GPU); every assumption is a flag",
        f"cluster     {c.gpus} GPUs (one expert group each) x {c.slots} expert slots per MoE layer; "
        "group count fixed (no group scaling)",
        f"model       {c.layers} MoE layers x {c.experts} experts, top-{c.top_k}, hidden {c.hidden}, "
        f"expert FFN {c.expert_ffn}, {c.dtype_bytes}-byte weights",
        f"trace       Zipf({c.zipf:g}) over a random per-layer ranking of experts, capped at 1/top_k "
        f"(the hottest expert gets {w[0]:.1%} of a layer's pairs, the {c.top_k} hottest {w[:c.top_k].sum():.1%}); "
        f"shifts {shift}; seed {c.seed}",
        f"rate        peak {c.load * c.balanced_capacity / 1e3:.1f}k tokens/s offered = {c.load:g} x balanced "
        f"capacity; {rate}",
        f"compute     3*2*H*F = {c.pair_flops / 1e6:.1f} MFLOP per (token, expert) at {c.peak_tflops:g} TFLOP/s x "
        f"MFU {c.mfu:g} = {c.pair_s * 1e6:.3f} us; + {c.layer_overhead_us:g} us per layer per pass (launch + RPC)",
        f"capacity    a pass = {c.tokens_per_gpu} tokens/GPU = {c.pass_tokens} tokens; a layer waits for its "
        f"busiest GPU; balanced {c.balanced_capacity / 1e3:.1f}k tokens/s; attention, dense layers, "
        "shared experts, all-to-all not modelled",
        f"moves       {c.expert_bytes / 1e6:.1f} MB per replica (3*H*F*{c.dtype_bytes} B); each GPU loads its new "
        f"replicas over its own {c.link_gb_s:g} GB/s link; a move lands after the slowest GPU + {c.drain_s:g} s "
        "drain, the old placement serving until then",
        f"memory      expert weights per GPU: {c.slots} x {c.layers} x {c.expert_bytes / 1e6:.1f} MB = "
        f"{c.slots * c.layers * c.expert_bytes / 1e9:.1f} GB",
        f"autoscaler  the real Autoscaler.decide() and planner; interval {a.interval_s:g} s, window {a.window_s:g} s, "
        f"threshold {a.imbalance_threshold:g}, target {a.target_imbalance:g}, min gain {a.min_gain:g}, sustain "
        f"{a.sustain_s:g} s, cooldown {a.cooldown_s:g} s (overrides: {overrides})",
        f"baseline    static {c.baseline} placement, never changed"
        + (" (expert e on GPU e % G)" if c.baseline == "round-robin" else " (planned for the t=0 trace)")
        + "; the elastic one starts from round-robin",
        f"time        {c.duration_s:g} s in steps of {c.dt_s:g} s",
    ])


def table(result: dict, every: int) -> str:
    rows = ["     t   offered   imbalance        capacity k tok/s   replicas  moved so far     events until next row",
            "     s   k tok/s   static  elastic  static   elastic   /expert   weights      GB"]
    series, n = result["series"], result["config"]["layers"] * result["config"]["experts"]
    shifts = {s["shift_t"] for s in result["summary"]["time_to_balance"]}
    for i in range(0, len(series), every):
        chunk = series[i:i + every]
        r = chunk[0]
        events = [f"shift at {s:g} s" for s in sorted(shifts) if chunk[0]["t"] <= s <= chunk[-1]["t"]]
        rebalances = sum(x["action"] == REBALANCE for x in chunk)
        events += [f"{rebalances} rebalance(s)"] if rebalances else []
        rows.append(f"{r['t']:>6.0f} {r['offered'] / 1e3:>9.1f} {r['imbalance_static']:>8.2f} "
                    f"{r['imbalance_elastic']:>8.2f} {r['capacity_static'] / 1e3:>7.1f} "
                    f"{r['capacity_elastic'] / 1e3:>9.1f} {r['replicas'] / n:>9.2f} {r['weights_moved']:>9d} "
                    f"{r['gb_moved']:>7.0f}     {', '.join(events)}")
    return "\n".join(rows)


def summary(result: dict) -> str:
    c, s = result["config"], result["summary"]
    balance = ", ".join(f"t={b['shift_t']:g}: " + ("not within the shift" if b["seconds"] is None else
                                                    f"{b['seconds']:.1f} s") for b in s["time_to_balance"])
    threshold = s["imbalance_threshold"]
    return "\n".join([
        f"summary ({c['duration_s']:g} s, {c['gpus']} GPUs x {c['slots']} slots, {c['layers']} x {c['experts']} "
        f"experts, top-{c['top_k']}, Zipf {c['zipf']:g}, shift every {c['shift_s']:g} s, seed {c['seed']})",
        f"  imbalance        static mean {s['imbalance_static_mean']:.2f}, p95 {s['imbalance_static_p95']:.2f}; "
        f"elastic mean {s['imbalance_elastic_mean']:.2f}, p95 {s['imbalance_elastic_p95']:.2f}",
        f"  capacity         elastic / static, mean over steps: {s['capacity_ratio_mean']:.2f}x",
        f"  served           static {s['served_static'] / s['offered']:.1%} of offered tokens, "
        f"elastic {s['served_elastic'] / s['offered']:.1%}",
        f"  weights moved    {s['weights_moved']} replicas, {s['gb_moved']:.1f} GB, in {s['rebalances']} rebalance(s)",
        f"  time to balance  (imbalance <= {threshold:g}) after each shift: {balance}",
        f"  planner          {s['plan_calls']} plan() call(s), mean {s['plan_wall_s_mean']:.1f} s, max "
        f"{s['plan_wall_s_max']:.1f} s wall on this host (not in simulated time; the controller plans inline)",
        f"  run              {s['wall_s']:.1f} s wall",
    ])


# ---- CLI ----------------------------------------------------------------------------------

_FLAGS = {f: f.replace("_", "-") for f in SimConfig.__dataclass_fields__ if f != "autoscaler"}


def add_arguments(p) -> None:
    d = SimConfig()
    lo, hi = GPUS_RANGE
    p.description = ("Replay a shifting-skew expert-load trace through the real planner and Autoscaler.decide() "
                     f"on a modelled cluster of {lo} to {hi} GPUs (no GPU used), and compare with a static "
                     "placement: imbalance over time, weights moved, capacity and served tokens. The header "
                     "printed first states every assumption; each is a flag below.")
    helps = {
        "gpus": f"modelled GPUs, one expert group each, in [{lo}, {hi}]",
        "slots": "expert slots per MoE layer per GPU; experts must fit in gpus * slots",
        "layers": "MoE layers (DeepSeek-V3: 58)", "experts": "routed experts per layer",
        "top_k": "experts per token per layer", "hidden": "hidden size H",
        "expert_ffn": "expert FFN (moe_intermediate) size F", "dtype_bytes": "bytes per weight (2 = bf16)",
        "duration_s": "simulated seconds", "dt_s": "simulated seconds per step",
        "shift_s": "the hot set changes this often (0 = never)",
        "shift_mode": "permute: a new random expert ranking per layer; rotate: the ranking rolls by --rotate-by",
        "rotate_by": "ranks the ranking rolls by per shift, with --shift-mode rotate",
        "zipf": "Zipf exponent of expert popularity (0 = uniform)", "seed": "trace seed; same seed, same run",
        "load": "peak offered tokens/s as a fraction of a perfectly balanced cluster's capacity",
        "diurnal_period_s": "period of the cosine rate curve (0 = flat rate)",
        "diurnal_low": "lowest rate of the curve as a fraction of the peak",
        "peak_tflops": "GPU peak dense TFLOP/s at the weight dtype (H100 SXM bf16: 989)",
        "mfu": "fraction of peak the expert matmuls reach",
        "layer_overhead_us": "fixed time per MoE layer per pass: kernel launch + RPC",
        "tokens_per_gpu": "tokens per forward pass per GPU (decode batch)",
        "link_gb_s": "GB/s each GPU loads expert weights at (host->GPU or network)",
        "drain_s": "seconds after the weights land until routers use the new placement",
        "baseline": "static placement to compare with: round-robin, or initial-plan (planned for t=0)",
    }
    choices = {"shift_mode": ["permute", "rotate"], "baseline": ["round-robin", "initial-plan"]}
    for name, flag in _FLAGS.items():
        default = getattr(d, name)
        p.add_argument(f"--{flag}", type=type(default), default=default, choices=choices.get(name),
                       help=f"{helps[name]} (default {default})")
    p.add_argument("--autoscaler", action="append", default=[], metavar="KEY=VALUE",
                   help="an AutoscalerConfig setting, repeatable (default: its defaults; group scaling, "
                        "min_groups/max_groups, is not modelled)")
    p.add_argument("--every", type=int, default=30, help="print a table row every N steps (default 30)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write config, series and summary as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def run(args) -> int:
    from cluster.deploy.serve_cmd import parse_settings

    if args.every < 1:
        raise ValueError(f"--every must be an int >= 1, got {args.every}")
    config = SimConfig(**{name: getattr(args, name) for name in _FLAGS}, autoscaler=parse_settings(args.autoscaler))
    print(header(config), flush=True)
    progress = None if args.quiet else (lambda line: print(f"simulate: {line}", file=sys.stderr, flush=True))
    result = simulate(config, progress)
    print()
    print(table(result, args.every))
    print()
    print(summary(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f)
        print(f"wrote {args.json}")
    return 0


def _int(flag: str, v, lo: int, hi: int | None = None) -> None:
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < lo or (hi is not None and v > hi):
        want = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{flag} must be an int {want}, got {v!r}")


def _number(flag: str, v, lo: float, hi: float | None = None, strict: bool = False) -> None:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and \
        (v > lo if strict else v >= lo) and (hi is None or v <= hi)
    if not ok:
        want = (f"> {lo:g}" if strict else f">= {lo:g}") + (f" and <= {hi:g}" if hi is not None else "")
        raise ValueError(f"{flag} must be a number {want}, got {v!r}")
