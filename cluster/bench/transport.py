"""`moectl bench transport`: where one MoE layer's time goes on the way to an expert group and back.

    router: route + encode (wire.encode x, ids, weights)  --gRPC, loopback-->  group: decode, check
            decode the result, combine                   <--gRPC-----------   compute (busy_s), encode

One expert group (a Ray actor of its own, holding every expert), one layer, --tokens tokens, the
same call --calls times through RemoteExperts, as the engine makes it. The group's compute comes
from its own counter (Stats.busy_s); the codec and the secret check are timed here on the same
tensors with the same functions. What is left of the round trip splits into the gRPC floor (a bare
unary call carrying the same request bytes both ways to a process of its own, grpc_floor.py) and the
Python around the call on both sides (asyncio hand-offs, routing, checks, combining). Medians;
loopback only.
"""
from __future__ import annotations

import json

from cluster.bench.serving_runs import median_s


def add_arguments(p) -> None:
    p.add_argument("--checkpoint", default="checkpoints/demo-small", help="checkpoint (default: the demo one)")
    p.add_argument("--tokens", default="1,32,256", help="tokens per call, comma-separated (default 1,32,256)")
    p.add_argument("--calls", type=int, default=200, help="timed calls per size (default 200, after 10 warm-up calls)")
    p.add_argument("--group-threads", type=int, default=1, help="torch threads of the group (default 1)")
    p.add_argument("--json", default=None, metavar="FILE", help="write the figures there as JSON")


def codec_s(x, ids, weights, credentials=None, repeats: int = 200) -> dict:
    """The wire's own cost on these tensors: both encodes and decodes of a call, and the group's own
    secret check (SecretCheck.check) on a router's call metadata."""
    from experts.credentials import ExpertCredentials, SecretCheck, call_metadata
    from experts.wire import decode, encode

    credentials = credentials or ExpertCredentials.generate()
    check, metadata = SecretCheck(credentials.for_group()).check, call_metadata(credentials.for_router())

    messages = [encode(t) for t in (x, ids, weights)]
    result = encode(x)  # the answer has x's shape
    return {
        "encode_request_s": median_s(lambda: [encode(t) for t in (x, ids, weights)], repeats),
        "decode_request_s": median_s(lambda: [decode(m, "t") for m in messages], repeats),
        "encode_result_s": median_s(lambda: encode(x), repeats),
        "decode_result_s": median_s(lambda: decode(result, "output"), repeats),
        "secret_check_s": median_s(lambda: check(metadata), repeats),
    }


def run(args) -> int:
    import ray
    import torch
    from elasticmoe.v1 import expert_pb2

    from cluster.bench.grpc_floor import floor_s, start_echo
    from cluster.checkpoint.reader import Checkpoint
    from cluster.placement.table import PlacementTable
    from experts.config import ExpertGroupConfig
    from experts.credentials import ExpertCredentials
    from experts.group import ExpertGroupActor
    from experts.wire import encode
    from router_service.serving.dispatch import RemoteExperts

    sizes = [int(t) for t in str(args.tokens).split(",")]
    if not all(1 <= t <= 4096 for t in sizes) or not 20 <= args.calls <= 10000:
        raise ValueError(f"--tokens must be in [1, 4096] and --calls in [20, 10000], got {args.tokens}, {args.calls}")
    spec = Checkpoint(args.checkpoint).spec
    layer = spec.sparse_layers[0]
    table = PlacementTable.round_robin(spec, ["pending:0"])  # every expert of every layer on the one group
    credentials = ExpertCredentials.generate()  # as a cluster runs: every Forward carries and is checked for it
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    actor = ExpertGroupActor.remote(ExpertGroupConfig(str(args.checkpoint), table.slots_of(0), device="cpu",
                                                      name="transport-0", cpu_threads=args.group_threads,
                                                      credentials=credentials))
    report = {"checkpoint": str(args.checkpoint), "layer": layer, "hidden": spec.hidden_size, "top_k": spec.top_k,
              "calls": args.calls, "sizes": {}}
    echo = None
    try:
        address = ray.get(actor.start.remote(), timeout=600)
        echo, echo_address = start_echo()
        remote = RemoteExperts(spec, PlacementTable(1, (address,), table.replicas),
                               credentials=credentials.for_router())
        gen = torch.Generator().manual_seed(0)
        print(f"{spec.family} {args.checkpoint}: layer {layer}, hidden {spec.hidden_size}, top-{spec.top_k} of "
              f"{spec.num_experts}; one group on its own process, {args.calls} calls per size, medians (ms)")
        print(f"  {'tokens':>6} {'round trip':>10} {'compute':>8} {'codec':>7} {'secret':>7} {'rest':>7} "
              f"{'gRPC':>6} {'Python':>7} {'payload KiB':>11}")
        for t in sizes:
            x = torch.randn(t, spec.hidden_size, generator=gen)
            ids = torch.stack([torch.randperm(spec.num_experts, generator=gen)[:spec.top_k] for _ in range(t)])
            weights = torch.rand(t, spec.top_k, generator=gen)
            for _ in range(10):
                remote(layer, x, ids, weights)  # warm-up: channel, kernels
            busy0 = remote.group_stats(10.0)[address].busy_s
            trip = median_s(lambda: remote(layer, x, ids, weights), args.calls)
            # a mean from the group's counter, over the timed calls and median_s's one warm-up call
            compute = (remote.group_stats(10.0)[address].busy_s - busy0) / (args.calls + 1)
            codec = codec_s(x, ids.to(torch.int32), weights, credentials)
            wire = sum(v for k, v in codec.items() if k != "secret_check_s")
            rest = trip - compute - wire - codec["secret_check_s"]
            payload = 2 * x.numel() * x.element_size() + ids.numel() * 4 + weights.numel() * 4
            request = expert_pb2.ForwardRequest(layer=layer, hidden=encode(x), expert_ids=encode(ids.to(torch.int32)),
                                                weights=encode(weights)).SerializeToString()
            grpc_s = floor_s(echo_address, request, args.calls)
            report["sizes"][t] = {"round_trip_s": trip, "compute_s": compute, "rest_s": rest, "grpc_floor_s": grpc_s,
                                  "payload_bytes": payload, **codec}
            print(f"  {t:>6} {trip * 1e3:>10.2f} {compute * 1e3:>8.2f} {wire * 1e3:>7.3f} "
                  f"{codec['secret_check_s'] * 1e3:>7.4f} {rest * 1e3:>7.2f} {grpc_s * 1e3:>6.2f} "
                  f"{(rest - grpc_s) * 1e3:>7.2f} {payload / 1024:>11.1f}")
        print("  rest = round trip - compute - codec - secret = gRPC (a bare call with the same bytes) + Python "
              "(asyncio hand-offs, routing, checks, combining)")
        remote.close()
    finally:
        for a in (actor, echo):
            if a is not None:
                ray.kill(a)
        ray.shutdown()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.json}")
    return 0
