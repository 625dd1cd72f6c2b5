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

The autoscaler runs with its defaults (cluster/control/autoscaler_config.py) unless --autoscaler
says otherwise. With --address, the same phases run against a service that is already up
(`make serve`): traffic goes through the client SDK, the autoscaler is paused and resumed
through Redis (the URL as for `moectl placement`), and `moectl placement show` in another
terminal shows the replicas appear. Traffic is --streams concurrent greedy streams, each looping over
prompts of --prompt-tokens tokens and --new-tokens new tokens.
"""
from __future__ import annotations

import dataclasses
import random
import statistics
import threading
import time


def add_arguments(p) -> None:
    p.add_argument("--checkpoint", default="checkpoints/demo-small", help="checkpoint (default: the demo one)")
    p.add_argument("--groups", type=int, default=2, help="expert groups (default 2)")
    p.add_argument("--streams", type=int, default=16, help="concurrent streams (default 16)")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--phase-s", type=float, default=20.0, help="length of the before/after phases (default 20)")
    p.add_argument("--hot-tokens", type=int, default=16, help="distinct tokens in skewed prompts (default 16)")
    p.add_argument("--timeout-s", type=float, default=60.0, help="give up waiting for balance after this long")
    p.add_argument("--group-threads", type=int, default=None,
                   help="torch threads per group (default: torch's, every core); 1 makes CPU groups behave like "
                        "separate devices")
    p.add_argument("--autoscaler", action="append", default=[], metavar="KEY=VALUE",
                   help="an AutoscalerConfig setting, repeatable (default: the defaults)")
    p.add_argument("--address", default=None,
                   help="drive a running service (HOST:PORT) through the SDK instead of starting a cluster")
    from cluster.deploy.connect import add_redis_arguments

    add_redis_arguments(p)


class _Load:
    """Streams of greedy generation; token times recorded per stream. `generate(prompt, n, emit)`
    runs one request and calls emit(failed: bool, finished: bool) per token."""

    def __init__(self, generate, prompts_of, streams: int, new_tokens: int):
        self.generate, self.prompts_of, self.new_tokens = generate, prompts_of, new_tokens
        self.gaps: list[tuple[float, float]] = []  # (time the token came, seconds since the previous one)
        self.tokens: list[float] = []  # time of every token
        self.failures = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._stream, args=(i,), daemon=True) for i in range(streams)]
        for t in self._threads:
            t.start()

    def _stream(self, i: int) -> None:
        rng = random.Random(i)
        while not self._stop.is_set():
            done, times = threading.Event(), []

            def emit(failed: bool, finished: bool, times=times, done=done):
                if failed:
                    with self._lock:
                        self.failures += 1
                    done.set()
                    return
                times.append(time.perf_counter())
                if finished:
                    done.set()

            self.generate(self.prompts_of(rng), self.new_tokens, emit)
            done.wait(120)
            with self._lock:
                self.tokens.extend(times)
                self.gaps.extend((b, b - a) for a, b in zip(times, times[1:]))

    def window(self, start: float, end: float) -> tuple[float, float, int]:
        """(tokens/s, p99 inter-token seconds, gaps) for tokens that came in [start, end)."""
        with self._lock:
            n = sum(1 for t in self.tokens if start <= t < end)
            gaps = sorted(g for t, g in self.gaps if start <= t < end)
        p99 = gaps[min(len(gaps) - 1, int(0.99 * len(gaps)))] if gaps else float("nan")
        return n / (end - start), p99, len(gaps)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=120)


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
                      router={"max_new_tokens": args.new_tokens}, group_threads=args.group_threads,
                      name=f"bench-skew-{int(time.time())}") as cluster:
        cluster.state.set_paused(True)
        try:
            mode = {"tokens": hot}
            load = _Load(_engine_generate(cluster.router.engine),
                         lambda rng: [rng.choice(mode["tokens"]) for _ in range(args.prompt_tokens)],
                         args.streams, args.new_tokens)
            return _phases(args, settings, cluster.state, load, mode, hot, uniform)
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
    load = _Load(generate, lambda rng: [rng.choice(mode["tokens"]) for _ in range(args.prompt_tokens)],
                 args.streams, args.new_tokens)
    try:
        return _phases(args, settings, state, load, mode, hot, uniform)
    finally:
        load.stop()
        state.set_paused(was_paused)
        client.close()
        state.close()


def _phases(args, settings, state, load, mode, hot, uniform) -> int:
    """A (paused, skewed) -> flush (uniform) -> resume -> B (skew onset) -> C (autoscaled)."""
    time.sleep(3)  # warm-up
    a0 = time.perf_counter()
    time.sleep(args.phase_s)
    before = load.window(a0, time.perf_counter())
    imbalance_before = _imbalance(state, settings)
    print(f"A before (static placement): {before[0]:.0f} tokens/s, p99 inter-token {before[1] * 1e3:.0f} ms "
          f"({before[2]} gaps); imbalance {imbalance_before:.2f}")

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
    c0 = time.perf_counter()
    time.sleep(args.phase_s)
    after = load.window(c0, time.perf_counter())
    print(f"C after (autoscaled): {after[0]:.0f} tokens/s, p99 inter-token {after[1] * 1e3:.0f} ms "
          f"({after[2]} gaps); imbalance {_imbalance(state, settings):.2f}")
    print(f"throughput after / before = {after[0] / before[0]:.2f}x (target >= 1.4x); p99 inter-token "
          f"after / before = {after[1] / before[1]:.2f}")
    if rebalance is not None:
        r0 = onset + (rebalance["started_at"] - onset_wall)
        during = load.window(r0, r0 + max(rebalance["seconds"], 0.5))
        print(f"p99 inter-token during the rebalance {during[1] * 1e3:.0f} ms ({during[2]} gaps) vs steady "
              f"state after {after[1] * 1e3:.0f} ms: {during[1] / after[1]:.2f}x (target <= 1.25x)")
    print(f"failed requests: {load.failures}")
    return 0 if load.failures == 0 else 1


def _imbalance(state, settings) -> float:
    time.sleep(settings.interval_s * 2)  # a fresh observation
    return (state.autoscaler_status() or {}).get("imbalance") or float("nan")


def hot_tokens(reference, experts: set[int], count: int) -> list[int]:
    """The `count` tokens whose one-token routing lands most on `experts`, over all MoE layers."""
    import torch

    routed, inner = [], reference.experts

    def recording(layer, x, ids, weights):
        routed.append(ids.clone())
        return inner(layer, x, ids, weights)

    reference.experts = recording
    vocab = reference.spec.vocab_size
    for start in range(0, vocab, 1024):  # batches of one-token sequences
        reference(torch.arange(start, min(vocab, start + 1024))[:, None])
    reference.experts = inner
    per_layer = len(reference.spec.sparse_layers)
    wanted = torch.tensor(sorted(experts))
    chunks = [torch.stack([torch.isin(ids, wanted).float().mean(1) for ids in routed[i:i + per_layer]]).mean(0)
              for i in range(0, len(routed), per_layer)]
    share = torch.cat(chunks)
    print(f"skew probe: the chosen tokens send {statistics.mean(share.topk(count).values.tolist()):.0%} of their "
          f"pairs to the hot experts (uniform: {len(experts) / reference.spec.num_experts:.0%})")
    return share.topk(count).indices.tolist()
