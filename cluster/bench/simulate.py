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

Capacity: a forward pass carries tokens_per_gpu * G tokens; layer l takes attention_us (the
routers' attention, norms and gate) plus its busiest GPU's (token, expert) pairs * pair_s +
layer_overhead_us, where pair_s = 3 * 2 * H * F FLOPs / (peak_tflops * mfu); capacity = tokens per
pass / sum over layers of that. With two micro-batches in flight a layer takes the larger of the
two parts instead of their sum (reported beside it, per GPU). Served = min(offered, capacity).
Shared experts and all-to-all transfer time are not modelled (the overhead stands in for launch
and RPC); the group count is fixed.

This module prints (header, table, summary) and is the CLI (add_arguments, run); the model is
in sim_config.py (SimConfig, capacity), sim_trace.py (the trace) and sim_loop.py (every step).
"""
from __future__ import annotations

import json
import sys

from cluster.bench.sim_config import GPUS_RANGE, SimConfig
from cluster.bench.sim_loop import simulate
from cluster.bench.sim_trace import zipf_weights
from cluster.control.autoscaler import REBALANCE

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
        f"busiest GPU after the routers' {c.attention_us:g} us of attention per layer (overlapped with two "
        f"micro-batches: the larger of the two); balanced {c.balanced_capacity / 1e3:.1f}k tokens/s; shared "
        "experts, all-to-all not modelled",
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
        f"  per GPU          elastic {s['tokens_per_s_per_gpu'] / 1e3:.2f}k tokens/s; with two micro-batches in "
        f"flight (expert stage overlapped with the routers' {c['attention_us']:g} us of attention per layer) "
        f"{s['tokens_per_s_per_gpu_overlap'] / 1e3:.2f}k: "
        f"{s['tokens_per_s_per_gpu_overlap'] / s['tokens_per_s_per_gpu']:.2f}x",
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
        "attention_us": "the routers' part of a layer per pass (attention, norms, gate); two micro-batches "
                        "overlap it with the expert stage",
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
