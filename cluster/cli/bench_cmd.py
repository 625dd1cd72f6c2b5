"""`moectl simulate` and `moectl bench kernel|serving|skew|overload|soak`: wiring only, each
benchmark's flags and code live in cluster/bench."""
from __future__ import annotations


def cmd_bench_kernel(args) -> int:
    from cluster.bench import kernel as bench_kernel

    return bench_kernel.run(args)


def add_commands(sub) -> None:
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
    p = bench.add_parser("soak", help="mixed traffic for --minutes while faults strike (group kill -9, Redis "
                                      "restart, rebalance, slow group, burst): failures, greedy checks, memory")
    from cluster.bench import soak as bench_soak

    bench_soak.add_arguments(p)
    p.set_defaults(fn=lambda args: bench_soak.run(args))
    p = bench.add_parser("transport", help="one MoE layer's round trip to a group, split: compute, codec, "
                                           "secret check, and the rest (gRPC, asyncio, Python)")
    from cluster.bench import transport as bench_transport

    bench_transport.add_arguments(p)
    p.set_defaults(fn=lambda args: bench_transport.run(args))
