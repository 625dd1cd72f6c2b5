"""`moectl bench serving`: the cluster path against in-process baselines, side by side in one run.

  1. prefill of N tokens: DenseModel + RemoteExperts (groups are Ray actors) vs ReferenceModel
  2. one decode step at batch B: extra time per MoE layer over in-process
  3. generation throughput at S streams x M new tokens through the Engine vs transformers'
     batched generate on the same checkpoint; TTFT and inter-token latency p50/p99

Medians over --repeats. Figures depend on the machine: on 2 CPU cores the router, the
groups and Ray compete for the same cores, which the cluster path pays for.
"""
from __future__ import annotations

import asyncio
import statistics
import time


def add_arguments(p) -> None:
    p.add_argument("--checkpoint", default="checkpoints/demo-small", help="checkpoint (default: the demo one)")
    p.add_argument("--groups", type=int, default=2, help="expert groups (default 2)")
    p.add_argument("--prefill-tokens", type=int, default=2048)
    p.add_argument("--decode-batch", type=int, default=32)
    p.add_argument("--streams", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=32, help="prompt length of each stream (default 32)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-transformers", action="store_true", help="leave out the transformers baseline")


def _median_s(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def run(args) -> int:
    import ray
    import torch

    from cluster.checkpoint.reader import Checkpoint
    from cluster.placement.table import PlacementTable
    from experts.config import ExpertGroupConfig
    from experts.group import ExpertGroupActor
    from router_service.engine.engine import Engine, EngineConfig
    from router_service.model.dense import DenseModel
    from router_service.model.reference import ReferenceModel
    from router_service.model.sampling import SamplingParams
    from router_service.serving.dispatch import RemoteExperts

    ckpt = Checkpoint(args.checkpoint)
    spec, path = ckpt.spec, str(args.checkpoint)
    local = ReferenceModel.from_pretrained(path)
    ray.init(include_dashboard=False, log_to_driver=False)
    table = PlacementTable.round_robin(spec, [f"pending:{g}" for g in range(args.groups)])
    actors = [ExpertGroupActor.remote(ExpertGroupConfig(path, table.slots_of(g), device="cpu", name=f"bench-{g}"))
              for g in range(args.groups)]
    try:
        table = PlacementTable(1, tuple(ray.get([a.start.remote() for a in actors])), table.replicas)
        remote = RemoteExperts(spec, table)
        cluster = ReferenceModel(DenseModel(spec, ckpt.load_dense()), remote)
        moe_layers = len(spec.sparse_layers)
        gen = torch.Generator().manual_seed(0)
        print(f"{spec.family} {path}: {spec.num_layers} layers ({moe_layers} MoE), hidden {spec.hidden_size}, "
              f"{spec.num_experts} experts top-{spec.top_k}; {args.groups} groups; median of {args.repeats}")

        ids = torch.randint(0, spec.vocab_size, (1, args.prefill_tokens), generator=gen)
        t_local, t_cluster = (_median_s(lambda m=m: m(ids), args.repeats) for m in (local, cluster))
        print(f"prefill {args.prefill_tokens} tokens: in-process {t_local * 1e3:.0f} ms, cluster "
              f"{t_cluster * 1e3:.0f} ms, ratio {t_cluster / t_local:.2f} (target <= 1.3)")

        b = args.decode_batch
        prompt = torch.randint(0, spec.vocab_size, (b, 16), generator=gen)
        step_ids = torch.randint(0, spec.vocab_size, (b, 1), generator=gen)
        per_model = []
        for model in (local, cluster):
            caches = model.new_caches(b)
            model(prompt, caches)
            per_model.append(_median_s(lambda m=model, c=caches: m(step_ids, c), args.repeats))
        extra_ms = (per_model[1] - per_model[0]) * 1e3 / moe_layers
        print(f"decode step, batch {b}: in-process {per_model[0] * 1e3:.1f} ms, cluster {per_model[1] * 1e3:.1f} ms; "
              f"extra per MoE layer {extra_ms:.2f} ms (target <= 1 ms)")

        prompts = torch.randint(2, spec.vocab_size, (args.streams, args.prompt_tokens), generator=gen).tolist()
        engine = Engine(cluster.dense, remote, EngineConfig(stop_at_eos=False))
        wall, ttft, itl = asyncio.run(_streams(engine, prompts, SamplingParams(max_tokens=args.new_tokens)))
        engine.close()
        ours = args.streams * args.new_tokens / wall
        print(f"generation {args.streams} streams x {args.new_tokens} tokens: {ours:.0f} tokens/s "
              f"({wall:.1f} s); TTFT p50 {_pct(ttft, .5) * 1e3:.0f} ms p99 {_pct(ttft, .99) * 1e3:.0f} ms; "
              f"inter-token p50 {_pct(itl, .5) * 1e3:.0f} ms p99 {_pct(itl, .99) * 1e3:.0f} ms")
        if not args.skip_transformers:
            theirs = _transformers_tokens_per_s(path, prompts, args.new_tokens)
            print(f"transformers batched generate: {theirs:.0f} tokens/s; cluster / transformers = "
                  f"{ours / theirs:.2f}x (target >= 1.0x)")
        remote.close()
    finally:
        for a in actors:
            ray.kill(a)
        ray.shutdown()
    return 0


async def _streams(engine, prompts, params):
    start = time.perf_counter()

    async def one(prompt):
        times = []
        async for _ in engine.generate(prompt, params):
            times.append(time.perf_counter())
        return times

    all_times = await asyncio.gather(*(one(p) for p in prompts))
    wall = time.perf_counter() - start
    ttft = [t[0] - start for t in all_times]
    itl = [b - a for t in all_times for a, b in zip(t, t[1:])]
    return wall, ttft, itl


def _transformers_tokens_per_s(path: str, prompts, new_tokens: int) -> float:
    import torch
    from transformers import AutoModelForCausalLM  # the baseline only; the package never needs it

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.tensor(prompts)
    with torch.no_grad():
        start = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        return len(prompts) * new_tokens / (time.perf_counter() - start)
