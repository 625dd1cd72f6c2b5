"""`moectl bench serving --http`: one workload through the service's two ingresses, side by side in one run.

    S streams x M new tokens (P-token prompts, greedy), all at once, through
      gRPC   AsyncMoEClient.stream  -> Serve's gRPC proxy -+
      HTTP   POST /v1/completions,  -> Serve's HTTP proxy -+-> the same router replica, engine, groups
             stream: true (SSE)
    repeats alternate gRPC and HTTP (so drift on a shared machine hits both); medians of tokens/s, TTFT
    and inter-token p50/p99; then one untimed pass checks both paths return the same tokens.

TTFT is the first chunk that carries a token (gRPC) or the first SSE chunk with a choice (HTTP: one a
token). Tokens are counted as each path reports them: gRPC's token ids, HTTP's usage.completion_tokens.
Traffic goes to loopback only: --address and --http-address of a running service on this machine, or
a service started in-process here (local Ray, the expert groups, the router behind Serve) and stopped
after.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import time

from cluster.bench.overload import check_loopback, local_service
from cluster.bench.serving_runs import agreement, summarize


async def grpc_run(address: str, prompts: list[list[int]], new_tokens: int) -> dict:
    from router_service.client import AsyncMoEClient

    async with AsyncMoEClient(address, timeout_s=1800, max_attempts=1) as client:
        await client.status()  # connected before the clock starts
        start = time.perf_counter()

        async def one(prompt):
            times, tokens = [], []
            async for chunk in client.stream(prompt, max_tokens=new_tokens):
                if chunk.token_ids:
                    times.append(time.perf_counter())
                    tokens += chunk.token_ids
            return times, tokens

        done = await asyncio.gather(*(one(p) for p in prompts))
    return _figures(start, time.perf_counter(), [(times, len(tokens)) for times, tokens in done],
                    tokens=[tokens for _, tokens in done])


async def http_run(base: str, model: str, prompts: list[list[int]], new_tokens: int) -> dict:
    import aiohttp  # comes with ray: a streaming HTTP client without adding a dependency

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        start = time.perf_counter()

        async def one(prompt):
            times, count = [], 0
            body = {"model": model, "prompt": prompt, "max_tokens": new_tokens, "stream": True,
                    "stream_options": {"include_usage": True}}
            async with session.post(f"{base}/v1/completions", json=body) as reply:
                if reply.status != 200:
                    raise RuntimeError(f"HTTP {reply.status}: {(await reply.text())[:500]}")
                async for line in reply.content:  # SSE: `data: {...}` lines, blank lines between
                    if not line.startswith(b"data: {"):
                        continue
                    chunk = json.loads(line[6:])
                    if chunk["choices"]:
                        times.append(time.perf_counter())
                    elif chunk.get("usage"):
                        count = chunk["usage"]["completion_tokens"]
            return times, count

        done = await asyncio.gather(*(one(p) for p in prompts))
    return _figures(start, time.perf_counter(), done)


async def http_tokens(base: str, model: str, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """The token ids of each prompt over HTTP (untimed: token ids ride in the logprobs)."""
    import aiohttp

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        async def one(prompt):
            body = {"model": model, "prompt": prompt, "max_tokens": new_tokens, "logprobs": 0,
                    "return_tokens_as_token_ids": True}
            async with session.post(f"{base}/v1/completions", json=body) as reply:
                tokens = (await reply.json())["choices"][0]["logprobs"]["tokens"]
            return [int(t.removeprefix("token_id:")) for t in tokens]

        return list(await asyncio.gather(*(one(p) for p in prompts)))


def _figures(start: float, end: float, streams, tokens=None) -> dict:
    """streams: (token times, token count) per stream."""
    out = {"tokens_per_s": sum(n for _, n in streams) / (end - start), "wall_s": end - start,
           "ttft_s": [times[0] - start for times, _ in streams if times],
           "itl_s": [b - a for times, _ in streams for a, b in zip(times, times[1:])]}
    return {**out, "tokens": tokens} if tokens is not None else out


def measure(address: str, base: str, prompts: list[list[int]], new_tokens: int, repeats: int) -> dict:
    """Both paths against one running service: {"grpc": summary, "http": summary, "agreement": fraction}."""
    import urllib.request

    with urllib.request.urlopen(f"{base}/v1/models", timeout=60) as reply:
        model = json.loads(reply.read())["data"][0]["id"]
    asyncio.run(grpc_run(address, prompts, 4))  # warm-up: connections, the first steps
    asyncio.run(http_run(base, model, prompts, 4))
    grpc_runs, http_runs = [], []
    for _ in range(repeats):
        grpc_runs.append(asyncio.run(grpc_run(address, prompts, new_tokens)))
        http_runs.append(asyncio.run(http_run(base, model, prompts, new_tokens)))
    same = agreement(asyncio.run(http_tokens(base, model, prompts, new_tokens)), grpc_runs[0]["tokens"])
    return {"grpc": summarize(grpc_runs), "http": summarize(http_runs), "agreement": same}


def run(args, streams: list[int]) -> int:
    """Every stream count of --streams through both paths; a running service (--address, --http-address)
    or one started here on args.checkpoint."""
    import random

    report = {"workload": {"streams": streams, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
                           "repeats": args.repeats}, "http": {}}
    with contextlib.ExitStack() as stack:
        if args.address or args.http_address:
            if not (args.address and args.http_address):
                raise ValueError("--address and --http-address go together (a running service's gRPC and HTTP ports)")
            check_loopback(args.address)
            check_loopback(args.http_address)
            address, http_address, vocab = args.address, args.http_address, 102  # ids < 102: any real vocabulary
        else:
            from cluster.checkpoint.reader import Checkpoint
            from cluster.state.redis_server import free_port

            vocab, http_port, biggest = Checkpoint(args.checkpoint).spec.vocab_size, free_port(), max(streams)
            router = {"max_running": max(64, biggest), "max_queue": max(256, biggest),
                      "max_step_tokens": max(512, biggest), "kv_cache_bytes": args.kv_cache_bytes}
            address = stack.enter_context(local_service(args.checkpoint, args.groups, router, http_port=http_port,
                                                        group_threads=args.group_threads))
            http_address = f"127.0.0.1:{http_port}"
            report["workload"].update(checkpoint=args.checkpoint, groups=args.groups)
        rng = random.Random(0)
        prompts = [[rng.randrange(2, vocab) for _ in range(args.prompt_tokens)] for _ in range(max(streams))]
        for s in streams:
            report["http"][s] = measure(address, f"http://{http_address}", prompts[:s], args.new_tokens, args.repeats)
            _print(s, args, report["http"][s])
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**report, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}, f, indent=1)
        print(f"wrote {args.json}")
    return 0


def _print(s: int, args, result: dict) -> None:
    print(f"served, {s} streams x {args.new_tokens} tokens ({args.prompt_tokens}-token prompts, greedy), median of "
          f"{args.repeats}: gRPC and HTTP to the same router replica")
    print(f"  {'path':<6} {'tokens/s':>9} {'TTFT p50/p99 ms':>16} {'ITL p50/p99 ms':>15}")
    for name in ("grpc", "http"):
        r = result[name]
        print(f"  {name:<6} {r['tokens_per_s']:>9.0f} {r['ttft_s_p50'] * 1e3:>8.0f}/{r['ttft_s_p99'] * 1e3:<7.0f} "
              f"{r['itl_s_p50'] * 1e3:>7.0f}/{r['itl_s_p99'] * 1e3:<7.0f}")
    g, h = result["grpc"], result["http"]
    print(f"  HTTP / gRPC: tokens/s {h['tokens_per_s'] / g['tokens_per_s']:.2f}x, TTFT p50 "
          f"{h['ttft_s_p50'] / g['ttft_s_p50']:.2f}x; same tokens on both paths: {result['agreement']:.0%} of streams")
