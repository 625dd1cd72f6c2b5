"""`moectl placement show|plan`, `moectl scale`, `moectl autoscaler pause|resume|status`.

They talk to Redis only (the placement, telemetry and autoscaler keys), so they work
from any machine that reaches Redis, without joining the Ray cluster. The Redis URL
comes from --redis-url, else $ELASTICMOE_REDIS_URL, else the file `moectl serve`
writes while it runs (SERVE_FILE, cluster/deploy/connect.py).
"""
from __future__ import annotations

import json
import math
import time

import numpy as np

from cluster.deploy.connect import add_redis_arguments, redis_url
from cluster.placement.table import TableShape

SHADES = " .:-=+*#%@"  # load heatmap: blank = no load, @ = the hottest expert


def _state(args):
    """The cluster's state, after one PING: an unreachable Redis, a wrong password or a TLS
    mismatch ends the command with a one-line RedisAccessError (no secret in it)."""
    from cluster.state.store import ClusterState

    state = ClusterState(redis_url(args), args.namespace)
    try:
        state.ping()
    except BaseException:
        state.close()
        raise
    return state


def _load(state, shape: TableShape, window_s: float, touch_cost: float = 0.0) -> np.ndarray:
    """[L, E] pairs/s over the last window_s seconds; with touch_cost, what the autoscaler would plan on:
    pairs + touch_cost * calls that touched the expert, per second."""
    from cluster.control.autoscaler import expert_cost
    from cluster.state.telemetry import Telemetry

    telemetry = Telemetry(state)
    _, cost = expert_cost(telemetry, shape, window_s, touch_cost, telemetry.server_time())
    return cost / window_s


def _table(state):
    table = state.load_placement()
    if table is None:
        raise ValueError(f"no placement in {state.url_for_logs} under namespace {state.namespace!r}: "
                         "is the cluster running?")
    return table


def cmd_show(args) -> int:
    from cluster.state.telemetry import Telemetry

    state = _state(args)
    table = _table(state)
    shape = TableShape.of(table)
    loads = _load(state, shape, args.window_s)
    groups = Telemetry(state).group_load(args.window_s)
    names = sorted(state.groups(), key=lambda n: int(n.rsplit("-", 1)[-1]) if n.rsplit("-", 1)[-1].isdigit() else 0)
    print(f"placement v{table.version}: {len(table.groups)} group(s), {len(shape.sparse_layers)} MoE layers x "
          f"{shape.num_experts} experts, load over the last {args.window_s:.0f} s")
    placement = table.to_placement(shape, 1)
    group_load = placement.group_loads(loads).sum(axis=0)
    mean = group_load.mean() if group_load.size else 0.0
    for g, address in enumerate(table.groups):
        name = names[g] if g < len(names) else f"group-{g}"
        busy = groups.get(name, {}).get("busy_s", 0.0) / args.window_s
        rel = group_load[g] / mean if mean > 0 else 0.0
        print(f"  {name:<32} {address:<22} {len(table.slots_of(g)):>4} slots  load {group_load[g]:9.1f} pairs/s "
              f"({rel:4.2f}x mean)  busy {busy:4.0%}")
    print(f"imbalance (max/mean group load): {placement.imbalance(loads):.2f}")
    counts = placement.replica_counts()
    print(_heatmap(loads, counts, shape.sparse_layers))
    return 0


def _heatmap(loads: np.ndarray, counts: np.ndarray, layers) -> str:
    """Two grids, layer x expert: load shade (blank .. @) and replica count (. = 1)."""
    top = loads.max() if loads.size else 0.0
    E = loads.shape[1]
    header = "".join(str(e % 10) for e in range(E))
    lines = [f"{'load':>10} {header}   replicas {header}"]
    for l, layer in enumerate(layers):
        shade = "".join(SHADES[min(len(SHADES) - 1, math.ceil(v / top * (len(SHADES) - 1)))] if top > 0 else " "
                        for v in loads[l])
        reps = "".join("." if c == 1 else (str(c) if c < 10 else "+") for c in counts[l])
        lines.append(f"{'layer ' + str(layer):>10} {shade}            {reps}")
    lines.append(f"{'':>10} shade: ' ' no load .. '@' = {top:.1f} pairs/s;  replicas: '.' = 1, digit = count")
    return "\n".join(lines)


def cmd_plan(args) -> int:
    """Dry run: what the planner would do with the current load. Changes nothing."""
    from cluster.control.autoscaler_config import AutoscalerConfig
    from cluster.placement.layout import PlannerConfig
    from cluster.placement.planner import plan

    state = _state(args)
    table = _table(state)
    shape = TableShape.of(table)
    cfg = AutoscalerConfig(spare_slots=args.spare_slots, touch_cost=args.touch_cost)
    G = args.groups or len(table.groups)
    S = cfg.slots_per_group(shape.num_experts, G)
    loads = _load(state, shape, args.window_s, cfg.touch_cost)
    current = table.to_placement(shape, S)
    start = time.perf_counter()
    new = plan(loads, G, S, current, PlannerConfig(target_imbalance=cfg.target_imbalance, min_gain=args.min_gain))
    ms = (time.perf_counter() - start) * 1000
    added, removed = new.moves(current)
    print(f"current v{table.version}: imbalance {current.imbalance(loads):.3f} on {len(table.groups)} group(s)")
    print(f"plan: imbalance {new.expected_imbalance:.3f} on {G} group(s) x {S} slots/layer; "
          f"{new.weight_loads} weight load(s), {removed} replica(s) dropped; planned in {ms:.1f} ms")
    for l, layer in enumerate(shape.sparse_layers):
        for e in range(shape.num_experts):
            before, after = sorted(current.holders(l, e)), sorted(new.holders(l, e))
            if before != after:
                print(f"  layer {layer} expert {e}: groups {before} -> {after}")
    return 0


def cmd_scale(args) -> int:
    state = _state(args)
    _table(state)
    request_id = state.push_request({"kind": "scale", "layer": args.layer, "expert": args.expert,
                                     "replicas": args.replicas})
    deadline = time.monotonic() + args.timeout_s
    while time.monotonic() < deadline:
        result = state.result(request_id)
        if result is not None:
            if not result.get("ok"):
                raise ValueError(result.get("error") or f"rebalance {result.get('result')}: {result.get('error')}")
            print(f"layer {args.layer} expert {args.expert}: {args.replicas} replica(s); "
                  f"placement v{result.get('to_version', result.get('version'))} ({result.get('result')}, "
                  f"{result.get('weights_loaded', 0)} weight load(s), {result.get('seconds', 0):.2f} s)")
            return 0
        time.sleep(0.2)
    raise ValueError(f"the controller did not answer within {args.timeout_s} s (is the cluster running?); "
                     f"request {request_id} stays queued")


def cmd_autoscaler(args) -> int:
    state = _state(args)
    if args.action in ("pause", "resume"):
        state.set_paused(args.action == "pause")
        print(f"autoscaler {'paused' if args.action == 'pause' else 'resumed'} (placement changes by "
              f"`moectl scale` still apply)")
        return 0
    status = state.autoscaler_status()
    if status is None:
        raise ValueError(f"no autoscaler status in {state.url_for_logs}: is the controller running?")
    print(json.dumps({**status, "paused": state.paused()}, indent=2))
    return 0


def add_commands(sub) -> None:
    placement = sub.add_parser("placement", help="the placement of a running cluster (reads Redis)")
    psub = placement.add_subparsers(dest="placement", required=True, metavar="ACTION")
    p = psub.add_parser("show", help="groups, their load, and a layer x expert heatmap of load and replicas")
    add_redis_arguments(p)
    p.add_argument("--window-s", type=float, default=10.0, help="load over the last this many seconds (default 10)")
    p.set_defaults(fn=cmd_show)
    p = psub.add_parser("plan", help="dry run: the plan for the current load, its balance and weights moved")
    add_redis_arguments(p)
    p.add_argument("--window-s", type=float, default=10.0, help="load window (default 10)")
    p.add_argument("--groups", type=int, default=None, help="plan for this many groups (default: as now)")
    p.add_argument("--spare-slots", type=float, default=0.5, help="as autoscaler.spare_slots (default 0.5)")
    p.add_argument("--min-gain", type=float, default=0.05, help="as autoscaler.min_gain (default 0.05)")
    p.add_argument("--touch-cost", type=float, default=0.0,
                   help="as autoscaler.touch_cost: plan on pairs + this x calls that touched each expert "
                        "(default 0: pairs alone)")
    p.set_defaults(fn=cmd_plan)

    p = sub.add_parser("scale", help="set the number of replicas of one expert (applied by the controller)")
    add_redis_arguments(p)
    p.add_argument("--layer", type=int, required=True, help="MoE layer index")
    p.add_argument("--expert", type=int, required=True, help="expert index in that layer")
    p.add_argument("--replicas", type=int, required=True, help="replicas wanted, in [1, groups]")
    p.add_argument("--timeout-s", type=float, default=120.0, help="wait this long for the result (default 120)")
    p.set_defaults(fn=cmd_scale)

    p = sub.add_parser("autoscaler", help="pause or resume the autoscaler, or show what it did last")
    add_redis_arguments(p)
    p.add_argument("action", choices=["pause", "resume", "status"])
    p.set_defaults(fn=cmd_autoscaler)
