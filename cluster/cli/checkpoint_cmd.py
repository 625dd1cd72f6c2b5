"""`moectl make-checkpoint`, `inspect`, `run-reference`: write a checkpoint, describe one, and
generate from one with the in-process reference model; no cluster involved."""
from __future__ import annotations

import sys
import time

from cluster.checkpoint.spec import FAMILIES


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


def add_commands(sub) -> None:
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
