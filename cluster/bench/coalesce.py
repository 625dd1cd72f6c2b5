"""`moectl bench coalesce`: coalescing on the groups with 1 and 2 router replicas sharing one pool.

    for each window W of --coalesce-window-s:
        LocalCluster: private Redis, local Ray, the controller with --groups groups (controller key
        group_coalesce_window_s = W; autoscaler off, so the placement stays put), max(--routers)
        routers: one in this process, the others Ray actors (a process and a GIL each, as replicas are)
        warm-up, then --repeats times, the settings interleaved: for each R of --routers, R routers at
        once, each --streams greedy streams of the same prompts x --new-tokens tokens (EOS ignored)

Reported per (R, W), medians of the repeats: tokens/s over all R routers (every token made / the wall
time from the first start to the last finish) and per router; from the groups' Stats over the round,
the Forwards they answered, the kernel calls they made and the Forwards answered by a kernel call that
also served another (experts/coalescer.py); and whether each router's greedy tokens equal those of the
first setting (exit status 1 when any differ). On a CPU machine the routers and the groups share its cores: a merged call saves the
per-call overhead only, where on a GPU a kernel call over 64 tokens costs about what one over 1 does.
"""
from __future__ import annotations

import json
import statistics
import time

from cluster.bench.serving_runs import agreement, engine_run, summarize

COUNTERS = ("forward_calls", "kernel_calls", "merged_calls")


def add_arguments(p) -> None:
    p.add_argument("--checkpoint", default="checkpoints/demo-small", help="checkpoint (default: the demo one)")
    p.add_argument("--groups", type=int, default=2, help="expert groups, shared by every router (default 2)")
    p.add_argument("--group-threads", type=int, default=1, help="torch threads per group (default 1)")
    p.add_argument("--routers", default="1,2", help="router replica counts, comma-separated, each 1-8 (default 1,2)")
    p.add_argument("--coalesce-window-s", default="0,0.002",
                   help="group_coalesce_window_s values, comma-separated, each in [0, 0.1] (default 0,0.002)")
    p.add_argument("--streams", type=int, default=32, help="greedy streams per router (default 32)")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None, metavar="FILE", help="write every figure there as JSON")


def settings(args) -> tuple[list[int], list[float]]:
    """(router counts, windows) from the flags; ValueError naming the flag before anything starts."""
    try:
        routers = sorted({int(r) for r in str(args.routers).split(",")})
        windows = sorted({float(w) for w in str(args.coalesce_window_s).split(",")})
    except ValueError:
        raise ValueError(f"--routers must list ints and --coalesce-window-s numbers, comma-separated, got "
                         f"{args.routers!r}, {args.coalesce_window_s!r}") from None
    if not all(1 <= r <= 8 for r in routers) or not all(0 <= w <= 0.1 for w in windows):
        raise ValueError(f"--routers must be in [1, 8] and --coalesce-window-s in [0, 0.1] s, got {args.routers!r}, "
                         f"{args.coalesce_window_s!r}")
    for name in ("groups", "group_threads", "streams", "prompt_tokens", "new_tokens", "repeats"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return routers, windows


def run(args) -> int:
    import torch

    from cluster.bench.local_cluster import LocalCluster
    from cluster.checkpoint.reader import Checkpoint

    routers, windows = settings(args)
    spec = Checkpoint(args.checkpoint).spec
    prompts = torch.randint(2, spec.vocab_size, (args.streams, args.prompt_tokens),
                            generator=torch.Generator().manual_seed(0)).tolist()
    router = {"max_running": max(64, args.streams), "max_queue": max(256, args.streams)}
    print(f"{spec.family} {args.checkpoint}: {args.groups} groups ({args.group_threads} torch thread(s) each), "
          f"routers {routers}, windows {[w * 1e3 for w in windows]} ms; per router {args.streams} streams x "
          f"{args.new_tokens} greedy tokens from {args.prompt_tokens}-token prompts; median of {args.repeats}")
    results = {}
    for window in windows:
        with LocalCluster(args.checkpoint, args.groups, autoscaler={"enabled": False}, router=router,
                          group_threads=args.group_threads, name=f"bench-coalesce-{int(time.time())}",
                          routers=max(routers), controller={"group_coalesce_window_s": window}) as cluster:
            _round(cluster, max(routers), prompts, 4)  # warm-up: every router's channels and kernels
            runs = {r: [] for r in routers}
            for _ in range(args.repeats):
                for r in routers:
                    runs[r].append(_round(cluster, r, prompts, args.new_tokens))
        for r in routers:
            results[(r, window)] = {**summarize(runs[r]), "tokens": [run["tokens"] for run in runs[r]],
                                    **{k: statistics.median(run[k] for run in runs[r]) for k in COUNTERS},
                                    "per_router_tokens_per_s": [statistics.median(run["per_router"][i] for run
                                                                                  in runs[r]) for i in range(r)]}
    return _report(args, results)


def _generate(router, prompts, new_tokens: int) -> dict:
    return engine_run(router.engine, prompts, new_tokens)


def _counters(cluster) -> dict[str, int]:
    """The groups' Forward, kernel and merged counts, summed (Stats through the router in this process)."""
    stats = cluster.router.experts.group_stats(10.0)
    if any(s is None for s in stats.values()):
        raise RuntimeError(f"a group did not answer Stats: {[a for a, s in stats.items() if s is None]}")
    return {k: sum(getattr(s, k) for s in stats.values()) for k in COUNTERS}


def _round(cluster, n: int, prompts, new_tokens: int) -> dict:
    """n routers at once (this process's and n - 1 replicas), each the same prompts."""
    import ray

    before, start = _counters(cluster), time.perf_counter()
    refs = [replica.call.remote(_generate, prompts, new_tokens) for replica in cluster.replicas[:n - 1]]
    runs = [_generate(cluster.router, prompts, new_tokens)] + ray.get(refs, timeout=600)
    wall, after = time.perf_counter() - start, _counters(cluster)
    return {"tokens_per_s": sum(len(t) for run in runs for t in run["tokens"]) / wall, "wall_s": wall,
            "per_router": [run["tokens_per_s"] for run in runs],
            "ttft_s": [x for run in runs for x in run["ttft_s"]], "itl_s": [x for run in runs for x in run["itl_s"]],
            "tokens": [run["tokens"] for run in runs], **{k: after[k] - before[k] for k in COUNTERS}}


def _report(args, results: dict) -> int:
    nan = float("nan")  # no inter-token times with --new-tokens 1
    base = next(iter(results.values()))["tokens"][0][0]  # the first setting's first router, first repeat
    print(f"  {'routers':>7} {'window ms':>9} {'tokens/s':>9} {'per router':>15} {'ITL p50/p99 ms':>15} "
          f"{'Forwards':>9} {'kernel calls':>12} {'merged':>7} {'same tokens':>11}")
    report = {"workload": {k: getattr(args, k) for k in ("checkpoint", "groups", "group_threads", "streams",
                                                          "prompt_tokens", "new_tokens", "repeats")},
              "results": [], "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    for (r, window), res in results.items():
        streams = [s for repeat in res["tokens"] for router in repeat for s in router]  # every router: the prompts
        same = agreement(streams, base * (len(streams) // len(base)))
        per_router = "/".join(f"{x:.0f}" for x in res["per_router_tokens_per_s"])
        merged = res["merged_calls"] / max(1, res["forward_calls"])
        print(f"  {r:>7} {window * 1e3:>9g} {res['tokens_per_s']:>9.0f} {per_router:>15} "
              f"{res.get('itl_s_p50', nan) * 1e3:>7.0f}/{res.get('itl_s_p99', nan) * 1e3:<7.0f} {res['forward_calls']:>9.0f} "
              f"{res['kernel_calls']:>12.0f} {merged:>7.0%} {same:>11.0%}")
        report["results"].append({"routers": r, "window_s": window, "same_tokens": same,
                                  **{k: v for k, v in res.items() if k != "tokens"}})
    print("  tokens/s: all routers together; Forwards, kernel calls: the groups', per round (medians); merged: "
          "Forwards answered by a kernel call that also served another; same tokens: streams equal to the first "
          "setting's")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {args.json}")
    return 0 if all(x["same_tokens"] == 1 for x in report["results"]) else 1
