"""`moectl bench serving`: the cluster path against in-process baselines and peers, side by side in one run.

  1. prefill of N tokens: DenseModel + RemoteExperts (groups are Ray actors) vs ReferenceModel
  2. one decode step at batch B: extra time per MoE layer over in-process
  3. generation, for each stream count S of --streams: S prompts x M new tokens, greedy, through
       cluster      Engine (paged KV) + RemoteExperts over the Ray groups
       in-process   Engine (paged KV) + every expert local
       transformers batched generate (skipped above --transformers-max-streams)
       vLLM         its CPU build, from the interpreter --against-vllm names (cluster/bench/vllm_peer.py)
     tokens/s (median of --repeats), TTFT and inter-token p50/p99, and whether the greedy tokens agree
  4. --json FILE: every figure, machine-readable
  --http instead: the service's gRPC and HTTP (OpenAI-compatible) ingresses side by side (serving_http.py)

Figures depend on the machine: on 2 CPU cores the router, the groups and Ray share the cores,
which the cluster path pays for. Ratios are only compared within one run.
"""
from __future__ import annotations

import json
import platform
import time
from dataclasses import replace

from cluster.bench.serving_runs import agreement, engine_run, median_s, summarize, transformers_runs, vllm_runs


def add_arguments(p) -> None:
    p.add_argument("--checkpoint", default="checkpoints/demo-small", help="checkpoint (default: the demo one)")
    p.add_argument("--groups", type=int, default=2, help="expert groups (default 2)")
    p.add_argument("--group-threads", type=int, default=1,
                   help="torch threads per group (default 1: on a small machine groups and router share the cores)")
    p.add_argument("--device", default="auto", help="router and groups: auto (cuda when present) | cpu | cuda")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="model dtype of router and groups (default: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--prefill-tokens", type=int, default=2048)
    p.add_argument("--decode-batch", type=int, default=32)
    p.add_argument("--streams", default="32", help="stream counts to sweep, comma-separated (default 32; e.g. 8,32)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=32, help="prompt length of each stream (default 32)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-transformers", action="store_true", help="leave out the transformers baseline")
    p.add_argument("--transformers-max-streams", type=int, default=64, help="no transformers run above this many")
    p.add_argument("--against-vllm", default=None, metavar="PYTHON",
                   help="also run vLLM's CPU build from this interpreter (its own venv; never a dependency)")
    p.add_argument("--vllm-timeout-s", type=float, default=1800)
    p.add_argument("--kv-cache-bytes", type=int, default=None, help="the engines' KV pool (default: engine's own)")
    p.add_argument("--micro-batches", default="1", help="cluster engines to run: 1, 2 or 1,2 (two micro-batches in "
                                                         "flight, engine/pipeline.py; default 1)")
    p.add_argument("--json", default=None, metavar="FILE", help="write every figure there as JSON")
    p.add_argument("--http", action="store_true",
                   help="instead: the served path, gRPC vs the OpenAI-compatible HTTP API on one router replica "
                        "(a service started here, or --address and --http-address of a running one, loopback only)")
    p.add_argument("--address", default=None, help="with --http: a running service's gRPC address (loopback)")
    p.add_argument("--http-address", default=None, help="with --http: its HTTP address, e.g. 127.0.0.1:8000")


def run(args) -> int:
    import ray
    import torch

    from cluster.checkpoint.reader import Checkpoint
    from cluster.placement.table import PlacementTable
    from experts.config import ExpertGroupConfig
    from experts.group import ExpertGroupActor
    from router_service.engine.engine import Engine, EngineConfig
    from router_service.engine.scheduler import SchedulerConfig
    from router_service.model.reference import ReferenceModel
    from router_service.serving.dispatch import RemoteExperts
    from router_service.serving.router_config import resolve_device

    streams = sorted({int(s) for s in str(args.streams).split(",")})
    if not streams or streams[0] < 1 or args.repeats < 1:
        raise ValueError(f"--streams must list counts >= 1 and --repeats be >= 1, got {args.streams!r}, {args.repeats}")
    if args.http:
        from cluster.bench import serving_http

        return serving_http.run(args, streams)
    device = resolve_device(args.device)
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    ckpt = Checkpoint(args.checkpoint)
    spec, path = ckpt.spec, str(args.checkpoint)
    local = ReferenceModel.from_pretrained(path, dtype=dtype, device=device)
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    table = PlacementTable.round_robin(spec, [f"pending:{g}" for g in range(args.groups)])
    group_device = "cuda" if device.type == "cuda" else "cpu"
    actors = [ExpertGroupActor.options(num_gpus=1 if group_device == "cuda" else 0).remote(
        ExpertGroupConfig(path, table.slots_of(g), device=group_device, dtype=dtype, name=f"bench-{g}",
                          cpu_threads=args.group_threads)) for g in range(args.groups)]
    report = {"machine": {"platform": platform.platform(), "torch": torch.__version__,
                          "torch_threads": torch.get_num_threads(), "device": str(device), "dtype": dtype},
              "workload": {"checkpoint": path, "family": spec.family, "groups": args.groups,
                           "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "streams": streams,
                           "repeats": args.repeats}, "generation": {}}
    try:
        table = PlacementTable(1, tuple(ray.get([a.start.remote() for a in actors])), table.replicas)
        remote = RemoteExperts(spec, table)
        cluster = ReferenceModel(local.dense, remote)
        print(f"{spec.family} {path}: {spec.num_layers} layers ({len(spec.sparse_layers)} MoE), hidden "
              f"{spec.hidden_size}, {spec.num_experts} experts top-{spec.top_k}; {args.groups} groups; {dtype} on "
              f"{device}, {torch.get_num_threads()} torch threads here; median of {args.repeats}")
        report.update(_prefill_and_decode(args, spec, local, cluster))
        gen = torch.Generator().manual_seed(0)
        prompts = torch.randint(2, spec.vocab_size, (max(streams), args.prompt_tokens), generator=gen).tolist()
        config = EngineConfig(SchedulerConfig(max_running=max(64, max(streams)), max_step_tokens=max(512, max(streams)),
                                              max_queue=max(256, max(streams))),
                              stop_at_eos=False, kv_cache_bytes=args.kv_cache_bytes)
        micro = sorted({int(m) for m in str(args.micro_batches).split(",")})
        if not set(micro) <= {1, 2}:
            raise ValueError(f"--micro-batches must list 1 and/or 2, got {args.micro_batches!r}")
        # one dense model, several engines (each its own KV pool)
        engines = {("cluster" if m == 1 else f"cluster {m}mb"):
                   Engine(local.dense, remote, replace(config, micro_batches=m)) for m in micro}
        engines["in-process"] = Engine(local.dense, local.experts, config)
        report["kv"] = _kv_capacity(engines["in-process"], args.prompt_tokens + args.new_tokens)
        print(report["kv"]["line"])
        for s in streams:
            report["generation"][s] = results = {}
            for name, engine in engines.items():
                engine_run(engine, prompts[:s], 4)  # warm-up
                runs = [engine_run(engine, prompts[:s], args.new_tokens) for _ in range(args.repeats)]
                results[name] = {**summarize(runs), "tokens": runs[0]["tokens"]}
            if not args.skip_transformers and s <= args.transformers_max_streams:
                runs = transformers_runs(path, prompts[:s], args.new_tokens, dtype, args.repeats)
                results["transformers"] = {**summarize(runs), "tokens": runs[0]["tokens"]}
        for engine in engines.values():
            engine.close()
        remote.close()
    finally:
        for a in actors:
            ray.kill(a)
        ray.shutdown()
    if args.against_vllm:
        peer = vllm_runs(args.against_vllm, path, dtype, prompts, streams, args.new_tokens, args.repeats,
                         args.vllm_timeout_s)
        report["vllm_version"] = peer["version"]
        for s, runs in peer["results"].items():
            report["generation"][s]["vllm"] = {**summarize(runs), "tokens": runs[0]["tokens"]}
    for s in streams:
        _print_generation(s, args, report["generation"][s])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(_without_tokens(report), f, indent=1)
        print(f"wrote {args.json}")
    return 0


def _prefill_and_decode(args, spec, local, cluster) -> dict:
    import torch

    gen = torch.Generator().manual_seed(1)
    moe_layers = len(spec.sparse_layers)
    ids = torch.randint(0, spec.vocab_size, (1, args.prefill_tokens), generator=gen)
    t_local, t_cluster = (median_s(lambda m=m: m(ids), args.repeats) for m in (local, cluster))
    print(f"prefill {args.prefill_tokens} tokens: in-process {t_local * 1e3:.0f} ms, cluster {t_cluster * 1e3:.0f} ms, "
          f"ratio {t_cluster / t_local:.2f} (target <= 1.1)")
    b = args.decode_batch
    prompt = torch.randint(0, spec.vocab_size, (b, 16), generator=gen)
    step_ids = torch.randint(0, spec.vocab_size, (b, 1), generator=gen)
    per_model = []
    for model in (local, cluster):
        caches = model.new_caches(b)
        model(prompt, caches)
        per_model.append(median_s(lambda m=model, c=caches: m(step_ids, c), args.repeats))
    extra_ms = (per_model[1] - per_model[0]) * 1e3 / moe_layers
    print(f"decode step, batch {b}: in-process {per_model[0] * 1e3:.1f} ms, cluster {per_model[1] * 1e3:.1f} ms; "
          f"extra per MoE layer {extra_ms:.2f} ms (target <= 0.5 ms)")
    return {"prefill": {"tokens": args.prefill_tokens, "in_process_s": t_local, "cluster_s": t_cluster,
                        "ratio": t_cluster / t_local},
            "decode": {"batch": b, "in_process_s": per_model[0], "cluster_s": per_model[1],
                       "extra_per_moe_layer_ms": extra_ms}}


def _kv_capacity(engine, tokens_per_seq: int) -> dict:
    s = engine.stats()
    per_seq = -(-tokens_per_seq // s.block_size)
    fits = s.blocks_total // per_seq
    line = (f"KV pool: {s.blocks_total} blocks of {s.block_size} tokens ({s.pool_bytes / 2**20:.0f} MiB): "
            f"{fits} sequences of {tokens_per_seq} tokens at once")
    return {"blocks": s.blocks_total, "block_size": s.block_size, "pool_bytes": s.pool_bytes,
            "sequences_of_workload": fits, "line": line}


def _print_generation(s: int, args, results: dict) -> None:
    print(f"generation {s} streams x {args.new_tokens} tokens ({args.prompt_tokens}-token prompts, greedy):")
    print(f"  {'system':<13} {'tokens/s':>9} {'TTFT p50/p99 ms':>16} {'ITL p50/p99 ms':>15} {'vs vLLM':>8} "
          f"{'vs transformers':>15} {'same tokens as in-process':>26}")
    base = results["in-process"]["tokens"]
    for name, r in results.items():
        ttft = f"{r['ttft_s_p50'] * 1e3:.0f}/{r['ttft_s_p99'] * 1e3:.0f}" if "ttft_s_p50" in r else "-"
        itl_key = "itl_s" if "itl_s_p50" in r else "itl_mean_s"  # vLLM: each request's mean, see vllm_peer.py
        itl = f"{r[itl_key + '_p50'] * 1e3:.0f}/{r[itl_key + '_p99'] * 1e3:.0f}" if itl_key + "_p50" in r else "-"
        vs = lambda other: (f"{r['tokens_per_s'] / results[other]['tokens_per_s']:.2f}x"  # noqa: E731
                            if other in results and other != name else "")
        print(f"  {name:<13} {r['tokens_per_s']:>9.0f} {ttft:>16} {itl:>15} {vs('vllm'):>8} {vs('transformers'):>15} "
              f"{agreement(r['tokens'], base):>25.0%}")
    if "cluster 2mb" in results and "cluster" in results:
        ratio = results["cluster 2mb"]["tokens_per_s"] / results["cluster"]["tokens_per_s"]
        print(f"  two micro-batches / one = {ratio:.2f}x (target >= 1.2x at 64 streams)")
    if "transformers" in results and "cluster" in results:
        ratio = results["cluster"]["tokens_per_s"] / results["transformers"]["tokens_per_s"]
        print(f"  cluster / transformers = {ratio:.2f}x (target >= 1.5x)")
    if "vllm" in results:
        for name in [n for n in ("cluster", "cluster 2mb", "in-process") if n in results]:
            ratio = results[name]["tokens_per_s"] / results["vllm"]["tokens_per_s"]
            print(f"  {name} / vLLM = {ratio:.2f}x (target {'>= 0.8x' if name == 'in-process' else '>= 0.6x'})")


def _without_tokens(report: dict) -> dict:
    out = json.loads(json.dumps(report, default=str))
    for results in out["generation"].values():
        for r in results.values():
            r.pop("tokens", None)
    out["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    return out
