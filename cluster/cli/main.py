"""moectl: the command line of elastic-moe.

Every error a user can cause (a bad path, a corrupt checkpoint, an unsupported model,
a bad flag value) ends as one line on stderr and exit status 2, never a traceback; a Redis
that is down or refuses the URL's password or TLS settings, one line and exit status 1.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time

from cluster.checkpoint.spec import FAMILIES
from cluster.deploy.connect import add_client_arguments, client_options


def cmd_make_checkpoint(args) -> int:
    from cluster.checkpoint.make import make_checkpoint

    out = make_checkpoint(args.family, args.preset, args.out, seed=args.seed, max_shard_mb=args.max_shard_mb)
    print(f"wrote {args.family} {args.preset} checkpoint to {out}")
    return 0


def cmd_inspect(args) -> int:
    from cluster.checkpoint.reader import Checkpoint

    ckpt = Checkpoint(args.checkpoint)
    s = ckpt.spec
    expert_bytes = sum(_nbytes(ckpt, n) for l in s.sparse_layers for n in ckpt.spec.expert_tensor_names(l, 0))
    dense_bytes = sum(_nbytes(ckpt, n) for n in ckpt.dense_names())
    print(f"checkpoint   {ckpt.path}")
    print(f"family       {s.family}  layers {s.num_layers} (MoE: {len(s.sparse_layers)})  hidden {s.hidden_size}  "
          f"vocab {s.vocab_size}")
    print(f"experts      {s.num_experts} per layer, top-{s.top_k}, FFN {s.moe_intermediate_size}"
          f"{', shared expert' if s.has_shared_expert else ''}")
    print(f"bytes        dense {dense_bytes / 2**20:.1f} MiB; one expert across all MoE layers "
          f"{expert_bytes / 2**20:.1f} MiB; all experts {expert_bytes * s.num_experts / 2**20:.1f} MiB")
    return 0


def _nbytes(ckpt, name: str) -> int:
    n = 1
    for d in ckpt.shape(name):
        n *= d
    return n * 4  # as fp32, the CPU serving dtype


def cmd_run_reference(args) -> int:
    """Greedy generation with the in-process ReferenceModel, streaming tokens as they come."""
    import torch

    from router_service.model.reference import ReferenceModel
    from router_service.model.tokenizer import Tokenizer

    if not args.prompt.strip():  # fail before spending seconds on loading weights
        raise ValueError("prompt is empty: give some text (or token ids)")
    start = time.monotonic()
    model = ReferenceModel.from_pretrained(args.checkpoint, dtype=args.dtype, backend=args.kernel)
    print(f"loaded {args.checkpoint} ({model.loaded_bytes / 2**20:.1f} MiB) in {time.monotonic() - start:.1f} s",
          file=sys.stderr)
    tokenizer = Tokenizer.from_dir(args.checkpoint)
    if tokenizer is None:
        try:
            prompt = [int(x) for x in args.prompt.split()]
        except ValueError:
            raise ValueError("this checkpoint has no tokenizer.json: give the prompt as space-separated token ids")
    else:
        prompt = tokenizer.encode(args.prompt)
    caches = model.new_caches(1)
    logits = model(torch.tensor([prompt]), caches)
    out: list[int] = []
    print(args.prompt, end="", flush=True)
    for _ in range(args.max_tokens):
        token = int(logits[0, -1].argmax())
        if token == model.spec.eos_token_id:
            break
        out.append(token)
        if tokenizer is not None:  # print the text that the new token completes
            print(tokenizer.decode(out)[len(tokenizer.decode(out[:-1])):], end="", flush=True)
        else:
            print(f" {token}", end="", flush=True)
        logits = model(torch.tensor([[token]]), caches)
    print()
    return 0


def cmd_serve(args) -> int:
    from cluster.deploy import serve_cmd

    return serve_cmd.run(args)


def cmd_generate(args) -> int:
    """Stream a completion from a running service (the SDK; no torch needed on this side)."""
    from router_service.client import MoEClient, MoEError

    prompt = [int(t) for t in args.prompt.split()] if args.token_ids else args.prompt
    try:
        with MoEClient(args.address, timeout_s=args.timeout_s, **client_options(args)) as client:
            for chunk in client.stream(prompt, max_tokens=args.max_tokens, temperature=args.temperature,
                                       seed=args.seed):
                print(chunk.text if chunk.text else " ".join(map(str, chunk.token_ids)), end="", flush=True)
    except MoEError as e:
        raise ValueError(f"{args.address}: {e.code.name}: {e.details}") from None
    print()
    return 0


def cmd_status(args) -> int:
    from router_service.client import MoEClient, MoEError

    try:
        with MoEClient(args.address, timeout_s=args.timeout_s, **client_options(args)) as client:
            status = client.status()
    except MoEError as e:
        raise ValueError(f"{args.address}: {e.code.name}: {e.details}") from None
    print(f"model {status.model}  serving {status.serving}  placement v{status.placement_version}")
    for g in status.groups:
        print(f"  {g.name:<12} {g.address:<22} {g.health:<12} {len(g.experts)} experts")
    layers = sorted({p.layer for p in status.placement})
    for layer in layers:
        row = [p for p in status.placement if p.layer == layer]
        print(f"  layer {layer:>3}: " + " ".join(f"e{p.expert}->{','.join(p.groups)}" for p in row))
    return 0


def cmd_bench_kernel(args) -> int:
    from cluster.bench import kernel as bench_kernel

    return bench_kernel.run(args)


class _Parser(argparse.ArgumentParser):
    """Flag errors as one line, like every other moectl error (subcommand parsers inherit this)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="moectl", description="Elastic serving of Mixture-of-Experts models on Ray.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("make-checkpoint", help="write a deterministic random-weight checkpoint (HF layout)")
    p.add_argument("--family", required=True, choices=FAMILIES)
    p.add_argument("--preset", required=True, choices=["tiny", "small"],
                   help="tiny: unit tests; small: demo and benchmarks (8 layers, hidden 512, 8 experts, top-2)")
    p.add_argument("--out", required=True, help="output directory (created if missing)")
    p.add_argument("--seed", type=int, default=0, help="same seed, same weights (default 0)")
    p.add_argument("--max-shard-mb", type=float, default=1024,
                   help="split safetensors into shards of at most this size, with an index (default 1024)")
    p.set_defaults(fn=cmd_make_checkpoint)

    p = sub.add_parser("inspect", help="print a checkpoint's architecture and sizes")
    p.add_argument("--checkpoint", required=True, help="Hugging Face checkpoint directory")
    p.set_defaults(fn=cmd_inspect)

    p = sub.add_parser("run-reference", help="greedy generation with the in-process reference model")
    p.add_argument("--checkpoint", required=True, help="Hugging Face checkpoint directory")
    p.add_argument("prompt", help="text, or space-separated token ids when the checkpoint has no tokenizer")
    p.add_argument("--max-tokens", type=int, default=32, help="new tokens to generate (default 32)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--kernel", default="auto", choices=["auto", "torch", "triton"],
                   help="expert kernel: auto = triton on CUDA, torch on CPU")
    p.set_defaults(fn=cmd_run_reference)

    p = sub.add_parser("serve", help="run the cluster in the foreground: expert groups, router, gRPC on --port")
    from cluster.deploy import serve_cmd

    serve_cmd.add_arguments(p)
    p.set_defaults(fn=cmd_serve)

    p = sub.add_parser("generate", help="stream a completion from a running service")
    p.add_argument("--address", default="127.0.0.1:9000", help="service HOST:PORT (default 127.0.0.1:9000)")
    p.add_argument("prompt", help="text (or token ids with --token-ids)")
    p.add_argument("--token-ids", action="store_true", help="the prompt is space-separated token ids")
    p.add_argument("--max-tokens", type=int, default=32, help="new tokens (default 32)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--seed", type=int, default=None, help="same seed, same output")
    p.add_argument("--timeout-s", type=float, default=60.0, help="whole-call deadline (default 60)")
    add_client_arguments(p)
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("status", help="groups, their addresses and the placement of a running service")
    p.add_argument("--address", default="127.0.0.1:9000", help="service HOST:PORT (default 127.0.0.1:9000)")
    p.add_argument("--timeout-s", type=float, default=10.0, help="deadline (default 10)")
    add_client_arguments(p)
    p.set_defaults(fn=cmd_status)

    from cluster.cli import placement_cmd

    placement_cmd.add_commands(sub)

    p = sub.add_parser("simulate", help="replay a shifting-skew trace through the planner and autoscaler on a "
                                        "modelled 64-256 GPU cluster: imbalance, weights moved, vs static")
    from cluster.bench import simulate

    simulate.add_arguments(p)
    p.set_defaults(fn=lambda args: simulate.run(args))

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True, metavar="BENCH")
    p = bench.add_parser("kernel", help="expert kernel: triton vs torch on given shapes (needs CUDA for triton)")
    from cluster.bench import kernel as bench_kernel

    bench_kernel.add_arguments(p)
    p.set_defaults(fn=cmd_bench_kernel)
    p = bench.add_parser("serving", help="cluster vs in-process: prefill, decode per MoE layer, throughput")
    from cluster.bench import serving as bench_serving

    bench_serving.add_arguments(p)
    p.set_defaults(fn=lambda args: bench_serving.run(args))
    p = bench.add_parser("skew", help="the autoscaler under skewed traffic: before/after throughput, time to balance")
    from cluster.bench import skew as bench_skew

    bench_skew.add_arguments(p)
    p.set_defaults(fn=lambda args: bench_skew.run(args))
    p = bench.add_parser("overload", help="a burst beyond capacity: accepted, refused (RESOURCE_EXHAUSTED), "
                                          "completed, latency; then one request to show recovery")
    from cluster.bench import overload as bench_overload

    bench_overload.add_arguments(p)
    p.set_defaults(fn=lambda args: bench_overload.run(args))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if getattr(args, "max_tokens", 1) < 1:  # run-reference and generate
        print("moectl: error: --max-tokens must be >= 1", file=sys.stderr)
        return 2
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
        # CheckpointError, UnsupportedModelError and KernelError are ValueErrors: user input, one line
        print(f"moectl: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `moectl status | head`: the reader left; not an error
        sys.stderr.close()
        return 0
    except Exception as e:
        # Redis down, or it refused our password / TLS settings: one line, no secret (cluster/state/redis_url.py).
        # Looked up lazily: commands that never load cluster.state.store (generate, status) do not import redis.
        state = sys.modules.get("cluster.state.store")
        if state is None or not isinstance(e, state.RedisAccessError):
            raise
        print(f"moectl: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
