"""`moectl bench skew`: the autoscaler under traffic skewed to one group's experts, side by side in one run.

    setup   Redis, Ray, the controller with G groups (round robin: expert e on group e % G),
            a router (engine, RemoteExperts, placement follower, telemetry) in this process
    skew    prompts made of the tokens whose routing lands most on group 0's experts
            (probed on the reference model with one-token prompts)
    A       autoscaler paused, skewed traffic:                 throughput, p99 inter-token latency ("before")
    flush   uniform traffic while the load window forgets the skew, then resume the autoscaler
    B       skew onset: skewed traffic again, autoscaler on:  time to a balanced placement, and p99
            inter-token latency while the rebalance runs against steady state
    C       skewed traffic on the balanced placement:        throughput, p99 inter-token latency ("after")

Each group is pinned to its own core with one torch thread (--pin-groups, --group-threads 1), as
a group owns its GPU in production: then an imbalance between groups leaves one core busy and the
other idle, which is what balancing recovers. On a 2-core machine the router shares the cores
with them. The gain is printed with its ceiling (imbalance before / after: what balance can buy
if the expert stage were the whole step) and the expert-stage time per MoE layer (the busiest
group's compute per layer call) before and after. The autoscaler runs with its defaults
(cluster/control/autoscaler_config.py) unless --autoscaler says otherwise. With --address, the same phases run against a service that is already up
(`make serve`): traffic goes through the client SDK, the autoscaler is paused and resumed
through Redis (the URL as for `moectl placement`), and `moectl placement show` in another
terminal shows the replicas appear. Traffic is --streams concurrent greedy streams, each looping over
prompts of --prompt-tokens tokens and --new-tokens new tokens.
"""
from __future__ import annotations

import dataclasses
import json
import time

from cluster.bench.skew_traffic import Load, hot_tokens


def add_arguments(p) -> None:
    p.add_argument("--checkpoint", default="checkpoints/demo-small", help="checkpoint (default: the demo one)")
    p.add_argument("--groups", type=int, default=2, help="expert groups (default 2)")
    p.add_argument("--streams", type=int, default=16, help="concurrent streams (default 16)")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--phase-s", type=float, default=20.0, help="length of the before/after phases (default 20)")
    p.add_argument("--hot-tokens", type=int, default=4,
                   help="distinct tokens in skewed prompts (default 4: the most skewed, imbalance ~1.8+)")
    p.add_argument("--timeout-s", type=float, default=60.0, help="give up waiting for balance after this long")
    p.add_argument("--group-threads", type=int, default=1,
                   help="torch threads per group (default 1: CPU groups behave like separate devices)")
    p.add_argument("--no-pin-groups", dest="pin_groups", action="store_false",
                   help="let groups run on any core (default: group i on core i)")
    p.add_argument("--json", default=None, metavar="FILE", help="write the figures there as JSON")
    p.add_argument("--autoscaler", action="append", default=[], metavar="KEY=VALUE",
                   help="an AutoscalerConfig setting, repeatable (default: the defaults)")
    p.add_argument("--router", action="append", default=[], metavar="KEY=VALUE",
                   help="a RouterConfig setting, repeatable (e.g. whole_expert_below=8)")
    p.add_argument("--address", default=None,
                   help="drive a running service (HOST:PORT) through the SDK instead of starting a cluster")
    from cluster.deploy.connect import add_redis_arguments

    add_redis_arguments(p)


def run(args) -> int:
    from cluster.bench.local_cluster import LocalCluster
    from cluster.checkpoint.reader import Checkpoint
    from cluster.control.autoscaler_config import AutoscalerConfig
    from cluster.deploy.serve_cmd import parse_settings
    from router_service.model.reference import ReferenceModel

    settings = AutoscalerConfig.from_dict({"metrics_port": None, **parse_settings(args.autoscaler)})
    if args.address:
        return _against_service(args, settings)
    spec = Checkpoint(args.checkpoint).spec
    reference = ReferenceModel.from_pretrained(args.checkpoint)
    group0 = {e for e in range(spec.num_experts) if e % args.groups == 0}
    hot = hot_tokens(reference, group0, args.hot_tokens)
    del reference
    uniform = list(range(2, spec.vocab_size))
    print(f"{spec.family} {args.checkpoint}: {args.groups} groups, {args.streams} streams x {args.new_tokens} new "
          f"tokens, prompts of {args.prompt_tokens}; skew: {len(hot)} tokens routed mostly to group 0's experts "
          f"{sorted(group0)}; torch threads per group: {args.group_threads or 'default'}")

    load = None
    with LocalCluster(args.checkpoint, args.groups, autoscaler=dataclasses.asdict(settings),
                      router={"max_new_tokens": args.new_tokens, **parse_settings(args.router)},
                      group_threads=args.group_threads,
                      name=f"bench-skew-{int(time.time())}", pin_groups=args.pin_groups) as cluster:
        cluster.state.set_paused(True)
        try:
            mode = {"tokens": hot}
            load = Load(_engine_generate(cluster.router.engine),
                         lambda rng: [rng.choice(mode["tokens"]) for _ in range(args.prompt_tokens)],
                         args.streams, args.new_tokens)
            return _phases(args, settings, cluster.state, load, mode, hot, uniform,
                           _ExpertStage(cluster.router, len(cluster.spec.sparse_layers)))
        finally:
            if load is not None:
                load.stop()


def _engine_generate(engine):
    from router_service.model.sampling import SamplingParams

    def generate(prompt, new_tokens, emit):
        engine.submit(prompt, SamplingParams(max_tokens=new_tokens),
                      lambda event: emit(event.error is not None, event.finish_reason is not None))

    return generate


def _against_service(args, settings) -> int:
    """The phases against a running service: SDK traffic, pause/resume through Redis."""
    from cluster.checkpoint.reader import Checkpoint
    from cluster.deploy.connect import redis_url
    from cluster.state.store import ClusterState
    from router_service.client import MoEClient, MoEError
    from router_service.model.reference import ReferenceModel

    state = ClusterState(redis_url(args), args.namespace)
    table = state.load_placement()
    if table is None:
        raise ValueError(f"no placement in {state.url_for_logs}: is the service at {args.address} running?")
    spec = Checkpoint(args.checkpoint).spec
    reference = ReferenceModel.from_pretrained(args.checkpoint)
    group0 = {e for (l, e), gs in table.replicas.items() if 0 in gs}
    hot = hot_tokens(reference, group0, args.hot_tokens)
    del reference
    uniform = list(range(2, spec.vocab_size))
    print(f"{args.address}: {len(table.groups)} groups, placement v{table.version}; {args.streams} streams x "
          f"{args.new_tokens} new tokens; skew: {len(hot)} tokens routed mostly to group 0's experts")
    client = MoEClient(args.address, timeout_s=120)

    def generate(prompt, new_tokens, emit):
        try:
            for chunk in client.stream(prompt, max_tokens=new_tokens):
                for _ in chunk.token_ids:
                    emit(False, False)
            emit(False, True)
        except MoEError:
            emit(True, True)

    was_paused = state.paused()
    state.set_paused(True)  # before any skewed traffic: phase A is the static placement
    mode = {"tokens": hot}
    load = Load(generate, lambda rng: [rng.choice(mode["tokens"]) for _ in range(args.prompt_tokens)],
                 args.streams, args.new_tokens)
    try:
        return _phases(args, settings, state, load, mode, hot, uniform)
    finally:
        load.stop()
        state.set_paused(was_paused)
        client.close()
        state.close()


class _ExpertStage:
    """The busiest group's compute per MoE layer call over a phase (groups' Stats busy_s deltas)."""

    def __init__(self, router, moe_layers: int):
        self.router, self.moe_layers = router, moe_layers

    def mark(self):
        stats = self.router.experts.group_stats(5.0)
        return self.router.engine.steps, {a: s.busy_s for a, s in stats.items() if s is not None}

    def per_layer_s(self, start, end) -> float:
        calls = (end[0] - start[0]) * self.moe_layers
        busy = [end[1][a] - start[1][a] for a in end[1] if a in start[1] and end[1][a] >= start[1][a]]
        return max(busy) / calls if calls and busy else float("nan")


def _measure(phase_s, load, stage: _ExpertStage | None, state, settings):
    """One phase: (tokens/s, p99 inter-token s, gaps), the expert stage's seconds per layer, imbalance."""
    start, mark = time.perf_counter(), stage.mark() if stage else None
    time.sleep(phase_s)
    window = load.window(start, time.perf_counter())
    return window, stage.per_layer_s(mark, stage.mark()) if stage else float("nan"), _imbalance(state, settings)


def _phases(args, settings, state, load, mode, hot, uniform, stage: _ExpertStage | None = None) -> int:
    """A (paused, skewed) -> flush (uniform) -> resume -> B (skew onset) -> C (autoscaled)."""
    time.sleep(3)  # warm-up
    before, stage_before, imbalance_before = _measure(args.phase_s, load, stage, state, settings)
    print(f"A before (static placement): {before[0]:.0f} tokens/s, p99 inter-token {before[1] * 1e3:.0f} ms "
          f"({before[2]} gaps); imbalance {imbalance_before:.2f}; expert stage {stage_before * 1e3:.1f} ms per layer")

    mode["tokens"] = uniform
    time.sleep(settings.window_s + 2)  # the window forgets the skew
    state.set_paused(False)
    time.sleep(2)
    version0 = state.placement_version()
    mode["tokens"] = hot
    onset, onset_wall = time.perf_counter(), time.time()
    balanced_at, rebalance = None, None
    while time.perf_counter() - onset < args.timeout_s:
        status = state.autoscaler_status() or {}
        last = status.get("last_rebalance") or {}
        if last.get("to_version", 0) > version0 and last.get("result") == "finished":
            rebalance = last
            if (status.get("imbalance") or 9) <= settings.imbalance_threshold:
                balanced_at = time.perf_counter()
                break
        time.sleep(0.1)
    if balanced_at is None:
        print(f"B no balanced placement within {args.timeout_s} s of skew onset (last: {rebalance})")
    else:
        print(f"B skew onset -> balanced placement: {balanced_at - onset:.1f} s (target <= 10 s); rebalance "
              f"v{rebalance['from_version']} -> v{rebalance['to_version']} took {rebalance['seconds']:.2f} s, "
              f"{rebalance['weights_loaded']} weight load(s)")
    after, stage_after, imbalance_after = _measure(args.phase_s, load, stage, state, settings)
    print(f"C after (autoscaled): {after[0]:.0f} tokens/s, p99 inter-token {after[1] * 1e3:.0f} ms "
          f"({after[2]} gaps); imbalance {imbalance_after:.2f}; expert stage {stage_after * 1e3:.1f} ms per layer")
    gain, ceiling = after[0] / before[0], imbalance_before / imbalance_after
    print(f"throughput after / before = {gain:.2f}x (target >= 1.4x and >= 0.8 x the ceiling {ceiling:.2f}x = "
          f"imbalance before / after); expert stage per layer after / before = {stage_after / stage_before:.2f}; "
          f"p99 inter-token after / before = {after[1] / before[1]:.2f}")
    report = {"before": {"tokens_per_s": before[0], "p99_itl_s": before[1], "imbalance": imbalance_before,
                         "expert_stage_per_layer_s": stage_before},
              "after": {"tokens_per_s": after[0], "p99_itl_s": after[1], "imbalance": imbalance_after,
                        "expert_stage_per_layer_s": stage_after},
              "gain": gain, "ceiling": ceiling, "failed": load.failures,
              "onset_to_balanced_s": None if balanced_at is None else balanced_at - onset}
    if rebalance is not None:
        r0 = onset + (rebalance["started_at"] - onset_wall)
        during = load.window(r0, r0 + max(rebalance["seconds"], 0.5))
        print(f"p99 inter-token during the rebalance {during[1] * 1e3:.0f} ms ({during[2]} gaps) vs steady "
              f"state after {after[1] * 1e3:.0f} ms: {during[1] / after[1]:.2f}x (target <= 1.1x)")
        report["rebalance"] = {**rebalance, "p99_itl_during_s": during[1]}
    print(f"failed requests: {load.failures}")
    if getattr(args, "json", None):
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0 if load.failures == 0 else 1


def _imbalance(state, settings) -> float:
    time.sleep(settings.interval_s * 2)  # a fresh observation
    return (state.autoscaler_status() or {}).get("imbalance") or float("nan")
