"""`moectl serve`, `generate`, `status`: run the service in the foreground (its code is
cluster/deploy/serve_cmd.py), and talk to a running one through the SDK, which needs no torch."""
from __future__ import annotations

from cluster.deploy.connect import add_client_arguments, client_options


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
    if status.HasField("kv"):
        kv = status.kv
        print(f"  kv cache: {kv.blocks_used}/{kv.blocks_total} blocks of {kv.block_size} tokens used "
              f"({kv.pool_bytes / 2**20:.0f} MiB pool), {kv.running} running, {kv.waiting} waiting, "
              f"{kv.preemptions} preemptions (this replica)")
    for g in status.groups:
        print(f"  {g.name:<12} {g.address:<22} {g.health:<12} {len(g.experts)} experts")
    layers = sorted({p.layer for p in status.placement})
    for layer in layers:
        row = [p for p in status.placement if p.layer == layer]
        print(f"  layer {layer:>3}: " + " ".join(f"e{p.expert}->{','.join(p.groups)}" for p in row))
    return 0


def add_commands(sub) -> None:
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
